"""The daily audit: every row of a content type against every point of each of its collections.

Repair looks only at rows that changed; the audit looks at everything, so it also finds what no change
time points at: points of content that no longer exists, points lost in Qdrant, a collection restored
from an old snapshot. One ordered walk per collection (services/merge_join.py): O(rows + points) time,
a page of each side in memory.

What it does about the gaps, unless it is a dry run:
- missing and stale rows get an index request by id (bulk), as repair sends them;
- orphans are acted on after the walk, and only once the safety valve has passed: a point with no row
  at all is deleted from Qdrant (nothing else would ever remove it); a live point of a deleted row gets
  an index request by id, so the worker writes its tombstone (see services/repair.py for why);
  a tombstone with no row is harmless garbage, counted as `tombstones` and deleted.
  Every candidate's row is looked up again just before acting: a row written since the walk saw the
  id is left alone.
- SAFETY VALVE: when more than `orphan_max_share` of a collection's live points look orphaned, nothing
  of that collection is deleted; a content store pointed at the wrong (or an empty) database looks
  exactly like that, and the index is worth more than its garbage.

Each inconsistency's first sighting is kept in the content store (consistency_gaps): a gap seen again
keeps its first time, one not seen again is forgotten, so `oldest_gap_seconds` says how long the oldest
unresolved gap has lasted. A dry run records those sightings too (they are observations, not repairs),
emits the same metrics and stores its report; it only sends and deletes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from aws_lambda_powertools import Logger
from pydantic import ValidationError

from embedsvc.adapters.qdrant import collection_name
from embedsvc.errors import EmbedServiceError
from embedsvc.models.messages import IndexMessage
from embedsvc.services.consistency_metrics import MetricsSink, emit_metrics
from embedsvc.services.merge_join import Finding, Gap, MergeCounts, merge_join
from embedsvc.services.model_config import ModelConfig
from embedsvc.services.repair import Addressed, Progress, index_request, request_source

if TYPE_CHECKING:
    from embedsvc.adapters.content_store import ContentStore, PointState
    from embedsvc.adapters.index_queue import IndexQueue
    from embedsvc.adapters.qdrant import VectorStore
    from embedsvc.config import Settings

logger = Logger(child=True)

AUDIT_ORPHAN_MAX_SHARE = 0.05  # of a collection's live points; above it the audit deletes nothing there
ROWS_PAGE = 5000  # keyset page of content rows
POINTS_PAGE = 5000  # scroll page of point ids and payload fields (no vectors)
SEND_BATCH = 500  # index requests handed to IndexQueue at once (it sends them ten at a time)
ACT_BATCH = 500  # orphan candidates whose rows are read again (texts included) in one query
# Orphan candidates held for after the walk; beyond it, a second walk finds them again (memory stays flat).
MAX_PENDING_ORPHANS = 10_000
GAP_KINDS = (Gap.MISSING, Gap.STALE, Gap.ORPHANED)
PROGRESS_EVERY = 1000


class AuditReportStore(Protocol):
    def put(self, key: str, body: str) -> str:
        """Store `body` under `key`; returns where it went."""
        ...


class S3AuditReports:
    """Audit reports as JSON objects in one bucket."""

    def __init__(self, bucket: str, s3: Any):
        self.bucket = bucket
        self.s3 = s3

    def put(self, key: str, body: str) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body.encode(), ContentType="application/json")
        return f"s3://{self.bucket}/{key}"


def report_key(started: datetime) -> str:
    """audits/{UTC time of the audit's start}.json"""
    at = started.astimezone(UTC) if started.tzinfo else started
    return f"audits/{at.strftime('%Y-%m-%dT%H-%M-%S.%fZ')}.json"


@dataclass
class CollectionAudit:
    collection: str
    content_type: str
    model: str
    counts: MergeCounts = field(default_factory=MergeCounts)
    oldest_gap_seconds: float = 0.0
    queued: int = 0  # missing + stale rows sent for (re)indexing
    tombstone_requests: int = 0  # deleted rows with a live point, sent to become tombstones
    deleted: int = 0  # points deleted from Qdrant (orphans with no row, garbage tombstones)
    queue_failed: int = 0
    safety_valve: str | None = None  # why nothing was deleted, when the valve tripped
    second_walk: bool = False  # more orphans than MAX_PENDING_ORPHANS: acted on during a second walk
    error: str | None = None
    queue_refused: bool = field(default=False, repr=False)  # a whole batch bounced: send no more

    def as_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "content": c.content,
            "points": c.points,
            "missing": c.missing,
            "orphaned": c.orphaned,
            "stale": c.stale,
            "oldest_gap_seconds": round(self.oldest_gap_seconds, 3),
            "tombstones": c.tombstones,
            "deleted_content": c.deleted_content,
            "tombstone_points": c.tombstone_points,
            "queued": self.queued,
            "tombstone_requests": self.tombstone_requests,
            "deleted": self.deleted,
            "queue_failed": self.queue_failed,
            "safety_valve_tripped": self.safety_valve is not None,
            "second_walk": self.second_walk,
            "error": self.error,
        }


@dataclass
class AuditReport:
    started_at: datetime
    dry_run: bool
    orphan_max_share: float
    collections: dict[str, CollectionAudit] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    report_uri: str | None = None
    seconds: float = 0.0

    @property
    def queued(self) -> int:
        return sum(c.queued for c in self.collections.values())

    @property
    def deleted(self) -> int:
        """Orphans removed: deleted from Qdrant, or sent to become tombstones."""
        return sum(c.deleted + c.tombstone_requests for c in self.collections.values())

    @property
    def safety_valve_tripped(self) -> bool:
        return any(c.safety_valve for c in self.collections.values())

    @property
    def ok(self) -> bool:
        """Every collection was walked, nothing was refused by the queue, and the valve held."""
        return not any(c.error or c.queue_failed or c.safety_valve for c in self.collections.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "collections": {name: c.as_dict() for name, c in self.collections.items()},
            "queued": self.queued,
            "deleted": self.deleted,
            "dry_run": self.dry_run,
            "safety_valve": {
                "tripped": self.safety_valve_tripped,
                "max_share": self.orphan_max_share,
                "reasons": [c.safety_valve for c in self.collections.values() if c.safety_valve],
            },
            "ok": self.ok,
            "started_at": self.started_at.isoformat(),
            "seconds": round(self.seconds, 3),
            "report_uri": self.report_uri,
            "notes": list(self.notes),
        }


def _counted(rows: Iterable[PointState], label: str, progress: Progress) -> Iterator[PointState]:
    n = 0
    for row in rows:
        yield row
        n += 1
        if n == PROGRESS_EVERY:
            progress(label, n)
            n = 0
    if n:
        progress(label, n)


class AuditJob:
    def __init__(
        self,
        store: ContentStore,
        vectors: VectorStore,
        queue: IndexQueue,
        reports: AuditReportStore | None,
        settings: Settings,
        metrics: MetricsSink | None,
        *,
        orphan_max_share: float = AUDIT_ORPHAN_MAX_SHARE,
        rows_page: int = ROWS_PAGE,
        points_page: int = POINTS_PAGE,
        max_pending_orphans: int = MAX_PENDING_ORPHANS,
        clock: Callable[[], float] = time.monotonic,
        model_config: ModelConfig | None = None,
    ):
        if not 0 <= orphan_max_share <= 1:
            raise ValueError("orphan_max_share is a share of the live points, in [0, 1]")
        self.store = store
        self.vectors = vectors
        self.queue = queue
        self.reports = reports  # None: the report is not stored (no AUDIT_REPORTS_BUCKET locally)
        self.settings = settings
        self.metrics = metrics
        self.orphan_max_share = orphan_max_share
        self.rows_page = rows_page
        self.points_page = points_page
        self.max_pending_orphans = max_pending_orphans
        self.clock = clock
        self.source = request_source(settings)
        self.model_config = model_config or ModelConfig(settings)

    def run(
        self, content_type: str | None = None, dry_run: bool = False, *, progress: Progress | None = None
    ) -> AuditReport:
        """Audit every collection of every configured content type (or of one); see the module's doc."""
        names = [content_type] if content_type else list(self.settings.content_types)
        for name in names:
            self.store.is_private(name)  # an unknown type is the caller's error, before any work
        begun = self.clock()
        started = self.store.now()  # the database's clock, as consistency_gaps' last_seen
        report = AuditReport(started_at=started, dry_run=dry_run, orphan_max_share=self.orphan_max_share)
        if content_type:
            report.notes.append(f"only {content_type}: the undimensioned metrics cover its collections alone")
        for name in names:
            for model in self.model_config.models_for(name):
                audit = self._audit_collection(name, model, started, dry_run, progress)
                report.collections[audit.collection] = audit
        report.seconds = self.clock() - begun
        self._emit(report)
        self._store(report)
        return report

    def audit_collection(self, content_type: str, model: str, *, dry_run: bool = True) -> CollectionAudit:
        """Audit one collection of a content type (a migration's new one), without the run's report."""
        self.store.is_private(content_type)
        return self._audit_collection(content_type, model, self.store.now(), dry_run, None)

    def _audit_collection(
        self, content_type: str, model: str, started: datetime, dry_run: bool, progress: Progress | None
    ) -> CollectionAudit:
        name = collection_name(content_type, model)
        audit = CollectionAudit(name, content_type, model)
        try:
            pending = self._walk(audit, dry_run, progress)
            self.store.resolve_gaps(name, seen_since=started)  # only after a complete walk
            oldest = self.store.oldest_gap(name)
            if oldest is not None:
                audit.oldest_gap_seconds = max(0.0, (self.store.now() - oldest).total_seconds())
            limit = self.orphan_max_share * max(audit.counts.points, 1)
            if audit.counts.orphaned > limit:
                audit.safety_valve = (
                    f"{audit.counts.orphaned} of {audit.counts.points} live points of {name} look orphaned,"
                    f" more than the {self.orphan_max_share:.1%} allowed: deleted nothing (an empty or wrong"
                    f" content table looks like this; check it, then raise AUDIT_ORPHAN_MAX_SHARE or clean up"
                    f" by hand)"
                )
                logger.error(
                    "audit safety valve tripped", extra={"collection": name, "reason": audit.safety_valve}
                )
            elif not dry_run:
                if pending is None:
                    audit.second_walk = True
                    self._sweep(audit, max_orphans=int(limit))
                else:
                    for start in range(0, len(pending), ACT_BATCH):
                        self._act(audit, pending[start : start + ACT_BATCH])
        except EmbedServiceError as exc:
            audit.error = f"{type(exc).__name__}: {exc.message}"
            logger.error("audit of a collection failed", extra={"collection": name, "reason": audit.error})
        return audit

    def _findings(
        self, audit: CollectionAudit, counts: MergeCounts, progress: Progress | None = None
    ) -> Iterator[Finding[PointState]]:
        rows: Iterable[PointState] = self.store.iter_point_states(audit.content_type, page=self.rows_page)
        if progress is not None:
            rows = _counted(rows, audit.collection, progress)
        if self.vectors.exists(audit.collection):
            points: Iterable[tuple[str, dict[str, Any]]] = self.vectors.scroll_ids(
                audit.collection, page=self.points_page
            )
        else:  # never written: every live row is missing
            points = ()
        return merge_join(rows, points, counts)

    def _walk(
        self, audit: CollectionAudit, dry_run: bool, progress: Progress | None
    ) -> list[tuple[str, Gap]] | None:
        """Count, record gaps and queue missing + stale rows; returns the orphan candidates (None: too many)."""
        gaps: dict[str, str] = {}
        since: dict[str, datetime] = {}  # when each gap's row last changed: the gap is at least that old
        to_index: list[PointState] = []
        pending: list[tuple[str, Gap]] | None = []
        for finding in self._findings(audit, audit.counts, progress):
            gap = finding.gap
            if gap is not Gap.TOMBSTONE:
                gaps[finding.point_id] = gap.value
                if finding.row is not None and finding.row.updated_at is not None:
                    since[finding.point_id] = finding.row.updated_at
                if len(gaps) >= self.rows_page:
                    self.store.record_gaps(audit.collection, gaps, since)
                    gaps, since = {}, {}
            if dry_run:
                continue
            if gap is Gap.MISSING or gap is Gap.STALE:
                assert finding.row is not None
                to_index.append(finding.row)
                if len(to_index) >= SEND_BATCH:
                    self._send(audit, to_index, "queued")
                    to_index = []
            elif pending is not None:
                if len(pending) >= self.max_pending_orphans:
                    pending = None  # found again by a second walk, if the valve lets it act
                else:
                    pending.append((finding.point_id, gap))
        self.store.record_gaps(audit.collection, gaps, since)
        self._send(audit, to_index, "queued")
        return pending

    def _sweep(self, audit: CollectionAudit, *, max_orphans: int) -> None:
        """The second walk: act on orphans as they are found again, at most `max_orphans` of them."""
        batch: list[tuple[str, Gap]] = []
        orphans = 0
        for finding in self._findings(audit, MergeCounts()):  # counts of the first walk stand
            if finding.gap is Gap.TOMBSTONE or (finding.gap is Gap.ORPHANED and orphans < max_orphans):
                orphans += finding.gap is Gap.ORPHANED
                batch.append((finding.point_id, finding.gap))
                if len(batch) >= ACT_BATCH:
                    self._act(audit, batch)
                    batch = []
        self._act(audit, batch)

    def _act(self, audit: CollectionAudit, candidates: Sequence[tuple[str, Gap]]) -> None:
        """Delete or tombstone orphan candidates whose rows still say so."""
        if not candidates:
            return
        rows = self.store.rows_by_point(audit.content_type, [pid for pid, _ in candidates])
        to_delete: list[str] = []
        to_tombstone: list[Addressed] = []
        for pid, gap in candidates:
            row = rows.get(pid)
            if row is None:
                to_delete.append(pid)
            elif row.deleted and gap is Gap.ORPHANED:
                to_tombstone.append(row)
            # else: the row was written since the walk saw the id; the write path indexes it
        self.vectors.delete(audit.collection, to_delete)
        audit.deleted += len(to_delete)
        self._send(audit, to_tombstone, "tombstone_requests")

    def _send(self, audit: CollectionAudit, rows: Sequence[Addressed], what: str) -> None:
        messages: list[IndexMessage] = []
        for row in rows:
            try:
                messages.append(index_request(audit.content_type, row, [audit.model], self.source))
            except ValidationError:
                audit.queue_failed += 1
        if not messages:
            return
        if audit.queue_refused:  # the queue is down: do not wait on it for every batch of the walk
            audit.queue_failed += len(messages)
            return
        unsent = len(self.queue.send(messages))
        audit.queue_refused = unsent == len(messages)
        setattr(audit, what, getattr(audit, what) + len(messages) - unsent)
        audit.queue_failed += unsent

    def _emit(self, report: AuditReport) -> None:
        walked = [c for c in report.collections.values() if c.error is None]
        for audit in walked:
            emit_metrics(self.metrics, self._values(audit), {"Collection": audit.collection})
        if walked:
            totals = {
                name: (max(self._values(a)[name][0] for a in walked), unit)
                for name, (_, unit) in self._values(walked[0]).items()
            }
            emit_metrics(self.metrics, totals)

    @staticmethod
    def _values(audit: CollectionAudit) -> dict[str, tuple[float, str]]:
        return {
            "ConsistencyMissing": (audit.counts.missing, "Count"),
            "ConsistencyOrphaned": (audit.counts.orphaned, "Count"),
            "ConsistencyStale": (audit.counts.stale, "Count"),
            "ConsistencyOldestGapSeconds": (round(audit.oldest_gap_seconds, 3), "Seconds"),
            "AuditSafetyValveTripped": (1 if audit.safety_valve else 0, "Count"),
        }

    def _store(self, report: AuditReport) -> None:
        if self.reports is None:
            report.notes.append("AUDIT_REPORTS_BUCKET is not set: the report was not stored")
            return
        key = report_key(report.started_at)
        try:
            body = {k: v for k, v in report.as_dict().items() if k != "report_uri"}  # it is where it lies
            report.report_uri = self.reports.put(key, json.dumps(body, indent=1))
        except Exception as exc:  # the audit's work is done; a lost report is logged, never a failed audit
            report.notes.append(f"storing the report under {key} failed: {type(exc).__name__}")
            logger.error("audit report not stored", extra={"key": key, "error": repr(exc)[:300]})


__all__ = [
    "AUDIT_ORPHAN_MAX_SHARE",
    "AuditJob",
    "AuditReport",
    "AuditReportStore",
    "CollectionAudit",
    "S3AuditReports",
    "report_key",
]
