"""The audit's comparison: one ordered walk over the content rows and the collection's points at once.

Both sides arrive in ascending point id (Postgres orders `uuid` by its bytes, Qdrant by the same
128-bit value; for canonical lowercase UUID strings that is plain string order). Walking them
together is O(rows + points) and holds one item of each side, never either id set: a page of each
is all that is ever in memory. An out-of-order id would silently turn into a pair of false
"missing" + "orphaned" findings, so order is checked on every step and a violation stops the walk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from embedsvc.errors import EmbedServiceError


class RowState(Protocol):
    """What the walk reads of a content row (adapters.content_store.PointState has it)."""

    @property
    def point_id(self) -> str: ...
    @property
    def content_hash(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def deleted(self) -> bool: ...


R = TypeVar("R", bound=RowState)


class Gap(StrEnum):
    """How a point disagrees with its row. TOMBSTONE (a tombstone with no row at all) is harmless garbage."""

    MISSING = "missing"  # a live row without a live point
    STALE = "stale"  # a live row whose point holds other text or an older version
    ORPHANED = "orphaned"  # a live point whose row is deleted or absent
    TOMBSTONE = "tombstone"


class MergeOrderError(EmbedServiceError):
    """A side of the merge went backwards: comparing further would report false gaps."""

    code = "merge_order_violation"


@dataclass(frozen=True, slots=True)
class Finding(Generic[R]):
    point_id: str
    gap: Gap
    row: R | None  # None: the point has no row


@dataclass
class MergeCounts:
    """What one walk saw; the gap counts equal the findings it yielded."""

    content: int = 0  # live rows
    deleted_content: int = 0  # soft-deleted rows
    points: int = 0  # live points
    tombstone_points: int = 0  # tombstones, with or without a row
    consistent: int = (
        0  # ids where row and point agree (a deleted row and its tombstone or no point included)
    )
    missing: int = 0
    stale: int = 0
    orphaned: int = 0
    tombstones: int = 0  # tombstones with no row (garbage)

    def add(self, other: MergeCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def compare(row: RowState, payload: Mapping[str, Any] | None) -> Gap | None:
    """The gap between a row and its point's payload (None: no point), or None when they agree."""
    point_live = payload is not None and not payload.get("deleted")
    if row.deleted:
        return Gap.ORPHANED if point_live else None
    if not point_live:
        return Gap.MISSING
    assert payload is not None
    if payload.get("content_hash") != row.content_hash or int(payload.get("version") or 0) < row.version:
        return Gap.STALE
    return None


def merge_join(
    rows: Iterable[R],
    points: Iterable[tuple[str, Mapping[str, Any]]],
    counts: MergeCounts | None = None,
) -> Iterator[Finding[R]]:
    """Yield every gap between rows and points (both ascending by point id), counting all into `counts`.

    Raises MergeOrderError when either side repeats an id or goes backwards.
    """
    c = counts if counts is not None else MergeCounts()
    row_iter, point_iter = iter(rows), iter(points)
    row = next(row_iter, None)
    point = next(point_iter, None)
    rid = row.point_id.lower() if row is not None else None
    pid = point[0].lower() if point is not None else None
    last_rid = last_pid = ""  # below every UUID string

    while rid is not None or pid is not None:
        if rid is not None and rid <= last_rid:
            raise MergeOrderError(f"content store ids out of order: {rid} came after {last_rid}")
        if pid is not None and pid <= last_pid:
            raise MergeOrderError(f"vector store ids out of order: {pid} came after {last_pid}")

        if pid is None or (rid is not None and rid < pid):
            assert row is not None and rid is not None
            if row.deleted:
                c.deleted_content += 1
                c.consistent += 1
            else:
                c.content += 1
                c.missing += 1
                yield Finding(rid, Gap.MISSING, row)
            last_rid = rid
            row = next(row_iter, None)
            rid = row.point_id.lower() if row is not None else None
            continue

        assert point is not None
        payload = point[1]
        point_live = not payload.get("deleted")
        if point_live:
            c.points += 1
        else:
            c.tombstone_points += 1

        if rid is None or pid < rid:
            if point_live:
                c.orphaned += 1
                yield Finding(pid, Gap.ORPHANED, None)
            else:
                c.tombstones += 1
                yield Finding(pid, Gap.TOMBSTONE, None)
        else:
            assert row is not None
            if row.deleted:
                c.deleted_content += 1
            else:
                c.content += 1
            gap = compare(row, payload)
            if gap is None:
                c.consistent += 1
            else:
                setattr(c, gap.value, getattr(c, gap.value) + 1)
                yield Finding(rid, gap, row)
            last_rid = rid
            row = next(row_iter, None)
            rid = row.point_id.lower() if row is not None else None
        last_pid = pid
        point = next(point_iter, None)
        pid = point[0].lower() if point is not None else None
