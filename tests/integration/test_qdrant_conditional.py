"""The Qdrant adapter against qdrant-client local mode (the backend every test here runs on).

Conditional writes by version, ascending id scrolls, tenant and metadata filters, paged retrieves and
alias switches. Where a test pins down a fact of local mode itself (not of our code) it says so: a
server may differ, and those facts are what the adapter's choices rest on.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from qdrant_client import QdrantClient, models

from embedsvc.adapters.qdrant import Point, VectorStore, point_id
from embedsvc.errors import EmbedServiceError, InvalidRequest, VectorStoreUnavailable

DIM = 4
COLLECTION = "verse_test"


@pytest.fixture
def store() -> VectorStore:
    vectors = VectorStore(QdrantClient(location=":memory:"), local=True)
    vectors.ensure_collection(COLLECTION, DIM)
    yield vectors
    vectors.close()


class Spy:
    """Records the calls of one client method and passes them through."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.fn(*args, **kwargs)


def spy(monkeypatch, store: VectorStore, name: str) -> Spy:
    recorder = Spy(getattr(store.client, name))
    monkeypatch.setattr(store.client, name, recorder)
    return recorder


def live(content_id: str, version: int | None, *, vector=(1.0, 0.0, 0.0, 0.0), **extra) -> Point:
    payload: dict[str, Any] = {"id": content_id, "owner_id": None, "deleted": False, **extra}
    if version is not None:
        payload["version"] = version
    return Point(point_id("verse", content_id), list(vector), payload)


def tombstone(content_id: str, version: int) -> Point:
    payload = {"id": content_id, "owner_id": None, "deleted": True, "version": version}
    return Point(point_id("verse", content_id), [0.0, 0.0, 0.0, 1.0], payload)


def stored(store: VectorStore, content_id: str) -> dict | None:
    pid = point_id("verse", content_id)
    return store.payloads(COLLECTION, [pid]).get(pid)


def stored_vector(store: VectorStore, content_id: str) -> list[float]:
    (record,) = store.client.retrieve(COLLECTION, [point_id("verse", content_id)], with_vectors=True)
    return list(record.vector)


# upsert_if_newer


def test_a_point_not_yet_stored_is_inserted(store):
    store.upsert_if_newer(COLLECTION, [live("v1", 1, text="first")])
    assert stored(store, "v1")["text"] == "first"


@pytest.mark.parametrize(
    ("stored_version", "written_version", "applied"),
    [(3, 4, True), (3, 3, False), (3, 2, False), (0, 1, True)],
)
def test_only_a_newer_version_replaces_the_stored_point(store, stored_version, written_version, applied):
    # Given a stored point at one version
    store.upsert_if_newer(COLLECTION, [live("v1", stored_version, text="stored")])
    # When a write at another version arrives
    store.upsert_if_newer(COLLECTION, [live("v1", written_version, text="written", vector=(0, 1, 0, 0))])
    # Then it applies, vector and payload, only when its version is higher
    payload = stored(store, "v1")
    assert payload["version"] == (written_version if applied else stored_version)
    assert payload["text"] == ("written" if applied else "stored")
    assert stored_vector(store, "v1")[1] == pytest.approx(1.0 if applied else 0.0)


def test_local_mode_fact_a_range_alone_never_matches_a_point_without_the_field():
    """Why the filter needs IsEmpty: `Range(lt=v)` on an absent key is False in local mode."""
    client = QdrantClient(location=":memory:")
    client.create_collection("c", vectors_config=models.VectorParams(size=2, distance=models.Distance.COSINE))
    pid = str(uuid.uuid4())
    client.upsert("c", [models.PointStruct(id=pid, vector=[1, 0], payload={"text": "legacy"})])
    only_range = models.Filter(must=[models.FieldCondition(key="version", range=models.Range(lt=9))])
    client.upsert(
        "c", [models.PointStruct(id=pid, vector=[0, 1], payload={"version": 9})], update_filter=only_range
    )
    assert client.retrieve("c", [pid])[0].payload == {"text": "legacy"}


@pytest.mark.parametrize("legacy_version", ["absent", None, []])
def test_a_point_stored_before_versions_existed_is_overwritten(store, legacy_version):
    # Given a point written by the old code: no version, or a null or empty one
    legacy = live("v1", None, text="legacy")
    if legacy_version != "absent":
        legacy.payload["version"] = legacy_version
    store.upsert(COLLECTION, [legacy])
    # When a versioned write arrives, Then it replaces the legacy point
    store.upsert_if_newer(COLLECTION, [live("v1", 1, text="versioned")])
    assert stored(store, "v1")["text"] == "versioned"
    assert stored(store, "v1")["version"] == 1


def test_a_stale_live_write_never_resurrects_a_tombstone(store):
    store.upsert_if_newer(COLLECTION, [live("v1", 1)])
    store.upsert_if_newer(COLLECTION, [tombstone("v1", 2)])
    # A slow worker that embedded version 1 writes after the delete
    store.upsert_if_newer(COLLECTION, [live("v1", 1, text="stale")])
    assert stored(store, "v1")["deleted"] is True
    assert store.count(COLLECTION) == 0
    assert store.search(COLLECTION, [1, 0, 0, 0], limit=5) == []


def test_a_newer_write_replaces_a_tombstone(store):
    store.upsert_if_newer(COLLECTION, [tombstone("v1", 2)])
    store.upsert_if_newer(COLLECTION, [live("v1", 3, text="again")])
    assert stored(store, "v1")["deleted"] is False
    assert [h.id for h in store.search(COLLECTION, [1, 0, 0, 0], limit=5)] == ["v1"]


def test_a_stale_tombstone_does_not_delete_newer_content(store):
    store.upsert_if_newer(COLLECTION, [live("v1", 5)])
    store.upsert_if_newer(COLLECTION, [tombstone("v1", 4)])
    assert stored(store, "v1")["deleted"] is False


def test_one_conditional_upsert_per_distinct_version_each_judged_on_its_own(store, monkeypatch):
    # Given stored points at versions 5, 5 and 1
    store.upsert_if_newer(COLLECTION, [live("a", 5), live("b", 5), live("c", 1)])
    upserts = spy(monkeypatch, store, "upsert")
    # When one call writes a at 6, b at 4 (stale) and c at 6, plus a new d at 4
    store.upsert_if_newer(
        COLLECTION,
        [live("a", 6, t="new"), live("b", 4, t="new"), live("c", 6, t="new"), live("d", 4, t="new")],
    )
    # Then one request per version, each with its own filter, and only the stale b is refused
    assert sorted(len(call["points"]) for call in upserts.calls) == [2, 2]
    assert all(call["update_filter"] is not None for call in upserts.calls)
    assert {cid: stored(store, cid).get("t") for cid in "abcd"} == {
        "a": "new",
        "b": None,
        "c": "new",
        "d": "new",
    }


def test_the_newest_write_of_an_id_wins_within_one_call(store):
    store.upsert_if_newer(
        COLLECTION, [live("v1", 7, t="seven"), live("v1", 9, t="nine"), live("v1", 8, t="eight")]
    )
    assert stored(store, "v1")["t"] == "nine"
    store.upsert_if_newer(COLLECTION, [live("v1", 10, t="first"), live("v1", 10, t="last")])
    assert stored(store, "v1")["t"] == "last"


@pytest.mark.parametrize("version", [None, "3", 2.0, True])
def test_a_point_without_an_int_version_is_a_programming_error(store, version):
    point = live("v1", None)
    if version is not None:
        point.payload["version"] = version
    with pytest.raises(EmbedServiceError) as raised:
        store.upsert_if_newer(COLLECTION, [point])
    assert not isinstance(raised.value, VectorStoreUnavailable)
    assert stored(store, "v1") is None


def test_a_custom_version_field_is_compared(store):
    first = Point(point_id("verse", "v1"), [1, 0, 0, 0], {"id": "v1", "rev": 2, "t": "two"})
    stale = Point(point_id("verse", "v1"), [1, 0, 0, 0], {"id": "v1", "rev": 1, "t": "one"})
    store.upsert_if_newer(COLLECTION, [first], version_field="rev")
    store.upsert_if_newer(COLLECTION, [stale], version_field="rev")
    assert stored(store, "v1")["t"] == "two"


def test_failures_become_vector_store_unavailable(store):
    with pytest.raises(VectorStoreUnavailable):
        store.upsert_if_newer("no_such_collection", [live("v1", 1)])


def test_nothing_to_write_sends_nothing(store, monkeypatch):
    upserts = spy(monkeypatch, store, "upsert")
    store.upsert_if_newer(COLLECTION, [])
    assert upserts.calls == []


# overwrite_payloads_if_newer


def test_payload_refreshes_apply_only_over_older_versions_and_keep_the_vector(store):
    store.upsert_if_newer(COLLECTION, [live("a", 2, vector=(0, 1, 0, 0)), live("b", 5)])
    store.upsert(COLLECTION, [live("c", None)])
    store.overwrite_payloads_if_newer(
        COLLECTION,
        {
            point_id("verse", "a"): {"id": "a", "version": 3, "t": "refreshed"},
            point_id("verse", "b"): {"id": "b", "version": 4, "t": "stale"},
            point_id("verse", "c"): {"id": "c", "version": 1, "t": "first versioned"},
            point_id("verse", "missing"): {"id": "missing", "version": 1},
        },
    )
    assert stored(store, "a") == {"id": "a", "version": 3, "t": "refreshed"}
    assert stored_vector(store, "a")[1] == pytest.approx(1.0)
    assert stored(store, "b")["version"] == 5
    assert stored(store, "c")["t"] == "first versioned"
    assert stored(store, "missing") is None


# scroll_ids


def test_scroll_ids_yield_ascending_point_ids_not_content_id_order(store):
    content_ids = [f"verse-{n}" for n in range(7)]
    pids = {point_id("verse", cid): cid for cid in content_ids}
    # Given content ids whose text order differs from their point-id order
    assert sorted(pids, key=pids.__getitem__) != sorted(pids)
    store.upsert_if_newer(COLLECTION, [live(cid, 1) for cid in content_ids])
    scrolled = [pid for pid, _ in store.scroll_ids(COLLECTION, page=3)]
    # Then they come back in ascending UUID (128-bit) order, which is lowercase string order too
    assert scrolled == sorted(pids, key=lambda pid: uuid.UUID(pid).int)
    assert scrolled == sorted(pids)


def test_local_mode_fact_scroll_sorts_canonical_lowercase_ids_whatever_the_insertion_order():
    client = QdrantClient(location=":memory:")
    client.create_collection("c", vectors_config=models.VectorParams(size=2, distance=models.Distance.COSINE))
    ids = [uuid.UUID(int=n * (2**120) + 7) for n in (9, 3, 15, 0, 12)]
    client.upsert("c", [models.PointStruct(id=str(i).upper(), vector=[1, 0]) for i in ids])
    records, _ = client.scroll("c", limit=10)
    assert [r.id for r in records] == [str(i) for i in sorted(ids, key=lambda i: i.int)]


def test_pages_of_two_over_seven_points_give_each_once_a_page_at_a_time(store, monkeypatch):
    content_ids = [f"n{n}" for n in range(6)]
    store.upsert_if_newer(
        COLLECTION, [live(cid, n + 1, content_hash=f"h{n}") for n, cid in enumerate(content_ids)]
    )
    store.upsert_if_newer(COLLECTION, [tombstone("gone", 3)])
    store.local = False  # the server's path: the public scroll, a page at a time (local mode sorts once)
    scrolls = spy(monkeypatch, store, "scroll")
    stream = store.scroll_ids(COLLECTION, page=2)
    first = next(stream)
    # Lazy: one page fetched for the first id
    assert len(scrolls.calls) == 1
    rest = list(stream)
    got = [first, *rest]
    assert len(got) == 7
    assert len({pid for pid, _ in got}) == 7
    assert {pid for pid, _ in got} == {point_id("verse", c) for c in [*content_ids, "gone"]}
    assert len(scrolls.calls) == 4
    assert all(call["limit"] == 2 and call["with_vectors"] is False for call in scrolls.calls)


def test_scroll_ids_carry_only_the_asked_fields(store):
    store.upsert_if_newer(COLLECTION, [live("v1", 4, content_hash="h", metadata={"a": 1}, text="t")])
    ((_, default),) = list(store.scroll_ids(COLLECTION))
    assert default == {"content_hash": "h", "version": 4, "deleted": False, "id": "v1", "owner_id": None}
    ((_, narrow),) = list(store.scroll_ids(COLLECTION, fields=("version",)))
    assert narrow == {"version": 4}


def test_scroll_ids_of_an_empty_collection_yield_nothing(store):
    assert list(store.scroll_ids(COLLECTION)) == []


def test_scroll_ids_failures_become_vector_store_unavailable(store):
    with pytest.raises(VectorStoreUnavailable):
        list(store.scroll_ids("no_such_collection"))


# search: tenants and metadata filters


def test_a_tenant_finds_its_own_and_shared_content_never_another_tenants(store):
    shared_absent = live("shared-absent", 1)
    del shared_absent.payload["owner_id"]
    store.upsert(
        COLLECTION,
        [
            shared_absent,
            live("shared-null", 1),
            live("mine", 1, owner_id="t1"),
            live("theirs", 1, owner_id="t2"),
        ],
    )
    found = {h.id for h in store.search(COLLECTION, [1, 0, 0, 0], limit=10, owner_id="t1")}
    assert found == {"shared-absent", "shared-null", "mine"}
    everyone = {h.id for h in store.search(COLLECTION, [1, 0, 0, 0], limit=10)}
    assert everyone == {"shared-absent", "shared-null", "mine", "theirs"}


@pytest.fixture
def tagged(store):
    store.upsert(
        COLLECTION,
        [
            live("gen", 1, metadata={"book": "Genesis", "chapter": 1, "canon": True, "weight": 0.5}),
            live("exo", 1, metadata={"book": "Exodus", "chapter": 2, "canon": True, "weight": 1.5}),
            live("tob", 1, metadata={"book": "Tobit", "chapter": 1, "canon": False}),
            live("bare", 1),
            live("other", 1, owner_id="t2", metadata={"book": "Genesis", "chapter": 1}),
        ],
    )
    return store


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"book": "Genesis"}, {"gen"}),
        ({"chapter": 1}, {"gen", "tob"}),
        ({"canon": False}, {"tob"}),
        ({"weight": 1.5}, {"exo"}),
        ({"book": ["Genesis", "Tobit"]}, {"gen", "tob"}),
        ({"chapter": [2, 3]}, {"exo"}),
        ({"book": ["Exodus", 1]}, {"exo"}),
        ({"book": "Genesis", "chapter": 2}, set()),
        ({"book": "Ruth"}, set()),
        ({}, {"gen", "exo", "tob", "bare"}),
    ],
)
def test_metadata_filters_match_exactly_and_lists_mean_any_of(tagged, filters, expected):
    hits = tagged.search(COLLECTION, [1, 0, 0, 0], limit=10, owner_id="t1", filters=filters)
    assert {h.id for h in hits} == expected


def test_metadata_filters_never_match_tombstones(tagged):
    tagged.upsert(COLLECTION, [tombstone("gen", 2)])
    assert tagged.search(COLLECTION, [1, 0, 0, 0], limit=10, filters={"book": "Genesis"})[0].id == "other"


@pytest.mark.parametrize(
    "filters",
    [
        {"book.title": "x"},
        {"": "x"},
        {"a" * 65: "x"},
        {"bök": "x"},
        {"book": []},
        {"book": {"nested": 1}},
        {"book": None},
        {"book": [["Genesis"]]},
    ],
)
def test_bad_filters_are_invalid_requests_before_qdrant_is_asked(tagged, monkeypatch, filters):
    queries = spy(monkeypatch, tagged, "query_points")
    with pytest.raises(InvalidRequest) as raised:
        tagged.search(COLLECTION, [1, 0, 0, 0], limit=10, filters=filters)
    assert raised.value.param == "filters"
    assert raised.value.status == 400
    assert queries.calls == []


def test_a_64_character_key_is_accepted(tagged):
    assert tagged.search(COLLECTION, [1, 0, 0, 0], limit=10, filters={"A_9" * 21 + "z": "x"}) == []


# payloads, collections and aliases


def test_payloads_page_over_more_than_a_thousand_ids(store, monkeypatch):
    content_ids = [f"p{n}" for n in range(5)]
    store.upsert(COLLECTION, [live(cid, 1) for cid in content_ids])
    asked = [point_id("verse", f"absent{n}") for n in range(2500)] + [
        point_id("verse", c) for c in content_ids
    ]
    retrieves = spy(monkeypatch, store, "retrieve")
    found = store.payloads(COLLECTION, asked)
    assert {p["id"] for p in found.values()} == set(content_ids)
    assert [len(call["ids"]) for call in retrieves.calls] == [1000, 1000, 505]
    assert store.payloads(COLLECTION, []) == {}


def test_switch_alias_moves_readers_in_one_aliases_request(store, monkeypatch):
    store.ensure_collection("verse_next", DIM)
    store.upsert(COLLECTION, [live("old", 1)])
    store.upsert("verse_next", [live("new1", 1), live("new2", 1)])
    store.create_alias("verse", COLLECTION)
    assert store.alias_target("verse") == COLLECTION
    assert store.count("verse") == 1
    updates = spy(monkeypatch, store, "update_collection_aliases")
    store.switch_alias("verse", "verse_next")
    assert store.alias_target("verse") == "verse_next"
    assert store.count("verse") == 2
    (call,) = updates.calls
    kinds = [type(op).__name__ for op in call["change_aliases_operations"]]
    assert kinds == ["DeleteAliasOperation", "CreateAliasOperation"]


def test_switch_alias_creates_an_alias_that_does_not_exist_yet(store):
    store.switch_alias("verse", COLLECTION)
    assert store.alias_target("verse") == COLLECTION


def test_alias_failures_become_vector_store_unavailable(store):
    with pytest.raises(VectorStoreUnavailable):
        store.switch_alias("verse", "no_such_collection")
    with pytest.raises(VectorStoreUnavailable):
        store.create_alias("verse", "no_such_collection")


def test_delete_collection_forgets_it_so_ensure_recreates_it(store):
    store.upsert(COLLECTION, [live("v1", 1)])
    store.delete_collection(COLLECTION)
    assert not store.exists(COLLECTION)
    store.delete_collection(COLLECTION)  # absent is fine
    store.ensure_collection(COLLECTION, DIM)
    assert store.exists(COLLECTION)
    assert store.count(COLLECTION) == 0


def test_local_modes_sorted_once_scroll_equals_the_public_scroll():
    """The local fast path (ids sorted once) yields what `scroll` yields, page by page, on the same data."""
    import uuid as uuid_module

    from embedsvc.adapters.qdrant import Point, VectorStore

    store = VectorStore.connect()
    store.ensure_collection("congruent", 4)
    points = [
        Point(
            str(uuid_module.UUID(int=(i * 7919) << 64, version=5)),
            [1.0, 0.0, 0.0, 0.0],
            {
                "id": f"d{i}",
                "version": i,
                "content_hash": f"h{i}",
                "deleted": i % 3 == 0,
                "metadata": {"x": i},
            },
        )
        for i in range(25)
    ]
    store.upsert("congruent", points)
    store.delete("congruent", [points[5].id])
    fast = list(store.scroll_ids("congruent", page=4))
    assert store._local_collection("congruent") is not None  # the fast path ran
    store.local = False  # what a server gets: the public scroll, page by page
    slow = list(store.scroll_ids("congruent", page=4))
    assert fast == slow and len(fast) == 24
    assert [pid for pid, _ in fast] == sorted(pid for pid, _ in fast)
    assert set(fast[0][1]) <= {"content_hash", "version", "deleted", "id", "owner_id"}  # no metadata
