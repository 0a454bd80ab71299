"""The audit's merge-join: every classification, against a set-based oracle, and its order checks."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedsvc.adapters.content_store import content_point_id
from embedsvc.services.merge_join import Gap, MergeCounts, MergeOrderError, compare, merge_join


@dataclass(frozen=True)
class Row:
    point_id: str
    content_hash: str
    version: int
    deleted: bool


def pid(n: int) -> str:
    return str(uuid.UUID(int=n))


def live(h: str = "h", v: int = 1) -> dict:
    return {"content_hash": h, "version": v, "deleted": False}


def tomb(v: int = 2) -> dict:
    return {"content_hash": None, "version": v, "deleted": True}


# (row or None, payload or None) -> the gap the merge must report (None: consistent)
CASES = [
    pytest.param(Row(pid(1), "h", 1, False), None, Gap.MISSING, id="live row, no point"),
    pytest.param(Row(pid(1), "h", 2, False), tomb(1), Gap.MISSING, id="live row, tombstone point"),
    pytest.param(Row(pid(1), "h", 1, False), live("other", 1), Gap.STALE, id="live row, other text"),
    pytest.param(Row(pid(1), "h", 3, False), live("h", 2), Gap.STALE, id="live row, older version"),
    pytest.param(Row(pid(1), "h", 2, False), live("h", 2), None, id="live row, its point"),
    pytest.param(Row(pid(1), "h", 2, False), live("h", 5), None, id="live row, newer point, same text"),
    pytest.param(Row(pid(1), "h", 2, True), live("h", 1), Gap.ORPHANED, id="deleted row, live point"),
    pytest.param(Row(pid(1), "h", 2, True), tomb(2), None, id="deleted row, its tombstone"),
    pytest.param(Row(pid(1), "h", 2, True), None, None, id="deleted row, no point"),
    pytest.param(None, live(), Gap.ORPHANED, id="no row, live point"),
    pytest.param(None, tomb(), Gap.TOMBSTONE, id="no row, tombstone"),
]


@pytest.mark.parametrize(("row", "payload", "expected"), CASES)
def test_each_pairing_is_classified(row, payload, expected):
    rows = [row] if row else []
    points = [(pid(1), payload)] if payload else []
    counts = MergeCounts()
    found = list(merge_join(rows, points, counts))
    assert [f.gap for f in found] == ([expected] if expected else [])
    assert counts.consistent == (0 if expected else 1)
    if row is not None:
        assert compare(row, payload) == expected


def test_findings_carry_the_row_or_none():
    row = Row(pid(5), "h", 1, False)
    found = list(merge_join([row], [(pid(4), live())]))
    assert [(f.point_id, f.gap, f.row) for f in found] == [
        (pid(4), Gap.ORPHANED, None),
        (pid(5), Gap.MISSING, row),
    ]


def test_ids_whose_text_order_differs_from_their_point_order():
    # Content ids sort one way as text, their point ids (UUIDv5) another: the merge walks point order.
    ids = [f"John 3:{n}" for n in range(1, 40)]
    by_point = sorted(ids, key=lambda i: content_point_id("verse", i, None))
    assert by_point != sorted(ids)
    rows = [Row(content_point_id("verse", i, None), f"h{i}", 1, False) for i in by_point]
    points = [(r.point_id, live(r.content_hash)) for r in rows]
    counts = MergeCounts()
    assert list(merge_join(rows, points, counts)) == []
    assert (counts.content, counts.points, counts.consistent) == (len(ids), len(ids), len(ids))
    # Fed in text order instead, the merge refuses rather than reporting false gaps.
    text_order = [Row(content_point_id("verse", i, None), f"h{i}", 1, False) for i in sorted(ids)]
    with pytest.raises(MergeOrderError, match="content store ids out of order"):
        list(merge_join(text_order, points))


def test_uppercase_ids_are_compared_as_uuids():
    row = Row(pid(7).upper(), "h", 1, False)
    assert list(merge_join([row], [(pid(7), live())])) == []


@pytest.mark.parametrize("side", ["rows", "points"])
@pytest.mark.parametrize("ids", [[2, 1], [1, 1]], ids=["backwards", "repeated"])
def test_a_side_going_backwards_or_repeating_is_an_error(side, ids):
    rows = [Row(pid(n), "h", 1, False) for n in (ids if side == "rows" else [1, 2])]
    points = [(pid(n), live()) for n in (ids if side == "points" else [1, 2])]
    which = "content store" if side == "rows" else "vector store"
    with pytest.raises(MergeOrderError, match=which):
        list(merge_join(rows, points))


def test_the_walk_is_lazy_and_holds_one_item_of_each_side():
    pulled = {"rows": 0, "points": 0}

    def rows():
        for n in range(1, 10**9):
            pulled["rows"] += 1
            yield Row(pid(2 * n), "h", 1, False)

    def points():
        for n in range(1, 10**9):
            pulled["points"] += 1
            yield (pid(2 * n + 1), live())

    walk = merge_join(rows(), points())
    first = [next(walk) for _ in range(10)]
    assert {f.gap for f in first} == {Gap.MISSING, Gap.ORPHANED}
    assert pulled["rows"] <= 7 and pulled["points"] <= 7


def oracle(rows: list[Row], points: dict[str, dict]) -> dict[str, int]:
    """Counts computed from whole sets: what the merge must equal."""
    by_id = {r.point_id: r for r in rows}
    out = dict.fromkeys(["missing", "stale", "orphaned", "tombstones", "content", "points"], 0)
    for p, payload in points.items():
        is_live = not payload["deleted"]
        out["points"] += is_live
        if p not in by_id:
            out["orphaned" if is_live else "tombstones"] += 1
    for r in rows:
        out["content"] += not r.deleted
        gap = compare(r, points.get(r.point_id))
        if gap is not None:
            out[gap.value] += 1
    return out


row_st = st.builds(lambda h, v, d: (h, v, d), st.sampled_from("abc"), st.integers(1, 4), st.booleans())
point_st = st.one_of(
    st.builds(
        lambda h, v: {"content_hash": h, "version": v, "deleted": False},
        st.sampled_from("abc"),
        st.integers(1, 4),
    ),
    st.builds(lambda v: {"content_hash": None, "version": v, "deleted": True}, st.integers(1, 4)),
)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.dictionaries(st.integers(0, 2**128 - 1), row_st, max_size=40),
    points=st.dictionaries(st.integers(0, 2**128 - 1), point_st, max_size=40),
    shared=st.dictionaries(st.integers(0, 2**128 - 1), st.tuples(row_st, point_st), max_size=40),
)
def test_counts_equal_the_set_based_oracle(rows, points, shared):
    row_map = {pid(k): Row(pid(k), *v) for k, v in rows.items()}
    point_map = {pid(k): p for k, p in points.items()}
    for k, (r, p) in shared.items():  # ids on both sides, where most of the interesting pairings are
        row_map[pid(k)] = Row(pid(k), *r)
        point_map[pid(k)] = p
    ordered_rows = sorted(row_map.values(), key=lambda r: uuid.UUID(r.point_id).int)
    ordered_points = sorted(point_map.items(), key=lambda kv: uuid.UUID(kv[0]).int)
    counts = MergeCounts()
    found = list(merge_join(ordered_rows, ordered_points, counts))
    expected = oracle(ordered_rows, point_map)
    assert {k: getattr(counts, k) for k in expected} == expected
    for gap in Gap:
        assert sum(f.gap is gap for f in found) == getattr(
            counts, gap.value if gap is not Gap.TOMBSTONE else "tombstones"
        )
    every_id = set(row_map) | set(point_map)
    assert counts.consistent + len(found) == len(every_id)
    assert [f.point_id for f in found] == sorted({f.point_id for f in found}, key=lambda p: uuid.UUID(p).int)
