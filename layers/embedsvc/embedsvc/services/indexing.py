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

from embedsvc.adapters.qdrant import Point, VectorStore, collection_name, point_id
from embedsvc.config import Settings
from embedsvc.errors import EmbedServiceError, PermanentMessageError
from embedsvc.models.messages import SUPPORTED_SCHEMA_VERSIONS, IndexMessage
from embedsvc.observability import CallContext
from embedsvc.services.embedding import EmbeddingService
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
    updated_at_ms: int


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PermanentError(PermanentMessageError):
    """This message can never succeed as written."""


def parse_message(body: str, settings: Settings) -> IndexMessage:
    """A validated message, or PermanentError with a reason a producer can act on."""
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
    if not message.delete:
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


def tombstone_vector(dimensions: int) -> list[float]:
    """Any valid vector: a tombstone is never searched (search filters `deleted`), only compared by version."""
    return [1.0] + [0.0] * (dimensions - 1)


class Indexer:
    def __init__(
        self,
        settings: Settings,
        embeddings: EmbeddingService,
        vectors: VectorStore,
        dead_letter: Callable[[list[tuple[Incoming, str]]], list[str]],
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.embeddings = embeddings
        self.vectors = vectors
        self.dead_letter = (
            dead_letter  # sends (message, reason) pairs to the DLQ; returns ids it could not send
        )
        self.clock = clock

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
                parsed.append((incoming, parse_message(incoming.body, self.settings)))
            except PermanentError as exc:
                poison.append((incoming, exc.message))
        failed: dict[str, str] = {}  # message id -> transient reason
        permanent: dict[str, str] = {}  # message id -> why it can never succeed
        # Poison goes to the DLQ first, so a timeout later in the batch cannot keep it from its reason.
        self._dead_letter(poison, failed, outcome)

        now_ms = int(self.clock() * 1000)
        latest: dict[tuple[str, str], _Unit] = {}
        for incoming, message in parsed:
            version = message.updated_at_epoch_ms() if message.updated_at else (incoming.sent_at_ms or now_ms)
            for model_key in message.models or self.settings.models_for(message.content_type):
                unit = _Unit(
                    incoming.message_id,
                    message,
                    model_key,
                    collection_name(message.content_type, model_key),
                    point_id(message.content_type, message.id),
                    version,
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
        for collection, members in by_collection.items():
            model = self.settings.registry.models[members[0].model_key]
            try:
                self.vectors.ensure_collection(collection, model.dimensions)
                stored = self.vectors.payloads(collection, [u.point_id for u in members])
            except EmbedServiceError as exc:
                failed.update({u.message_id: exc.message for u in members})
                continue
            for unit in members:
                existing = stored.get(unit.point_id)
                stored_version = int(existing.get("updated_at", 0)) if existing else -1
                if stored_version > unit.updated_at_ms:
                    outcome.stale += 1
                elif unit.message.delete:
                    # A tombstone, not a removal: it remembers the delete's version, so an older
                    # update delivered late cannot bring the content back.
                    tombstones[collection].append(unit)
                elif existing and existing.get("content_hash") == content_hash(unit.message.text or ""):
                    if stored_version == unit.updated_at_ms and self._same_payload(existing, unit):
                        outcome.unchanged += 1
                    else:
                        refresh[collection].append(
                            unit
                        )  # new owner/metadata/version, same text: no embedding
                else:
                    lane = Lane.REALTIME if unit.message.priority == "realtime" else Lane.BULK
                    to_embed[(unit.model_key, lane)].append(unit)

        ready: dict[str, list[Point]] = defaultdict(list)
        for (model_key, lane), members in to_embed.items():
            if out_of_time(members):
                continue
            contexts = [
                CallContext(
                    source=u.message.source,
                    user_id=u.message.owner_id,
                    tenant_id=u.message.owner_id,
                    task_id=u.message.task_id,
                )
                for u in members
            ]
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
                target.update({u.message_id: exc.message for u in members})
                continue
            for index, unit in enumerate(members):
                if index in result.errors:
                    error = result.errors[index]
                    (failed if error.retryable else permanent)[unit.message_id] = error.message
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
                self.vectors.upsert(collection, points)
                outcome.indexed += len(points)
            except EmbedServiceError as exc:
                failed.update({by_point[p.id]: exc.message for p in points})
        for collection, members in refresh.items():
            try:
                self.vectors.set_payloads(collection, {u.point_id: self._payload(u) for u in members})
                outcome.refreshed += len(members)
            except EmbedServiceError as exc:
                failed.update({u.message_id: exc.message for u in members})
        for collection, entries in tombstones.items():
            dimensions = self.settings.registry.models[entries[0].model_key].dimensions
            try:
                # The whole point is replaced, vector included: a tombstone must not keep the embedding of
                # content its owner deleted.
                self.vectors.upsert(
                    collection,
                    [Point(u.point_id, tombstone_vector(dimensions), self._tombstone(u)) for u in entries],
                )
                outcome.deleted += len(entries)
            except EmbedServiceError as exc:
                failed.update({u.message_id: exc.message for u in entries})

    def _payload(self, unit: _Unit) -> dict:
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
