"""The vector store: Qdrant (a server, or qdrant-client local mode for tests and the embedded default).

Point ids are UUIDv5 of (content_type, id), since Qdrant accepts only unsigned ints or UUIDs; the
content id itself travels in the payload.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from embedsvc.errors import VectorStoreUnavailable

POINT_NAMESPACE = uuid.UUID("6f1c1b2e-8d6e-5b0a-9d2b-3e0f4c7a1d55")


def point_id(content_type: str, content_id: str) -> str:
    """The Qdrant point id of a piece of content: stable across runs and machines."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{content_type}:{content_id}"))


def collection_name(content_type: str, model_key: str) -> str:
    return f"{content_type}_{model_key}"


def _as_list(vector: Sequence[float]) -> list[float]:
    # numpy's tolist() is several times faster than converting element by element.
    tolist = getattr(vector, "tolist", None)
    return tolist() if callable(tolist) else [float(x) for x in vector]


def _live_only():
    """A filter excluding tombstones: deleted content keeps a point only to remember its version."""
    from qdrant_client import models

    return models.Filter(must_not=[models.FieldCondition(key="deleted", match=models.MatchValue(value=True))])


@dataclass
class Point:
    id: str
    vector: Sequence[float]
    payload: dict[str, Any]


@dataclass
class Hit:
    id: str  # the content id (payload "id"), not the point UUID
    score: float
    payload: dict[str, Any]


class VectorStore:
    def __init__(self, client, *, local: bool = False):
        self.client = client
        self.local = local
        self._known: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def connect(
        cls, *, url: str | None = None, path: str | None = None, api_key: str | None = None
    ) -> VectorStore:
        """A Qdrant server at `url`, else local mode on disk at `path`, else in memory."""
        from qdrant_client import QdrantClient

        if url:
            return cls(QdrantClient(url=url, api_key=api_key, timeout=30))
        return cls(QdrantClient(path=path) if path else QdrantClient(location=":memory:"), local=True)

    def close(self) -> None:
        self.client.close()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "not found" in str(exc).lower():
                # The collection went away (a migration's cleanup, an operator): forget that we had
                # seen it, so the next try recreates it instead of failing for the process's life.
                with self._lock:
                    self._known.clear()
            raise VectorStoreUnavailable(f"qdrant {what} failed: {exc!r}") from exc

    def ensure_collection(self, name: str, dimensions: int) -> None:
        """Create a cosine collection if absent (idempotent; checked once per process)."""
        from qdrant_client import models

        with self._lock:
            if name in self._known:
                return
            if not self._call("collection_exists", self.client.collection_exists, name):
                self._call(
                    "create_collection",
                    self.client.create_collection,
                    name,
                    vectors_config=models.VectorParams(size=dimensions, distance=models.Distance.COSINE),
                )
                # Local mode ignores payload indexes (and warns); a server uses them for tenant filters.
                for field in ("id", "owner_id") if not self.local else ():
                    self._call(
                        "create_payload_index",
                        self.client.create_payload_index,
                        name,
                        field_name=field,
                        field_schema=models.PayloadSchemaType.KEYWORD,
                    )
            self._known.add(name)

    def exists(self, name: str) -> bool:
        return bool(self._call("collection_exists", self.client.collection_exists, name))

    def alias_target(self, alias: str) -> str | None:
        """The collection an alias points at, or None when there is no such alias."""
        answer = self._call("get_aliases", self.client.get_aliases)
        for description in answer.aliases:
            if description.alias_name == alias:
                return str(description.collection_name)
        return None

    def vector_size(self, collection: str) -> int | None:
        """The vector size of a collection, or None when Qdrant does not say (e.g. named vectors)."""
        info = self._call("get_collection", self.client.get_collection, collection)
        vectors = getattr(getattr(getattr(info, "config", None), "params", None), "vectors", None)
        size = getattr(vectors, "size", None)
        return int(size) if size is not None else None

    def payloads(self, collection: str, point_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored payloads of the given points (absent points are absent)."""
        if not point_ids:
            return {}
        records = self._call(
            "retrieve",
            self.client.retrieve,
            collection,
            ids=list(point_ids),
            with_payload=True,
            with_vectors=False,
        )
        return {str(r.id): dict(r.payload or {}) for r in records}

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        """Write points and return only once Qdrant has applied them (wait=True)."""
        from qdrant_client import models

        if not points:
            return
        structs = [models.PointStruct(id=p.id, vector=_as_list(p.vector), payload=p.payload) for p in points]
        self._call("upsert", self.client.upsert, collection, points=structs, wait=True)

    def delete(self, collection: str, point_ids: Sequence[str]) -> None:
        from qdrant_client import models

        if point_ids:
            self._call(
                "delete",
                self.client.delete,
                collection,
                points_selector=models.PointIdsList(points=list(point_ids)),
                wait=True,
            )

    def count(self, collection: str, *, include_tombstones: bool = False) -> int:
        """Points in a collection: live content only, unless asked for tombstones (deleted content) too."""
        count_filter = None if include_tombstones else _live_only()
        return int(
            self._call("count", self.client.count, collection, count_filter=count_filter, exact=True).count
        )

    def set_payloads(
        self, collection: str, payloads: dict[str, dict[str, Any]], *, replace: bool = False
    ) -> None:
        """Rewrite points' payloads (no new vector): merge the fields, or replace them all."""
        from qdrant_client import models

        if not payloads:
            return
        operations: list[Any] = []
        for pid, payload in payloads.items():
            if replace:
                operations.append(
                    models.OverwritePayloadOperation(
                        overwrite_payload=models.SetPayload(payload=payload, points=[pid])
                    )
                )
            else:
                operations.append(
                    models.SetPayloadOperation(set_payload=models.SetPayload(payload=payload, points=[pid]))
                )
        self._call(
            "batch_update_points",
            self.client.batch_update_points,
            collection,
            update_operations=operations,
            wait=True,
        )

    def search(
        self, collection: str, vector: Sequence[float], *, limit: int, owner_id: str | None = None
    ) -> list[Hit]:
        """Nearest points by cosine; with `owner_id`, only that tenant's content and shared content."""
        from qdrant_client import models

        query_filter = _live_only()
        if owner_id is not None:
            query_filter.must = [
                models.Filter(
                    should=[
                        models.FieldCondition(key="owner_id", match=models.MatchValue(value=owner_id)),
                        models.IsNullCondition(is_null=models.PayloadField(key="owner_id")),
                    ]
                )
            ]
        answer = self._call(
            "query_points",
            self.client.query_points,
            collection,
            query=_as_list(vector),
            limit=limit,
            query_filter=query_filter,
            with_payload=True,
        )
        return [
            Hit(str((p.payload or {}).get("id", p.id)), float(p.score), dict(p.payload or {}))
            for p in answer.points
        ]

    def iter_points(self, collection: str, *, page: int = 1000, with_vectors: bool = False) -> Iterator[Any]:
        """Every point, a page at a time (for exports, audits and exact-search checks)."""
        offset = None
        while True:
            records, offset = self._call(
                "scroll",
                self.client.scroll,
                collection,
                limit=page,
                offset=offset,
                with_payload=True,
                with_vectors=with_vectors,
            )
            yield from records
            if offset is None:
                return
