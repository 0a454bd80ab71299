"""The hourly repair: every row changed since the last checkpoint is checked against each of its collections.

The write path commits a row first and writes its vectors after; when that second step and its queued
fallback both fail, the row is still committed, stamped by Postgres with its change time. This job walks
the rows changed in [checkpoint - overlap, run start) by change time and asks Qdrant, one call per page
and collection, what their points hold. A live row whose point is missing, holds other text or an older
version, and a deleted row whose point is still live, get an index request by id on IndexQueue.

Deleted rows are not removed from Qdrant here: the request by id makes the worker read the row, see it
deleted and write the tombstone with the delete's version through the same version-conditional write
as every other. One writer of points, and the tombstone stays to refuse any older write still in flight
(a direct delete would leave nothing to compare such a write against).

The overlap covers transactions that took their change time before the last run's start but committed
after it: their rows were invisible to that run. Checking a row twice costs a Qdrant lookup, never a
wrong write. The checkpoint moves to the run's start only when every page was checked and every request
was sent; otherwise it stays, and the next run checks the same window again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from aws_lambda_powertools import Logger
from pydantic import ValidationError

from embedsvc.adapters.qdrant import collection_name
from embedsvc.errors import EmbedServiceError
from embedsvc.models.messages import IndexMessage
from embedsvc.services.consistency_metrics import MetricsSink, emit_metrics
from embedsvc.services.merge_join import compare
from embedsvc.services.model_config import ModelConfig

if TYPE_CHECKING:
    from embedsvc.adapters.content_store import ContentStore, PointState
    from embedsvc.adapters.index_queue import IndexQueue
    from embedsvc.adapters.qdrant import VectorStore
    from embedsvc.config import Settings

logger = Logger(child=True)

DEFAULT_OVERLAP = timedelta(minutes=10)
DEFAULT_PAGE = 1000
REPAIR_SOURCE = "repair"

# (label, items done since the last call): the CLI draws progress bars with it.
Progress = Callable[[str, int], None]


def request_source(settings: Settings) -> str:
    """The cost center of repair requests: `repair`, or `reindex` where `repair` is not an allowed source."""
    return REPAIR_SOURCE if REPAIR_SOURCE in settings.cost_sources else "reindex"


class Addressed(Protocol):
    """What names a row in a request: its id and owner (a PointState or a ContentRow)."""

    @property
    def id(self) -> str: ...
    @property
    def owner_id(self) -> str | None: ...


def index_request(content_type: str, row: Addressed, models: list[str], source: str) -> IndexMessage:
    """An index request by id: the worker reads the current row (live: embeds it; deleted: tombstones it)."""
    return IndexMessage(
        content_type=content_type,
        id=row.id,
        owner_id=row.owner_id,
        source=source,
        priority="bulk",
        models=models,
    )


@dataclass
class CollectionRepair:
    checked: int = 0
    queued: int = 0  # live rows sent for (re)indexing
    deleted: int = 0  # deleted rows whose live point was sent to become a tombstone
    failed: int = 0  # requests that could not be built or sent

    def as_dict(self) -> dict[str, int]:
        return {
            "checked": self.checked,
            "queued": self.queued,
            "deleted": self.deleted,
            "failed": self.failed,
        }


@dataclass
class ContentTypeRepair:
    content_type: str
    since: datetime | None
    until: datetime | None = None
    checkpoint_advanced: bool = False
    complete: bool = True  # False: the run's time ran out; the checkpoint moved to the last page checked
    error: str | None = None
    collections: dict[str, CollectionRepair] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "checkpoint_advanced": self.checkpoint_advanced,
            "complete": self.complete,
            "error": self.error,
            "collections": {name: c.as_dict() for name, c in self.collections.items()},
        }


@dataclass
class RepairReport:
    content_types: dict[str, ContentTypeRepair] = field(default_factory=dict)
    seconds: float = 0.0

    def _total(self, what: str) -> int:
        return sum(getattr(c, what) for t in self.content_types.values() for c in t.collections.values())

    @property
    def ok(self) -> bool:
        """Every content type was checked through and its checkpoint moved."""
        return all(t.checkpoint_advanced for t in self.content_types.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "content_types": {name: t.as_dict() for name, t in self.content_types.items()},
            "checked": self._total("checked"),
            "queued": self._total("queued"),
            "deleted": self._total("deleted"),
            "failed": self._total("failed"),
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
        }


class RepairJob:
    def __init__(
        self,
        store: ContentStore,
        vectors: VectorStore,
        queue: IndexQueue,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        *,
        metrics: MetricsSink | None = None,
        overlap: timedelta = DEFAULT_OVERLAP,
        page: int = DEFAULT_PAGE,
        model_config: ModelConfig | None = None,
    ):
        self.store = store
        self.model_config = model_config or ModelConfig(settings)
        self.vectors = vectors
        self.queue = queue
        self.settings = settings
        self.clock = clock  # measures the run's duration only: change times come from Postgres's clock
        self.metrics = metrics
        self.overlap = overlap
        self.page = page
        self._deadline: float | None = None
        self.source = request_source(settings)
        if self.source != REPAIR_SOURCE:
            logger.warning("'repair' is not in COST_SOURCES; repair requests are sent as 'reindex'")

    def run(
        self,
        content_type: str | None = None,
        *,
        progress: Progress | None = None,
        deadline: float | None = None,
    ) -> RepairReport:
        """Check every configured content type (or one), each on its own checkpoint.

        `deadline` (time.monotonic) is when the run must stop: a first run over millions of rows, or the
        backlog after a long outage, may not fit one invocation. The checkpoint then moves to the change
        time of the last page checked, so the next run goes on from there instead of starting over.
        """
        self._deadline = deadline
        started = self.clock()
        report = RepairReport()
        names = [content_type] if content_type else list(self.settings.content_types)
        for name in names:
            self.store.is_private(name)  # an unknown type is the caller's error, before any work
            report.content_types[name] = self._repair(name, progress)
        report.seconds = self.clock() - started
        self._emit(report)
        return report

    def _repair(self, content_type: str, progress: Progress | None) -> ContentTypeRepair:
        models = self.model_config.models_for(content_type)
        collections = {model: collection_name(content_type, model) for model in models}
        result = ContentTypeRepair(content_type, since=None)
        result.collections = {name: CollectionRepair() for name in collections.values()}
        try:
            progress_so_far = self.store.repair_progress(content_type)
            if progress_so_far is None:
                result.since = None  # the first run checks everything
            else:
                checkpoint, complete = progress_so_far
                # A complete run's checkpoint is "now" then: a transaction open at that moment may commit
                # rows stamped before it, hence the overlap. A partial one lies in the past: resume there.
                result.since = checkpoint - self.overlap if complete else checkpoint
            result.until = until = self.store.now()
            # A collection that does not exist yet holds nothing: its rows are all missing (asking would fail).
            present = {model: self.vectors.exists(name) for model, name in collections.items()}
            for rows in self.store.iter_changed(content_type, result.since, until, page=self.page):
                unsent = self._repair_page(content_type, rows, collections, present, result)
                if progress is not None:
                    progress(content_type, len(rows))
                if unsent:
                    # The queue is refusing: stop here rather than push every page at it; the window stays.
                    result.error = f"IndexQueue did not take {unsent} request(s); checkpoint left in place"
                    break
                more = len(rows) == self.page  # a short page is the window's last
                if (
                    more
                    and self._deadline is not None
                    and time.monotonic() >= self._deadline
                    and rows[-1].updated_at
                ):
                    # Rows are in change-time order: everything up to this page's last time was checked; the
                    # next run starts at that time (inclusive, so a row or two is checked twice, harmlessly).
                    result.until, result.complete = rows[-1].updated_at, False
                    break
        except EmbedServiceError as exc:
            result.error = f"{type(exc).__name__}: {exc.message}"
        if result.error is None:
            assert result.until is not None
            self.store.set_repair_checkpoint(content_type, result.until, complete=result.complete)
            result.checkpoint_advanced = True
        else:
            logger.error(
                "repair left the checkpoint", extra={"content_type": content_type, "reason": result.error}
            )
        return result

    def _repair_page(
        self,
        content_type: str,
        rows: list[PointState],
        collections: dict[str, str],
        present: dict[str, bool],
        result: ContentTypeRepair,
    ) -> int:
        """Check one page against every collection and send its requests; returns how many were not sent."""
        ids = [row.point_id for row in rows]
        needs: dict[str, list[str]] = {}  # point id -> model keys whose collection must change
        for model, name in collections.items():
            payloads = self.vectors.payloads(name, ids) if present[model] else {}
            counts = result.collections[name]
            for row in rows:
                counts.checked += 1
                gap = compare(row, payloads.get(row.point_id))
                if gap is not None:
                    needs.setdefault(row.point_id, []).append(model)
        by_id = {row.point_id: row for row in rows}
        messages: list[IndexMessage] = []
        sent_for: list[PointState] = []
        failed = 0
        for pid, wanted in needs.items():
            row = by_id[pid]
            try:
                messages.append(index_request(content_type, row, wanted, self.source))
            except (
                ValidationError
            ) as exc:  # a row the message schema cannot carry: counted, never retried here
                logger.error(
                    "cannot build a repair request", extra={"point_id": pid, "error": str(exc)[:200]}
                )
                self._count(result, row, wanted, collections, "failed")
                failed += 1
                continue
            sent_for.append(row)
        unsent = set(self.queue.send(messages)) if messages else set()
        for i, (message, row) in enumerate(zip(messages, sent_for, strict=True)):
            outcome = "failed" if i in unsent else ("deleted" if row.deleted else "queued")
            self._count(result, row, list(message.models or []), collections, outcome)
        if failed:
            # It can never be sent as written; blocking the checkpoint on it would re-check forever.
            logger.error("repair requests that cannot be built", extra={"count": failed})
        return len(unsent)

    @staticmethod
    def _count(
        result: ContentTypeRepair, row: PointState, models: list[str], collections: dict[str, str], what: str
    ) -> None:
        for model in models:
            counts = result.collections[collections[model]]
            setattr(counts, what, getattr(counts, what) + 1)

    def _emit(self, report: RepairReport) -> None:
        totals = {"RepairQueued": 0, "RepairDeleted": 0, "RepairFailed": 0, "RepairErrors": 0}
        for content_type, result in report.content_types.items():
            values = {
                "RepairQueued": sum(c.queued for c in result.collections.values()),
                "RepairDeleted": sum(c.deleted for c in result.collections.values()),
                "RepairFailed": sum(c.failed for c in result.collections.values()),
                "RepairErrors": 0 if result.checkpoint_advanced else 1,  # the checkpoint stayed
            }
            for key, value in values.items():
                totals[key] += value
            emit_metrics(
                self.metrics, {k: (v, "Count") for k, v in values.items()}, {"ContentType": content_type}
            )
        emit_metrics(self.metrics, {k: (v, "Count") for k, v in totals.items()})


__all__ = ["DEFAULT_OVERLAP", "RepairJob", "RepairReport", "index_request", "request_source"]
