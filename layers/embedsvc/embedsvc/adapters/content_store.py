"""The content store: the source of truth for what the vector index must hold (Postgres, all SQL here).

One `content` row per piece of content (see db/sql/0001_content.sql). Public content types (verses)
are shared; private ones (notes) are scoped to their owner: the owner is part of the key, so no
route can read, overwrite, delete or even detect another owner's row. Postgres stamps every write
with a new version and its own clock; the indexer compares versions, never clients' times.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from embedsvc.adapters.qdrant import point_id
from embedsvc.errors import InvalidRequest

if TYPE_CHECKING:
    from embedsvc.adapters.postgres import Database
    from embedsvc.config import ContentTypeSpec

_COLUMNS = "content_type, id, owner_id, text, metadata, content_hash, version, updated_at, deleted_at, point_id::text"
_LIGHT_COLUMNS = "point_id::text, content_hash, version, deleted_at IS NOT NULL, id, owner_id, updated_at"


class UnknownContentType(InvalidRequest):
    status = 404
    code = "content_type_not_found"


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_point_id(content_type: str, content_id: str, owner_id: str | None) -> str:
    """Public content keeps the point ids it always had; private content's id is scoped to its owner.

    The pair is JSON-encoded, so no owner and id can spell another pair's name (`a/b` + `c` vs `a` + `b/c`).
    """
    return point_id(content_type, content_id if owner_id is None else json.dumps([owner_id, content_id]))


@dataclass(frozen=True)
class ContentRow:
    content_type: str
    id: str
    owner_id: str | None
    text: str
    metadata: dict[str, Any]
    content_hash: str
    version: int
    updated_at: datetime
    deleted_at: datetime | None
    point_id: str

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ContentRow:
        metadata = row[4] if isinstance(row[4], dict) else json.loads(row[4] or "{}")
        return cls(row[0], row[1], row[2], row[3], metadata, row[5], int(row[6]), row[7], row[8], row[9])


@dataclass(frozen=True)
class PointState:
    """What the audit and repair compare with Qdrant: no text, so a page of 10,000 stays small."""

    point_id: str
    content_hash: str
    version: int
    deleted: bool
    id: str
    owner_id: str | None
    updated_at: datetime | None = None  # when the row last changed: a gap it has cannot be older

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> PointState:
        return cls(row[0], row[1], int(row[2]), bool(row[3]), row[4], row[5], row[6])


@dataclass(frozen=True)
class NewContent:
    id: str
    text: str
    metadata: dict[str, Any]


class ContentStore:
    def __init__(self, db: Database, content_types: Mapping[str, ContentTypeSpec]):
        self.db = db
        self.content_types = dict(content_types)

    def is_private(self, content_type: str) -> bool:
        spec = self.content_types.get(content_type)
        if spec is None:
            raise UnknownContentType(
                f"unknown content type {content_type!r}; configured: {', '.join(sorted(self.content_types))}",
                param="content_type",
            )
        return spec.private

    def _owner(self, content_type: str, owner_id: str | None) -> tuple[str, str | None]:
        """(owner_key, owner_id as stored): private rows belong to the caller, public rows to nobody."""
        if self.is_private(content_type):
            if not owner_id:
                raise InvalidRequest(f"{content_type} is private: a caller identity is required")
            return owner_id, owner_id
        return "", None

    def put(
        self, content_type: str, content_id: str, *, text: str, metadata: dict[str, Any], owner_id: str | None
    ) -> ContentRow:
        """Create or replace a row (a deleted one comes back); Postgres assigns the version and time."""
        return self.put_many(content_type, [NewContent(content_id, text, metadata)], owner_id=owner_id)[0]

    def put_many(
        self, content_type: str, documents: Sequence[NewContent], *, owner_id: str | None
    ) -> list[ContentRow]:
        """Create or replace rows in one transaction (all or none), in the order given."""
        owner_key, stored_owner = self._owner(content_type, owner_id)
        rows = []
        with self.db.transaction() as conn:
            for doc in documents:
                found = conn.run(
                    f"INSERT INTO content (content_type, owner_key, id, owner_id, text, metadata, content_hash,"
                    f" point_id) VALUES (:t, :k, :id, :o, :text, CAST(:m AS jsonb), :h, CAST(:p AS uuid))"
                    f" ON CONFLICT (content_type, owner_key, id) DO UPDATE SET text = EXCLUDED.text,"
                    f" metadata = EXCLUDED.metadata, content_hash = EXCLUDED.content_hash, deleted_at = NULL"
                    f" RETURNING {_COLUMNS}",
                    t=content_type,
                    k=owner_key,
                    id=doc.id,
                    o=stored_owner,
                    text=doc.text,
                    m=json.dumps(doc.metadata),
                    h=content_hash(doc.text),
                    p=content_point_id(content_type, doc.id, stored_owner),
                )
                rows.append(ContentRow.from_row(found[0]))
        return rows

    def get(
        self, content_type: str, content_id: str, *, owner_id: str | None, include_deleted: bool = False
    ) -> ContentRow | None:
        """The caller's row (or the public one); None when absent, deleted, or someone else's."""
        owner_key, _ = self._owner(content_type, owner_id)
        with self.db.connection() as conn:
            found = conn.run(
                f"SELECT {_COLUMNS} FROM content WHERE content_type = :t AND owner_key = :k AND id = :id",
                t=content_type,
                k=owner_key,
                id=content_id,
            )
        row = ContentRow.from_row(found[0]) if found else None
        return row if row and (include_deleted or not row.deleted) else None

    def delete(self, content_type: str, content_id: str, *, owner_id: str | None) -> ContentRow | None:
        """Soft-delete the caller's row (a new version); None when there was nothing live to delete."""
        owner_key, _ = self._owner(content_type, owner_id)
        with self.db.connection() as conn:
            found = conn.run(
                f"UPDATE content SET deleted_at = clock_timestamp() WHERE content_type = :t AND owner_key = :k"
                f" AND id = :id AND deleted_at IS NULL RETURNING {_COLUMNS}",
                t=content_type,
                k=owner_key,
                id=content_id,
            )
        return ContentRow.from_row(found[0]) if found else None

    def rows_by_point(self, content_type: str, point_ids: Sequence[str]) -> dict[str, ContentRow]:
        """Current rows (deleted ones included) for point ids: what the indexer treats as the truth."""
        if not point_ids:
            return {}
        with self.db.connection() as conn:
            found = conn.run(
                f"SELECT {_COLUMNS} FROM content WHERE content_type = :t"
                f" AND point_id = ANY(CAST(:p AS uuid[]))",
                t=content_type,
                p=list(point_ids),
            )
        return {row.point_id: row for row in map(ContentRow.from_row, found)}

    def texts(self, content_type: str, point_ids: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Live rows' text and metadata by point id, in one query (search results' `include`)."""
        return {
            pid: (row.text, row.metadata)
            for pid, row in self.rows_by_point(content_type, point_ids).items()
            if not row.deleted
        }

    def iter_point_states(
        self, content_type: str, *, page: int = 5000, after: str | None = None
    ) -> Iterator[PointState]:
        """Every row of a content type in ascending point id (Qdrant's scroll order), a keyset page at a time.

        `after`: start past this point id (a resumed backfill's cursor).
        """
        # The nil UUID lies below every UUIDv5 (their version bits are never 0).
        after = after or "00000000-0000-0000-0000-000000000000"
        while True:
            with self.db.connection() as conn:
                found = conn.run(
                    f"SELECT {_LIGHT_COLUMNS} FROM content WHERE content_type = :t"
                    f" AND point_id > CAST(:after AS uuid) ORDER BY point_id LIMIT :n",
                    t=content_type,
                    after=after,
                    n=page,
                )
            for row in found:
                yield PointState.from_row(row)
            if len(found) < page:
                return
            after = found[-1][0]

    def iter_changed(
        self, content_type: str, since: datetime | None, until: datetime, *, page: int = 1000
    ) -> Iterator[list[PointState]]:
        """Rows written in [since, until), oldest first, in pages (keyset on change time and point id)."""
        cursor: tuple[datetime, str] | None = None
        while True:
            where = "content_type = :t AND updated_at < :until"
            params: dict[str, Any] = {"t": content_type, "until": until, "n": page}
            if since is not None:
                where += " AND updated_at >= :since"
                params["since"] = since
            if cursor is not None:
                where += " AND (updated_at, point_id) > (:at, CAST(:pid AS uuid))"
                params["at"], params["pid"] = cursor
            with self.db.connection() as conn:
                found = conn.run(
                    f"SELECT {_LIGHT_COLUMNS}, updated_at FROM content WHERE {where}"
                    f" ORDER BY updated_at, point_id LIMIT :n",
                    **params,
                )
            if found:
                yield [PointState.from_row(r) for r in found]
            if len(found) < page:
                return
            cursor = (found[-1][6], found[-1][0])

    def now(self) -> datetime:
        """The database's clock: the only clock change times are compared with."""
        with self.db.connection() as conn:
            return conn.run("SELECT clock_timestamp()")[0][0]

    def count(self, content_type: str, *, include_deleted: bool = False) -> int:
        with self.db.connection() as conn:
            where = "" if include_deleted else " AND deleted_at IS NULL"
            return int(
                conn.run(f"SELECT count(*) FROM content WHERE content_type = :t{where}", t=content_type)[0][0]
            )

    # Repair checkpoints and the audit's first-seen times live beside the content they describe.

    def repair_checkpoint(self, content_type: str) -> datetime | None:
        """Where the last repair of this content type got (None before the first)."""
        progress = self.repair_progress(content_type)
        return progress[0] if progress else None

    def repair_progress(self, content_type: str) -> tuple[datetime, bool] | None:
        """(checkpoint, whether that run was complete), or None before the first repair."""
        with self.db.connection() as conn:
            found = conn.run(
                "SELECT checked_until, complete FROM repair_checkpoints WHERE content_type = :t",
                t=content_type,
            )
        return (found[0][0], bool(found[0][1])) if found else None

    def set_repair_checkpoint(
        self, content_type: str, checked_until: datetime, *, complete: bool = True
    ) -> None:
        with self.db.connection() as conn:
            conn.run(
                "INSERT INTO repair_checkpoints (content_type, checked_until, complete) VALUES (:t, :c, :done)"
                " ON CONFLICT (content_type) DO UPDATE SET checked_until = EXCLUDED.checked_until,"
                " complete = EXCLUDED.complete, updated_at = clock_timestamp()",
                t=content_type,
                c=checked_until,
                done=complete,
            )

    def record_gaps(
        self, collection: str, gaps: Mapping[str, str], since: Mapping[str, datetime] | None = None
    ) -> None:
        """Note inconsistencies seen now (point id -> kind). A gap's first-seen time is the earliest of: when
        an audit first saw it, and `since` (when its row last changed). A write that never reached the index
        is exactly that old; a vector lost later is dated from the change too: the age errs towards alarming."""
        if not gaps:
            return
        since = since or {}
        with self.db.connection() as conn:
            conn.run(
                "INSERT INTO consistency_gaps (collection, point_id, kind, first_seen)"
                " SELECT :c, p, k, LEAST(clock_timestamp(), COALESCE(f, clock_timestamp()))"
                " FROM unnest(CAST(:p AS uuid[]), CAST(:k AS text[]), CAST(:f AS timestamptz[])) AS g(p, k, f)"
                " ON CONFLICT (collection, point_id) DO UPDATE SET kind = EXCLUDED.kind,"
                " first_seen = LEAST(consistency_gaps.first_seen, EXCLUDED.first_seen),"
                " last_seen = clock_timestamp()",
                c=collection,
                p=list(gaps),
                k=list(gaps.values()),
                f=[since.get(pid) for pid in gaps],
            )

    def resolve_gaps(self, collection: str, seen_since: datetime) -> None:
        """Forget gaps this audit did not see again: they were resolved since the audit before."""
        with self.db.connection() as conn:
            conn.run(
                "DELETE FROM consistency_gaps WHERE collection = :c AND last_seen < :s",
                c=collection,
                s=seen_since,
            )

    def oldest_gap(self, collection: str) -> datetime | None:
        with self.db.connection() as conn:
            found = conn.run(
                "SELECT min(first_seen) FROM consistency_gaps WHERE collection = :c", c=collection
            )
        return found[0][0] if found else None
