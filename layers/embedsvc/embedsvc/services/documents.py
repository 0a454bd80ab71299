"""Write-through indexing: the content commit first, its vectors right after, a queued request on failure.

`put` starts embedding the text on a thread while Postgres commits the row, and writes the vectors
once both are done, so a save costs about max(commit, embed) + upsert. The commit never depends on
the vector store or the provider: when the vector step fails the answer is still a success, with
`"indexing": "queued"` and an index request on IndexQueue; when the queue fails too, `"indexing":
"pending_repair"`: the hourly repair job finds every row changed since its checkpoint, so a gap is
delayed, never silent. Every mutation goes to every collection the content type writes (the active
model's and, during a migration, the shadow's); each write is conditional on the stored version,
so a slow request can never put an older version over a newer one.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger

from embedsvc.adapters.content_store import ContentRow, NewContent
from embedsvc.adapters.qdrant import Point, collection_name
from embedsvc.errors import EmbedServiceError, InvalidRequest, PermissionDenied
from embedsvc.models.messages import IndexMessage
from embedsvc.observability import CallContext
from embedsvc.services.index_points import index_status, live_payload, tombstone_payload, tombstone_vector
from embedsvc.services.model_config import ModelConfig
from embedsvc.services.ratelimit import Lane

if TYPE_CHECKING:
    from embedsvc.adapters.content_store import ContentStore
    from embedsvc.adapters.index_queue import IndexQueue
    from embedsvc.adapters.qdrant import VectorStore
    from embedsvc.config import Settings
    from embedsvc.services.embedding import EmbeddingService

logger = Logger(child=True)

MAX_TEXT_CHARS = 100_000  # a document, not a book: longer texts are split by the caller
MAX_METADATA_BYTES = 8 * 1024  # it travels in every Qdrant payload
MAX_IMPORT_DOCUMENTS = 1000  # one transaction; a 6 MB API Gateway body holds about that many verses


class DocumentNotFound(InvalidRequest):
    status = 404
    code = "document_not_found"


@dataclass
class WriteResult:
    row: ContentRow
    indexing: str  # "indexed" | "queued" | "pending_repair"
    collections: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "document",
            "content_type": self.row.content_type,
            "id": self.row.id,
            "version": self.row.version,
            "updated_at": self.row.updated_at.isoformat(),
            "deleted": self.row.deleted,
            "indexing": self.indexing,
            "collections": self.collections,
        }


def _code(exc: Exception) -> str:
    """What a log line may say of a failure: our error code, or the exception's class (never its text)."""
    return exc.code if isinstance(exc, EmbedServiceError) else type(exc).__name__


def index_source(content_type: str, allowed: list[str]) -> str:
    """The cost center of indexing a content type: `{type}_index` when configured (note_index), else reindex."""
    source = f"{content_type}_index"
    return source if source in allowed else "reindex"


def check_document(text: str, metadata: dict[str, Any], *, where: str = "") -> None:
    """Refuse what the index cannot hold, before anything is committed or embedded."""
    import json

    if not text.strip():
        raise InvalidRequest(f"{where}text is empty", param="text")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequest(
            f"{where}text has {len(text)} characters; at most {MAX_TEXT_CHARS}", param="text"
        )
    if "\x00" in text:
        raise InvalidRequest(
            f"{where}text contains a NUL character, which Postgres cannot store", param="text"
        )
    try:
        size = len(json.dumps(metadata, allow_nan=False).encode())
    except ValueError:
        raise InvalidRequest(
            f"{where}metadata holds NaN or Infinity, which JSON cannot", param="metadata"
        ) from None
    if size > MAX_METADATA_BYTES:
        raise InvalidRequest(
            f"{where}metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES}", param="metadata"
        )


class DocumentService:
    def __init__(
        self,
        settings: Settings,
        store: ContentStore,
        embeddings: EmbeddingService,
        vectors: VectorStore,
        queue: IndexQueue,
        *,
        clock=time.time,
        model_config: ModelConfig | None = None,
    ):
        self.settings = settings
        self.model_config = model_config or ModelConfig(settings)
        self.store = store
        self.embeddings = embeddings
        self.vectors = vectors
        self.queue = queue
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="embed-ahead")

    def collections(self, content_type: str) -> list[tuple[str, str]]:
        """(model key, collection) for every collection this content type writes, active first."""
        return [
            (key, collection_name(content_type, key)) for key in self.model_config.models_for(content_type)
        ]

    def put(
        self,
        content_type: str,
        content_id: str,
        *,
        text: str,
        metadata: dict[str, Any],
        context: CallContext,
        deadline: float | None = None,
    ) -> WriteResult:
        """Commit the content, then index it in every collection; indexing failures are queued, not raised."""
        owner = self._writer(content_type, context)  # before any tokens are spent
        check_document(text, metadata)
        indexing_context = CallContext(
            source=index_source(content_type, self.settings.cost_sources),
            user_id=context.user_id,
            tenant_id=context.tenant_id,
            task_id=context.task_id,
        )
        targets = self.collections(content_type)
        embedded: dict[str, Future] = {
            key: self._pool.submit(self._embed, text, key, indexing_context, deadline) for key, _ in targets
        }
        try:
            row = self.store.put(content_type, content_id, text=text, metadata=metadata, owner_id=owner)
        except BaseException:
            for future in embedded.values():
                future.cancel()
            raise
        indexed_at = int(self.clock() * 1000)
        failed = False
        for key, collection in targets:
            try:
                vector = embedded[key].result()
                self.vectors.ensure_collection(collection, self.settings.registry.models[key].dimensions)
                if (key, collection) == targets[0]:  # the active collection: what searches read
                    self.vectors.ensure_alias(content_type, collection)
                self.vectors.upsert_if_newer(
                    collection, [Point(row.point_id, vector, live_payload(row, key, indexed_at))]
                )
            except Exception as exc:  # anything after the commit: the content is saved, its indexing queued
                logger.warning(
                    "write-through indexing failed; queued",
                    extra={"collection": collection, "point_id": row.point_id, "error": _code(exc)},
                )
                failed = True
        return WriteResult(row, self._queue_if(failed, row, context, "realtime"), [c for _, c in targets])

    def delete(self, content_type: str, content_id: str, *, context: CallContext) -> WriteResult:
        """Soft-delete the caller's row and replace its points with tombstones; 404 when there is none."""
        owner = self._writer(content_type, context)
        row = self.store.delete(content_type, content_id, owner_id=owner)
        if row is None:
            raise DocumentNotFound(f"no {content_type} {content_id!r}", param="id")
        targets = self.collections(content_type)
        indexed_at = int(self.clock() * 1000)
        failed = False
        for key, collection in targets:
            dimensions = self.settings.registry.models[key].dimensions
            try:
                if self.vectors.exists(collection):
                    tombstone = Point(
                        row.point_id, tombstone_vector(dimensions), tombstone_payload(row, key, indexed_at)
                    )
                    self.vectors.upsert_if_newer(collection, [tombstone])
            except Exception as exc:  # the row is deleted (search already hides it); the tombstone is queued
                logger.warning(
                    "write-through delete failed; queued",
                    extra={"collection": collection, "point_id": row.point_id, "error": _code(exc)},
                )
                failed = True
        return WriteResult(row, self._queue_if(failed, row, context, "realtime"), [c for _, c in targets])

    def get(self, content_type: str, content_id: str, *, context: CallContext) -> dict[str, Any]:
        """The caller's content and, per collection, its indexing status as Qdrant itself reports it."""
        owner = self._owner(content_type, context)
        row = self.store.get(content_type, content_id, owner_id=owner)
        if row is None:
            raise DocumentNotFound(f"no {content_type} {content_id!r}", param="id")
        status: dict[str, str] = {}
        for _, collection in self.collections(content_type):
            try:
                stored = (
                    self.vectors.payloads(collection, [row.point_id])
                    if self.vectors.exists(collection)
                    else {}
                )
                status[collection] = index_status(row, stored.get(row.point_id))
            except EmbedServiceError:
                status[collection] = "unknown"  # Qdrant did not answer: say so, never guess
        return {
            "object": "document",
            "content_type": row.content_type,
            "id": row.id,
            "text": row.text,
            "metadata": row.metadata,
            "version": row.version,
            "updated_at": row.updated_at.isoformat(),
            "indexing": status,
        }

    def import_documents(
        self, content_type: str, documents: list[NewContent], *, context: CallContext
    ) -> dict[str, Any]:
        """Commit many documents in one transaction and queue their indexing at bulk priority."""
        if not documents:
            raise InvalidRequest("documents is empty", param="documents")
        if len(documents) > MAX_IMPORT_DOCUMENTS:
            raise InvalidRequest(
                f"{len(documents)} documents; at most {MAX_IMPORT_DOCUMENTS} per import", param="documents"
            )
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            raise InvalidRequest("documents repeat an id", param="documents")
        for index, doc in enumerate(documents):
            check_document(doc.text, doc.metadata, where=f"documents[{index}] ({doc.id[:64]!r}): ")
        owner = self._writer(content_type, context)
        rows = self.store.put_many(content_type, documents, owner_id=owner)
        messages = [self._request(row, context, "bulk") for row in rows]
        unsent = self.queue.send(messages)
        if unsent:
            logger.warning(
                "import: index requests not queued; the repair job will find them",
                extra={"count": len(unsent)},
            )
        return {
            "object": "import",
            "content_type": content_type,
            "committed": len(rows),
            "queued": len(rows) - len(unsent),
            "pending_repair": len(unsent),
        }

    def _owner(self, content_type: str, context: CallContext) -> str | None:
        """The owner the caller acts as: its tenant for private types, nobody for public ones."""
        if not self.store.is_private(content_type):  # an unknown content type is a 404 here
            return None
        if not context.tenant_id:
            raise InvalidRequest(f"{content_type} is private: the API key must belong to a tenant")
        return context.tenant_id

    def _writer(self, content_type: str, context: CallContext) -> str | None:
        """The owner for a write, after checking the caller may write this content type at all."""
        owner = self._owner(content_type, context)
        writers = self.store.content_types[content_type].writers
        if owner is None and writers is not None and context.tenant_id not in writers:
            raise PermissionDenied(
                f"{content_type} is shared content: only the tenants {', '.join(writers) or '(none)'} may write it"
            )
        return owner

    def _embed(self, text: str, model_key: str, context: CallContext, deadline: float | None):
        # The indexing cache policy (off by default): a saved document's text is new by nature, and the
        # collection's content hash already skips what did not change.
        result = self.embeddings.embed_partial(
            [text],
            model_key,
            contexts=[context],
            lane=Lane.REALTIME,
            truncate=True,
            use_cache=self.settings.worker_use_cache,
            stop_on_error=True,
            deadline=deadline,
        )
        if result.errors:
            raise result.errors[0]
        return result.vectors[0]

    def _request(self, row: ContentRow, context: CallContext, priority: str) -> IndexMessage:
        return IndexMessage(
            content_type=row.content_type,
            id=row.id,
            owner_id=row.owner_id,
            source=index_source(row.content_type, self.settings.cost_sources),
            task_id=context.task_id,
            priority=priority,  # type: ignore[arg-type]
        )

    def _queue_if(self, failed: bool, row: ContentRow, context: CallContext, priority: str) -> str:
        if not failed:
            return "indexed"
        if self.queue.send([self._request(row, context, priority)]):
            logger.error(
                "index request not queued either; the repair job will find it",
                extra={"point_id": row.point_id, "content_type": row.content_type},
            )
            return "pending_repair"
        return "queued"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
