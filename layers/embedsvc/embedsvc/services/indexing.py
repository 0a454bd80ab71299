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
from embedsvc.errors import EmbedServiceError, UnknownModel
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
    receive_count: int = 1


@dataclass
class BatchOutcome:
    retry: list[str] = field(default_factory=list)  # message ids for batchItemFailures
    dead_lettered: dict[str, str] = field(default_factory=dict)  # message id -> reason
    indexed: int = 0
    deleted: int = 0
    unchanged: int = 0  # same content hash already in the collection: no provider call
    stale: int = 0  # an older update than what the collection holds: never overwrites
    superseded: int = 0  # a newer message for the same content came in the same batch


@dataclass
class _Unit:
    """One message's work in one collection."""

    message_id: str
    message: IndexMessage
    model_key: str
    collection: str
    point_id: str


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PermanentError(Exception):
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
    ):
        self.settings = settings
        self.embeddings = embeddings
        self.vectors = vectors
        self.dead_letter = (
            dead_letter  # sends (message, reason) pairs to the DLQ; returns ids it could not send
        )
        self.clock = clock

    def process(self, batch: Sequence[Incoming]) -> BatchOutcome:
        """Index a batch; the outcome says which messages to retry and which went to the DLQ."""
        outcome = BatchOutcome()
        poison: list[tuple[Incoming, str]] = []
        latest: dict[tuple[str, str], tuple[Incoming, IndexMessage]] = {}
        for incoming in batch:
            try:
                message = parse_message(incoming.body, self.settings)
            except PermanentError as exc:
                poison.append((incoming, str(exc)))
                continue
            key = (message.content_type, message.id)
            if key in latest:
                outcome.superseded += 1
                if latest[key][1].updated_at_epoch_ms() >= message.updated_at_epoch_ms():
                    continue
            latest[key] = (incoming, message)

        units: list[_Unit] = []
        for incoming, message in latest.values():
            for model_key in message.models or self.settings.models_for(message.content_type):
                units.append(
                    _Unit(
                        incoming.message_id,
                        message,
                        model_key,
                        collection_name(message.content_type, model_key),
                        point_id(message.content_type, message.id),
                    )
                )
        failed: dict[str, str] = {}  # message id -> transient reason
        self._index(units, failed, outcome)

        if poison:
            for message_id in self.dead_letter(poison):
                failed[message_id] = "could not reach the DLQ"  # retried; SQS redrive is the backstop
            for incoming, reason in poison:
                if incoming.message_id not in failed:
                    outcome.dead_lettered[incoming.message_id] = reason
                    logger.warning(
                        "message sent to DLQ", extra={"message_id": incoming.message_id, "reason": reason}
                    )
        outcome.retry = [m.message_id for m in batch if m.message_id in failed]
        for message_id, reason in failed.items():
            logger.info("message will be retried", extra={"message_id": message_id, "reason": reason})
        return outcome

    def _index(self, units: list[_Unit], failed: dict[str, str], outcome: BatchOutcome) -> None:
        by_collection: dict[str, list[_Unit]] = defaultdict(list)
        for unit in units:
            by_collection[unit.collection].append(unit)
        to_embed: dict[tuple[str, Lane], list[_Unit]] = defaultdict(list)
        deletes: dict[str, list[_Unit]] = defaultdict(list)
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
                if existing and int(existing.get("updated_at", 0)) > unit.message.updated_at_epoch_ms():
                    outcome.stale += 1
                elif unit.message.delete:
                    deletes[collection].append(unit)
                elif existing and existing.get("content_hash") == content_hash(unit.message.text or ""):
                    outcome.unchanged += 1
                else:
                    lane = Lane.REALTIME if unit.message.priority == "realtime" else Lane.BULK
                    to_embed[(unit.model_key, lane)].append(unit)

        ready: dict[str, list[Point]] = defaultdict(list)
        for (model_key, lane), members in to_embed.items():
            texts = [u.message.text or "" for u in members]
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
                    texts,
                    model_key,
                    contexts=contexts,
                    lane=lane,
                    truncate=True,
                    use_cache=self.settings.worker_use_cache,
                )
            except UnknownModel as exc:
                failed.update({u.message_id: exc.message for u in members})
                continue
            except EmbedServiceError as exc:
                failed.update({u.message_id: exc.message for u in members})
                continue
            now_ms = int(self.clock() * 1000)
            for index, unit in enumerate(members):
                if index in result.errors:
                    failed[unit.message_id] = result.errors[index].message
                    continue
                ready[unit.collection].append(
                    Point(
                        unit.point_id,
                        result.vectors[index],
                        {
                            "id": unit.message.id,
                            "content_type": unit.message.content_type,
                            "owner_id": unit.message.owner_id,
                            "content_hash": content_hash(unit.message.text or ""),
                            "model": model_key,
                            "updated_at": unit.message.updated_at_epoch_ms(),
                            "indexed_at": now_ms,
                            "metadata": unit.message.metadata,
                        },
                    )
                )
        for collection, points in ready.items():
            try:
                self.vectors.upsert(collection, points)
                outcome.indexed += len(points)
            except EmbedServiceError as exc:
                by_point = {u.point_id: u.message_id for u in by_collection[collection]}
                failed.update({by_point[p.id]: exc.message for p in points})
        for collection, members in deletes.items():
            try:
                self.vectors.delete(collection, [u.point_id for u in members])
                outcome.deleted += len(members)
            except EmbedServiceError as exc:
                failed.update({u.message_id: exc.message for u in members})


def sqs_dead_letter(queue_url: str | None, sqs_client) -> Callable[[list[tuple[Incoming, str]]], list[str]]:
    """A DLQ sender: the original body, with the reason and origin as message attributes."""

    def send(items: list[tuple[Incoming, str]]) -> list[str]:
        if not queue_url:
            logger.error("no INDEX_DLQ_URL configured; poison messages will be retried until redrive")
            return [incoming.message_id for incoming, _ in items]
        unsent: list[str] = []
        for start in range(0, len(items), 10):  # SendMessageBatch takes ten entries
            chunk = items[start : start + 10]
            entries = [
                {
                    "Id": str(i),
                    "MessageBody": incoming.body or "<empty>",
                    "MessageAttributes": {
                        "failure_reason": {"DataType": "String", "StringValue": reason[:1024]},
                        "source_message_id": {"DataType": "String", "StringValue": incoming.message_id},
                        "failed_at": {"DataType": "Number", "StringValue": str(int(time.time()))},
                    },
                }
                for i, (incoming, reason) in enumerate(chunk)
            ]
            try:
                answer = sqs_client.send_message_batch(QueueUrl=queue_url, Entries=entries)
                unsent += [chunk[int(f["Id"])][0].message_id for f in answer.get("Failed", [])]
            except Exception as exc:
                logger.warning("DLQ send failed", extra={"error": repr(exc)})
                unsent += [incoming.message_id for incoming, _ in chunk]
        return unsent

    return send
