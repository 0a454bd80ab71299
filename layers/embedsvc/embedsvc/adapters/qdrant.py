"""The vector store: Qdrant (a server, or qdrant-client local mode for tests and the embedded default).

Point ids are UUIDv5 of (content_type, id), since Qdrant accepts only unsigned ints or UUIDs; the
content id itself travels in the payload.
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from embedsvc.errors import EmbedServiceError, InvalidRequest, VectorStoreUnavailable

POINT_NAMESPACE = uuid.UUID("6f1c1b2e-8d6e-5b0a-9d2b-3e0f4c7a1d55")

# Qdrant takes at most this many ids comfortably in one retrieve; repair passes pages of ids.
RETRIEVE_PAGE = 1000
SCROLL_FIELDS = ("content_hash", "version", "deleted", "id", "owner_id")
METADATA_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")

FilterValue = str | int | float | bool | list


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


def _older_than(version_field: str, version: int):
    """Matches a stored point whose version is below `version`, or that has no version at all.

    A Range on an absent key matches nothing (local mode: `check_condition` returns False when
    `value_by_key` finds no value; the server likewise), so points written before versions existed
    would be frozen forever without the IsEmpty alternative (which matches absent, null and []).
    """
    from qdrant_client import models

    return models.Filter(
        should=[
            models.FieldCondition(key=version_field, range=models.Range(lt=version)),
            models.IsEmptyCondition(is_empty=models.PayloadField(key=version_field)),
        ]
    )


def _version_of(payload: Mapping[str, Any], version_field: str, pid: str) -> int:
    version = payload.get(version_field)
    if isinstance(version, bool) or not isinstance(version, int):
        # A programming error, not a caller's: only store-backed content (with a version) comes here.
        raise EmbedServiceError(f"point {pid} has no int {version_field!r} for a conditional write")
    return version


def _by_version(items: Sequence[tuple[str, int, Any]]) -> list[tuple[int, list[Any]]]:
    """Group (id, version, item) by version, ascending; per id only its newest item survives.

    Two writes of one id in one request would race each other: the first would raise the stored
    version and the second, at the same version, be refused. The newest (last at a tie) wins instead.
    """
    newest: dict[str, tuple[int, Any]] = {}
    for pid, version, item in items:
        if pid not in newest or version >= newest[pid][0]:
            newest[pid] = (version, item)
    groups: dict[int, list[Any]] = {}
    for version, item in newest.values():
        groups.setdefault(version, []).append(item)
    return sorted(groups.items(), key=lambda group: group[0])


def _metadata_condition(key: str, value: Any):
    """One `metadata.<key>` condition: exact match, or any-of for a list."""
    from qdrant_client import models

    if not isinstance(key, str) or METADATA_KEY.fullmatch(key) is None:
        raise InvalidRequest(
            f"filter key {key!r} must be 1-64 letters, digits or underscores", param="filters"
        )
    field = f"metadata.{key}"
    if isinstance(value, list):
        if not value or any(isinstance(v, (list, dict)) or v is None for v in value):
            raise InvalidRequest(f"filter {key!r} must list one or more plain values", param="filters")
        if all(isinstance(v, str) for v in value) or all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return models.FieldCondition(key=field, match=models.MatchAny(any=list(value)))
        # MatchAny takes only all-str or all-int lists: a mixed list is a should of exact matches.
        return models.Filter(should=[_metadata_condition(key, v) for v in value])
    if isinstance(value, float):
        # Qdrant's exact match has no float variant (a float payload never matches MatchValue).
        return models.FieldCondition(key=field, range=models.Range(gte=value, lte=value))
    if isinstance(value, (str, int)):  # bool is an int
        return models.FieldCondition(key=field, match=models.MatchValue(value=value))
    raise InvalidRequest(
        f"filter {key!r} must be a string, number, boolean or a list of them", param="filters"
    )


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


class _SerializedClient:
    """A local-mode QdrantClient that runs one call at a time.

    Qdrant's local mode is not thread-safe: a search while another thread adds a point fails with
    `operands could not be broadcast together with shapes (4254,) (4253,)` (its arrays were resized
    under it), and an upsert can fail the same way. The local stack's API, worker and migration steps
    share one client from several threads (a Qdrant server has no such problem and is not wrapped).
    """

    def __init__(self, inner: Any):
        self._inner = inner
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attribute(*args, **kwargs)

        return call


class VectorStore:
    def __init__(self, client, *, local: bool = False):
        self.client = client
        self.local = local
        self._known: set[str] = set()
        self._aliased: set[str] = set()  # aliases known to exist (ensure_alias)
        self._lock = threading.Lock()

    @classmethod
    def connect(
        cls, *, url: str | None = None, path: str | None = None, api_key: str | None = None
    ) -> VectorStore:
        """A Qdrant server at `url`, else local mode on disk at `path`, else in memory."""
        from qdrant_client import QdrantClient

        if url:
            return cls(QdrantClient(url=url, api_key=api_key, timeout=30))
        local = QdrantClient(path=path) if path else QdrantClient(location=":memory:")
        return cls(_SerializedClient(local), local=True)

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
                    self._aliased.clear()
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
        """Stored payloads of the given points (absent points are absent), fetched 1000 ids a request."""
        found: dict[str, dict[str, Any]] = {}
        ids = list(point_ids)
        for start in range(0, len(ids), RETRIEVE_PAGE):
            records = self._call(
                "retrieve",
                self.client.retrieve,
                collection,
                ids=ids[start : start + RETRIEVE_PAGE],
                with_payload=True,
                with_vectors=False,
            )
            found.update({str(r.id): dict(r.payload or {}) for r in records})
        return found

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        """Write points and return only once Qdrant has applied them (wait=True)."""
        from qdrant_client import models

        if not points:
            return
        structs = [models.PointStruct(id=p.id, vector=_as_list(p.vector), payload=p.payload) for p in points]
        self._call("upsert", self.client.upsert, collection, points=structs, wait=True)

    def upsert_if_newer(
        self, collection: str, points: Sequence[Point], *, version_field: str = "version"
    ) -> None:
        """Write each point only over an older stored version (or none): the conditional write.

        Every payload carries the int `version` Postgres increments on each write of the row. A worker
        that read a row, embedded it and writes late must not undo a newer write (or a delete) that
        landed meanwhile: reading Qdrant first and then writing leaves exactly that window open. So the
        comparison happens inside Qdrant, with upsert's `update_filter` (Qdrant >= 1.16): an existing
        point is replaced only when it matches the filter, a point that does not exist is inserted, and
        a refused point is skipped without an error. In local mode (`LocalCollection._upsert_point`) the
        filter is checked against the stored payload of a live point only; a missing point (never
        written, or deleted) goes straight to `_add_point`.

        The filter is "stored version < this version, or no stored version": points written before
        versions existed are overwritten rather than frozen. An equal version is refused, so a retried
        write is a no-op. Tombstones (deleted=True, a version, a zero-content vector) go through here
        too: a stale live write cannot resurrect deleted content, and a newer write replaces the tombstone.

        The filter applies to a whole request, so points are grouped by version: one upsert per
        distinct version, ascending.
        """
        from qdrant_client import models

        items = [(p.id, _version_of(p.payload, version_field, p.id), p) for p in points]
        for version, group in _by_version(items):
            structs = [
                models.PointStruct(id=p.id, vector=_as_list(p.vector), payload=p.payload) for p in group
            ]
            self._call(
                "upsert",
                self.client.upsert,
                collection,
                points=structs,
                update_filter=_older_than(version_field, version),
                wait=True,
            )

    def overwrite_payloads_if_newer(
        self, collection: str, payloads: dict[str, dict[str, Any]], *, version_field: str = "version"
    ) -> None:
        """Replace points' payloads (vectors kept) only where the stored version is older or absent.

        The same rule as `upsert_if_newer`, for metadata-only refreshes. Each operation selects its
        point by a filter (HasId and the version condition), so a point that is missing or already
        newer is left alone without an error; the whole batch is one request.
        """
        from qdrant_client import models

        items = [(pid, _version_of(payload, version_field, pid), pid) for pid, payload in payloads.items()]
        operations: list[Any] = []
        for version, pids in _by_version(items):
            older = _older_than(version_field, version)
            for pid in pids:
                selector = models.Filter(must=[models.HasIdCondition(has_id=[pid]), older])
                operations.append(
                    models.OverwritePayloadOperation(
                        overwrite_payload=models.SetPayload(payload=payloads[pid], filter=selector)
                    )
                )
        if operations:
            self._call(
                "batch_update_points",
                self.client.batch_update_points,
                collection,
                update_operations=operations,
                wait=True,
            )

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
        self,
        collection: str,
        vector: Sequence[float],
        *,
        limit: int,
        owner_id: str | None = None,
        filters: Mapping[str, FilterValue] | None = None,
    ) -> list[Hit]:
        """Nearest live points by cosine, optionally limited to a tenant and to metadata values.

        With `owner_id`: that tenant's content and shared content, whose owner_id is null or absent
        (IsEmpty matches both; IsNull does not match an absent key). `filters` match payload
        `metadata.<key>` exactly, a list meaning any of its values; keys are 1-64 of [A-Za-z0-9_].
        """
        from qdrant_client import models

        must: list[Any] = [_metadata_condition(key, value) for key, value in (filters or {}).items()]
        if owner_id is not None:
            must.append(
                models.Filter(
                    should=[
                        models.FieldCondition(key="owner_id", match=models.MatchValue(value=owner_id)),
                        models.IsEmptyCondition(is_empty=models.PayloadField(key="owner_id")),
                    ]
                )
            )
        query_filter = _live_only()
        if must:
            query_filter.must = must
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
        yield from self._scroll(collection, page=page, with_payload=True, with_vectors=with_vectors)

    def _scroll(self, collection: str, *, page: int, with_payload: Any, with_vectors: bool) -> Iterator[Any]:
        """Qdrant's scroll, one page in memory at a time."""
        offset = None
        while True:
            records, offset = self._call(
                "scroll",
                self.client.scroll,
                collection,
                limit=page,
                offset=offset,
                with_payload=with_payload,
                with_vectors=with_vectors,
            )
            yield from records
            if offset is None:
                return

    def scroll_ids(
        self, collection: str, *, page: int = 1000, fields: Sequence[str] = SCROLL_FIELDS
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every point id (tombstones included) with only `fields` of its payload, in ascending id order.

        The order is Qdrant's scroll order by point id, one page in memory at a time. The server sorts
        ids (integers first, then UUIDs by their 128-bit value); for UUIDs that is the order of their
        lowercase canonical strings, and Postgres orders `uuid` by the same bytes, so a merge-join
        against `ORDER BY point_id` works. Local mode (`LocalCollection._scroll_by_id`) sorts by
        `_universal_id`, i.e. by the id string, and stores UUIDs canonical and lowercase
        (`normalize_point_id`): the same order. Each next page starts at `next_page_offset`, the first
        id not yet returned. The order is checked as ids stream, since a merge-join fed out of order
        would silently pair the wrong rows.
        """
        from qdrant_client import models

        selector = models.PayloadSelectorInclude(include=list(fields))
        local = self._local_collection(collection) if self.local else None
        if local is not None:
            yield from self._scroll_local(local, selector, getattr(self.client, "_lock", None))
            return
        previous: str | None = None
        for record in self._scroll(collection, page=page, with_payload=selector, with_vectors=False):
            pid = str(record.id)
            if previous is not None and pid <= previous:
                raise EmbedServiceError(f"qdrant scrolled {pid} after {previous}: not ascending uuids")
            previous = pid
            yield pid, dict(record.payload or {})

    def _local_collection(self, collection: str) -> Any:
        """Local mode's in-memory collection, or None where this qdrant-client keeps it elsewhere."""
        backend = getattr(self.client, "_client", None)
        get = getattr(backend, "_get_collection", None)
        if get is None:
            return None
        found = self._call("get_collection", get, collection)
        wanted = ("ids", "deleted", "_get_payload")
        return found if all(hasattr(found, name) for name in wanted) else None

    @staticmethod
    def _scroll_local(
        local: Any, selector: Any, lock: Any = None, page: int = 1000
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Local mode's scroll, sorted once: its own `scroll` sorts every id again for each page.

        Local mode is brute force and in memory: paging it through `scroll` costs O(N^2 / page), which
        made the audit of 100k points (the embedded default) superlinear. Sorting the ids once is
        O(N log N) and yields the same order and payloads as `scroll` (a test holds the two congruent);
        a server keeps using `scroll`, which reads its index.
        """
        guard = lock if lock is not None else contextlib.nullcontext()
        with guard:  # the client's own lock (see _SerializedClient): writers resize these arrays
            ids = list(local.ids.items())
        ordered = sorted(((str(pid), idx) for pid, idx in ids), key=lambda pair: pair[0])
        for start in range(0, len(ordered), page):
            with guard:
                found = [
                    (pid, dict(local._get_payload(idx, selector) or {}))
                    for pid, idx in ordered[start : start + page]
                    if not (idx < len(local.deleted) and local.deleted[idx])
                ]
            yield from found

    def delete_collection(self, name: str) -> None:
        """Drop a collection (a finished migration's old one); absent is fine."""
        with self._lock:
            self._known.discard(name)
        self._call("delete_collection", self.client.delete_collection, name)

    def create_alias(self, alias: str, collection: str) -> None:
        """Point a new alias at a collection (use `switch_alias` when it may exist already)."""
        from qdrant_client import models

        self._call(
            "update_collection_aliases",
            self.client.update_collection_aliases,
            change_aliases_operations=[
                models.CreateAliasOperation(
                    create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
                )
            ],
        )

    def ensure_alias(self, alias: str, collection: str) -> None:
        """Create `alias` -> `collection` if the alias does not exist yet; never moves an existing one.

        Readers search a content type through its alias, so that a migration's cutover is one atomic
        alias switch. Checked once per process; two processes racing to create it both succeed.
        """
        with self._lock:
            if alias in self._aliased:
                return
        if self.alias_target(alias) is None:
            try:
                self.create_alias(alias, collection)
            except VectorStoreUnavailable:
                if self.alias_target(alias) is None:  # not a lost race: a real failure
                    raise
        with self._lock:
            self._aliased.add(alias)

    def switch_alias(self, alias: str, collection: str) -> None:
        """Point an alias at `collection` atomically: Delete + Create in one aliases request.

        Readers through the alias see the old collection or the new one, never neither. The Delete is
        sent only when the alias exists, since a server may refuse deleting an unknown alias.
        """
        from qdrant_client import models

        operations: list[Any] = []
        if self.alias_target(alias) is not None:
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        self._call(
            "update_collection_aliases",
            self.client.update_collection_aliases,
            change_aliases_operations=operations,
        )
