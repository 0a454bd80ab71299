"""The indexing worker: a batch of IndexQueue messages in, vectors in Qdrant out, a verdict per message.

A message is reported done only after Qdrant has confirmed its write (wait=True). Transient failures
(provider 429/5xx, Qdrant down, ledger down) are returned for SQS to redeliver; a message that can
never succeed is sent to the DLQ at once with its reason and acknowledged; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aws_lambda_powertools import Logger
from pydantic import ValidationError

from embedsvc.adapters.content_store import ContentRow, ContentStore, content_point_id
from embedsvc.adapters.qdrant import Point, VectorStore, collection_name, point_id
from embedsvc.config import Settings
from embedsvc.errors import BudgetExceeded, EmbedServiceError, PermanentMessageError
from embedsvc.models.messages import SUPPORTED_SCHEMA_VERSIONS, IndexMessage
from embedsvc.observability import CallContext
from embedsvc.services.embedding import EmbeddingService
from embedsvc.services.index_points import live_payload, tombstone_payload
from embedsvc.services.index_points import tombstone_vector as tombstone_vector
from embedsvc.services.model_config import ModelConfig
from embedsvc.services.ratelimit import Lane

logger = Logger(child=True)


@dataclass(frozen=True)
class Incoming:
    """One queue message as the event source delivers it."""

    message_id: str
    body: str
    sent_at_ms: int | None = None  # SQS SentTimestamp: the version of a message that carries no updated_at


@dataclass
class BatchOutcome:
    retry: list[str] = field(default_factory=list)  # message ids for batchItemFailures
    dead_lettered: dict[str, str] = field(default_factory=dict)  # message id -> reason
    indexed: int = 0
    deleted: int = 0
    unchanged: int = 0  # same content hash already in the collection: no provider call
    refreshed: int = 0  # same text, new owner/metadata/version: payload rewritten, no provider call
    stale: int = 0  # an older update than what the collection holds: never overwrites
    superseded: int = 0  # a newer message for the same content and collection came in the same batch


@dataclass
class _Unit:
    """One message's work in one collection."""

    message_id: str
    message: IndexMessage
    model_key: str
    collection: str
    point_id: str
    updated_at_ms: int  # the ordering key: Postgres's row version when `row` is set, else a time in ms
    row: ContentRow | None = None  # the content store's current row: the truth this unit indexes

    @property
    def version_field(self) -> str:
        return "version" if self.row is not None else "updated_at"

    def stored_version(self, payload: dict | None) -> int:
        """The stored point's version on this unit's scale (-1 when there is no point)."""
        if payload is None:
            return -1
        return int(payload.get(self.version_field) or 0)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PermanentError(PermanentMessageError):
    """This message can never succeed as written."""


def parse_message(
    body: str, settings: Settings, *, stored_types: frozenset[str] = frozenset()
) -> IndexMessage:
    """A validated message, or PermanentError with a reason a producer can act on.

    For `stored_types` (content types the content store holds) a message names content by id: its
    text, if any, is ignored, since the row is the truth.
    """
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise PermanentError(f"body is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise PermanentError("body must be a JSON object")
    version = raw.get("schema_version", 1)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise PermanentError(
            f"unsupported schema_version {version!r}; supported: {list(SUPPORTED_SCHEMA_VERSIONS)}"
        )
    try:
        message = IndexMessage.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise PermanentError(f"invalid message: {problems}") from exc
    if not message.delete and message.content_type not in stored_types:
        if message.text is None:
            raise PermanentError("text is required: no content store is configured to load it from")
        if not message.text.strip():
            raise PermanentError("text is empty")
    if message.source not in settings.cost_sources:
        raise PermanentError(f"unknown source {message.source!r}; allowed: {settings.cost_sources}")
    for key in message.models or []:
        if key not in settings.registry.models:
            raise PermanentError(f"unknown model {key!r}; registered: {sorted(settings.registry.models)}")
    return message


class Indexer:
    def __init__(
        self,
        settings: Settings,
        embeddings: EmbeddingService,
        vectors: VectorStore,
        dead_letter: Callable[[list[tuple[Incoming, str]]], list[str]],
        clock: Callable[[], float] = time.time,
        store: ContentStore | None = None,
        model_config: ModelConfig | None = None,
    ):
        self.settings = settings
        self.model_config = model_config or ModelConfig(settings)
        self.embeddings = embeddings
        self.vectors = vectors
        self.dead_letter = (
            dead_letter  # sends (message, reason) pairs to the DLQ; returns ids it could not send
        )
        self.clock = clock
        # With a content store, messages for its content types are requests by id: the worker reads the
        # current row (a stale message indexes the current text; a deleted row leaves a tombstone).
        self.store = store
        self.stored_types = frozenset(store.content_types) if store is not None else frozenset()

    def process(self, batch: Sequence[Incoming], *, deadline: float | None = None) -> BatchOutcome:
        """Index a batch; the outcome says which messages to retry and which went to the DLQ.

        `deadline` (time.monotonic) is when the invocation must answer: work not started by then is
        returned for redelivery instead of being cut off by the Lambda timeout.
        """
        outcome = BatchOutcome()
        poison: list[tuple[Incoming, str]] = []
        parsed: list[tuple[Incoming, IndexMessage]] = []
        for incoming in batch:
            try:
                parsed.append(
                    (incoming, parse_message(incoming.body, self.settings, stored_types=self.stored_types))
                )
            except PermanentError as exc:
                poison.append((incoming, exc.message))
        failed: dict[str, str] = {}  # message id -> transient reason
        permanent: dict[str, str] = {}  # message id -> why it can never succeed
        # Poison goes to the DLQ first, so a timeout later in the batch cannot keep it from its reason.
        self._dead_letter(poison, failed, outcome)

        now_ms = int(self.clock() * 1000)
        rows = self._current_rows(parsed, failed, permanent)
        latest: dict[tuple[str, str], _Unit] = {}
        for incoming, message in parsed:
            if incoming.message_id in failed or incoming.message_id in permanent:
                continue
            row: ContentRow | None = None
            if message.content_type in self.stored_types:
                row = rows[incoming.message_id]
                message = self._as_row(message, row)
                version = row.version
                pid = row.point_id
            else:
                version = (
                    message.updated_at_epoch_ms() if message.updated_at else (incoming.sent_at_ms or now_ms)
                )
                pid = point_id(message.content_type, message.id)
            for model_key in self._target_models(message):
                unit = _Unit(
                    incoming.message_id,
                    message,
                    model_key,
                    collection_name(message.content_type, model_key),
                    pid,
                    version,
                    row,
                )
                # Newest wins per (collection, point): a message aimed at other collections is not superseded.
                key = (unit.collection, unit.point_id)
                if key in latest:
                    outcome.superseded += 1
                    if latest[key].updated_at_ms > unit.updated_at_ms:
                        continue
                latest[key] = unit
        self._index(list(latest.values()), failed, permanent, outcome, deadline)

        if permanent:
            by_id = {incoming.message_id: incoming for incoming, _ in parsed}
            late = [(by_id[mid], reason) for mid, reason in permanent.items() if mid not in failed]
            self._dead_letter(late, failed, outcome)
        outcome.retry = [m.message_id for m in batch if m.message_id in failed]
        for message_id, reason in failed.items():
            logger.info("message will be retried", extra={"message_id": message_id, "reason": reason})
        return outcome

    def _target_models(self, message: IndexMessage) -> list[str]:
        """The models to index a message into: the content type's (active, shadow), or those it names.

        For stored content, named models outside the content type's current ones are dropped: they are
        requests of a migration that has ended since (a backfill refused, rolled back or aborted), and
        indexing them would bring its dropped collection back. Evaluation corpora name theirs freely.
        """
        current = self.model_config.models_for(message.content_type)
        if not message.models:
            return current
        if message.content_type not in self.stored_types:
            return list(message.models)
        kept = [key for key in message.models if key in current]
        if len(kept) < len(message.models):
            logger.info(
                "index request for a model no longer indexing its content type: skipped",
                extra={"content_type": message.content_type, "models": message.models, "current": current},
            )
        return kept

    def _current_rows(
        self,
        parsed: list[tuple[Incoming, IndexMessage]],
        failed: dict[str, str],
        permanent: dict[str, str],
    ) -> dict[str, ContentRow]:
        """The current row of each by-id message (message id -> row), one query per content type."""
        wanted: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for incoming, message in parsed:
            if message.content_type in self.stored_types:
                assert self.store is not None
                owner = message.owner_id if self.store.is_private(message.content_type) else None
                pid = content_point_id(message.content_type, message.id, owner)
                wanted[message.content_type][pid].append(incoming.message_id)
        found: dict[str, ContentRow] = {}
        for content_type, by_point in wanted.items():
            assert self.store is not None
            try:
                rows = self.store.rows_by_point(content_type, list(by_point))
            except EmbedServiceError as exc:
                for message_ids in by_point.values():
                    failed.update({mid: exc.message for mid in message_ids})
                continue
            for pid, message_ids in by_point.items():
                for mid in message_ids:
                    if pid in rows:
                        found[mid] = rows[pid]
                    else:
                        permanent[mid] = (
                            f"no {content_type} with this id (and owner, for private types) in the content store"
                        )
        return found

    @staticmethod
    def _as_row(message: IndexMessage, row: ContentRow) -> IndexMessage:
        """The message as the row says it is now: its text, owner, metadata, and whether it is deleted."""
        return message.model_copy(
            update={
                "text": row.text,
                "owner_id": row.owner_id,
                "metadata": row.metadata,
                "delete": row.deleted,
            }
        )

    def _dead_letter(
        self, items: list[tuple[Incoming, str]], failed: dict[str, str], outcome: BatchOutcome
    ) -> None:
        if not items:
            return
        unsent = set(self.dead_letter(items))
        for incoming, reason in items:
            if incoming.message_id in unsent:
                failed[incoming.message_id] = (
                    "could not reach the DLQ"  # retried; SQS redrive is the backstop
                )
            else:
                outcome.dead_lettered[incoming.message_id] = reason
                logger.warning(
                    "message sent to DLQ", extra={"message_id": incoming.message_id, "reason": reason}
                )

    def _index(
        self,
        units: list[_Unit],
        failed: dict[str, str],
        permanent: dict[str, str],
        outcome: BatchOutcome,
        deadline: float | None,
    ) -> None:
        def out_of_time(members: list[_Unit]) -> bool:
            if deadline is not None and time.monotonic() >= deadline:
                failed.update({u.message_id: "out of time in this invocation" for u in members})
                return True
            return False

        by_collection: dict[str, list[_Unit]] = defaultdict(list)
        for unit in units:
            by_collection[unit.collection].append(unit)
        to_embed: dict[tuple[str, Lane], list[_Unit]] = defaultdict(list)
        refresh: dict[str, list[_Unit]] = defaultdict(list)
        tombstones: dict[str, list[_Unit]] = defaultdict(list)
        skipped: dict[str, list[_Unit]] = defaultdict(list)  # model key -> units whose text is already there
        for collection, members in by_collection.items():
            model = self.settings.registry.models[members[0].model_key]
            try:
                self.vectors.ensure_collection(collection, model.dimensions)
                content_type = members[0].message.content_type
                if (
                    content_type in self.stored_types
                    and members[0].model_key == self.model_config.get(content_type).active
                ):
                    self.vectors.ensure_alias(content_type, collection)  # searches read the alias
                stored = self.vectors.payloads(collection, [u.point_id for u in members])
            except EmbedServiceError as exc:
                failed.update({u.message_id: exc.message for u in members})
                continue
            for unit in members:
                existing = stored.get(unit.point_id)
                stored_version = unit.stored_version(existing)
                if stored_version > unit.updated_at_ms:
                    outcome.stale += 1
                elif (
                    unit.message.delete
                    and existing
                    and existing.get("deleted")
                    and unit.row is not None
                    and stored_version >= unit.updated_at_ms
                ):
                    # The tombstone of this version is there. An older one is rewritten at this version:
                    # a write-through save still in flight (an older version) could otherwise land over it.
                    outcome.unchanged += 1
                elif unit.message.delete:
                    # A tombstone, not a removal: it remembers the delete's version, so an older
                    # update delivered late cannot bring the content back.
                    tombstones[collection].append(unit)
                elif existing and existing.get("content_hash") == content_hash(unit.message.text or ""):
                    skipped[unit.model_key].append(unit)
                    if stored_version == unit.updated_at_ms and self._same_payload(existing, unit):
                        outcome.unchanged += 1
                    else:
                        refresh[collection].append(
                            unit
                        )  # new owner/metadata/version, same text: no embedding
                else:
                    lane = Lane.REALTIME if unit.message.priority == "realtime" else Lane.BULK
                    to_embed[(unit.model_key, lane)].append(unit)

        for model_key, members in skipped.items():
            # Content-hash skips cost nothing: recorded as saved, to their messages' owners.
            self.embeddings.record_skipped(
                [u.message.text or "" for u in members], model_key, [self._cost_context(u) for u in members]
            )
        ready: dict[str, list[Point]] = defaultdict(list)
        for (model_key, lane), members in to_embed.items():
            if out_of_time(members):
                continue
            contexts = [self._cost_context(u) for u in members]
            try:
                result = self.embeddings.embed_partial(
                    [u.message.text or "" for u in members],
                    model_key,
                    contexts=contexts,
                    lane=lane,
                    truncate=True,
                    use_cache=self.settings.worker_use_cache,
                    deadline=deadline,
                )
            except EmbedServiceError as exc:
                target = failed if exc.retryable else permanent
                target.update({u.message_id: self._reason(exc) for u in members})
                continue
            for index, unit in enumerate(members):
                if index in result.errors:
                    error = result.errors[index]
                    (failed if error.retryable else permanent)[unit.message_id] = self._reason(error)
                    continue
                ready[unit.collection].append(
                    Point(unit.point_id, result.vectors[index], self._payload(unit))
                )
        for collection, points in ready.items():
            by_point = {u.point_id: u.message_id for u in by_collection[collection]}
            if deadline is not None and time.monotonic() >= deadline:
                failed.update({by_point[p.id]: "out of time before the vector write" for p in points})
                continue
            try:
                self._write(collection, points)
                outcome.indexed += len(points)
            except EmbedServiceError as exc:
                failed.update({by_point[p.id]: exc.message for p in points})
        for collection, members in refresh.items():
            try:
                versioned = [u for u in members if u.row is not None]
                if versioned:
                    # Conditional on the stored version, like every write of store-backed content.
                    self.vectors.overwrite_payloads_if_newer(
                        collection, {u.point_id: self._payload(u) for u in versioned}
                    )
                legacy = {u.point_id: self._payload(u) for u in members if u.row is None}
                self.vectors.set_payloads(collection, legacy)
                outcome.refreshed += len(members)
            except EmbedServiceError as exc:
                failed.update({u.message_id: exc.message for u in members})
        for collection, entries in tombstones.items():
            dimensions = self.settings.registry.models[entries[0].model_key].dimensions
            try:
                # The whole point is replaced, vector included: a tombstone must not keep the embedding of
                # content its owner deleted.
                self._write(
                    collection,
                    [Point(u.point_id, tombstone_vector(dimensions), self._tombstone(u)) for u in entries],
                )
                outcome.deleted += len(entries)
            except EmbedServiceError as exc:
                failed.update({u.message_id: exc.message for u in entries})

    @staticmethod
    def _reason(error: EmbedServiceError) -> str:
        """Why a message failed; a budget's refusal leads with `budget_exceeded`, so the DLQ can be filtered
        on it (it is dead-lettered at once, not retried until SQS gives up: raise the budget, then redrive)."""
        return f"{error.code}: {error.message}" if isinstance(error, BudgetExceeded) else error.message

    @staticmethod
    def _cost_context(unit: _Unit) -> CallContext:
        """Who pays for a unit: its message's source and task, and the content's owner as tenant and user."""
        return CallContext(
            source=unit.message.source,
            user_id=unit.message.owner_id,
            tenant_id=unit.message.owner_id,
            task_id=unit.message.task_id,
        )

    def _write(self, collection: str, points: list[Point]) -> None:
        """Store-backed points are written only over older versions (closing the read-then-write race)."""
        versioned = [p for p in points if "version" in p.payload]
        if versioned:
            self.vectors.upsert_if_newer(collection, versioned)
        self.vectors.upsert(collection, [p for p in points if "version" not in p.payload])

    def _payload(self, unit: _Unit) -> dict:
        if unit.row is not None:
            return live_payload(unit.row, unit.model_key, int(self.clock() * 1000))
        return {
            "id": unit.message.id,
            "content_type": unit.message.content_type,
            "owner_id": unit.message.owner_id,
            "content_hash": content_hash(unit.message.text or ""),
            "model": unit.model_key,
            "updated_at": unit.updated_at_ms,
            "indexed_at": int(self.clock() * 1000),
            "metadata": unit.message.metadata,
            "deleted": False,
        }

    def _tombstone(self, unit: _Unit) -> dict:
        if unit.row is not None:
            return tombstone_payload(unit.row, unit.model_key, int(self.clock() * 1000))
        return {
            "id": unit.message.id,
            "content_type": unit.message.content_type,
            "owner_id": unit.message.owner_id,
            "content_hash": None,
            "model": unit.model_key,
            "updated_at": unit.updated_at_ms,
            "indexed_at": int(self.clock() * 1000),
            "deleted": True,
        }

    @staticmethod
    def _same_payload(existing: dict, unit: _Unit) -> bool:
        return (
            existing.get("owner_id") == unit.message.owner_id
            and existing.get("metadata") == unit.message.metadata
            and not existing.get("deleted")
        )
