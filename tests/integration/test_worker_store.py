"""The worker with a content store: requests by id, the row is the truth, versions never go backwards."""

from __future__ import annotations

import json
import random
import threading

import pytest

from embedsvc.adapters.content_store import content_point_id
from embedsvc.adapters.postgres import ConnectionSettings, Database
from embedsvc.services.indexing import Incoming
from tests.conftest import sim_registry


@pytest.fixture
def worker(aws, sim, emf, content_db, monkeypatch):
    """Worker, content store (real Postgres), in-memory Qdrant, models served by the simulator."""
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder

    dlq = client("sqs").create_queue(QueueName="test-index-dlq")["QueueUrl"]
    monkeypatch.setenv("INDEX_DLQ_URL", dlq)
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(sim_registry(sim)))
    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"note": ["te3s"], "verse": ["te3s"]}))
    reset_settings()
    container.put("costs", CostRecorder(sink=emf.append))
    return container


def by_id(content_id: str, content_type: str = "verse", **fields) -> str:
    return json.dumps({"content_type": content_type, "id": content_id, "source": "reindex", **fields})


def point(container, content_id: str, content_type: str = "verse", owner: str | None = None) -> dict | None:
    pid = content_point_id(content_type, content_id, owner)
    return container.vector_store().payloads(f"{content_type}_te3s", [pid]).get(pid)


def run(container, *bodies: str) -> object:
    return container.indexer().process([Incoming(f"m{i}", b) for i, b in enumerate(bodies)])


def test_a_request_by_id_indexes_the_current_row(worker):
    store = worker.content_store()
    store.put("verse", "Gen 1:1", text="In the beginning", metadata={"book": "Gen"}, owner_id=None)
    row = store.put(
        "verse", "Gen 1:1", text="In the beginning God created", metadata={"book": "Gen"}, owner_id=None
    )
    # A stale message with old text: ignored, the row is the truth.
    outcome = run(worker, by_id("Gen 1:1", text="In the beginning"))
    assert outcome.indexed == 1 and outcome.retry == []
    payload = point(worker, "Gen 1:1")
    assert payload["version"] == row.version and payload["content_hash"] == row.content_hash
    assert payload["metadata"] == {"book": "Gen"}
    assert run(worker, by_id("Gen 1:1")).unchanged == 1  # a redelivery spends nothing


def test_a_private_row_is_found_by_its_owner(worker):
    worker.content_store().put("note", "n1", text="my note", metadata={}, owner_id="tenant-a")
    assert run(worker, by_id("n1", "note", owner_id="tenant-a")).indexed == 1
    assert point(worker, "n1", "note", "tenant-a")["owner_id"] == "tenant-a"
    outcome = run(worker, by_id("n1", "note", owner_id="tenant-b"))  # no such note of tenant-b
    assert list(outcome.dead_lettered.values()) == [
        "no note with this id (and owner, for private types) in the content store"
    ]


def test_a_deleted_row_leaves_a_tombstone_without_its_vector(worker, sim):
    store = worker.content_store()
    store.put("verse", "v1", text="text", metadata={}, owner_id=None)
    run(worker, by_id("v1"))
    deleted = store.delete("verse", "v1", owner_id=None)
    assert run(worker, by_id("v1")).deleted == 1
    payload = point(worker, "v1")
    assert (
        payload["deleted"] is True
        and payload["version"] == deleted.version
        and payload["content_hash"] is None
    )
    requests = len(sim.records)
    assert run(worker, by_id("v1")).unchanged == 1 and len(sim.records) == requests


def test_a_missing_row_goes_to_the_dlq_with_its_reason(worker):
    outcome = run(worker, by_id("nowhere"))
    assert "no verse with this id" in outcome.dead_lettered["m0"]


def test_postgres_down_means_retry_not_loss(worker):
    from embedsvc.adapters.content_store import ContentStore
    from embedsvc.services.indexing import Indexer

    down = Database(ConnectionSettings(database="x", host="127.0.0.1", port=1, timeout=1))
    indexer = Indexer(
        worker.settings(),
        worker.embedding_service(),
        worker.vector_store(),
        lambda items: [],
        store=ContentStore(down, worker.settings().content_types),
    )
    outcome = indexer.process([Incoming("m0", by_id("v1"))])
    assert outcome.retry == ["m0"] and outcome.dead_lettered == {}


def test_concurrent_updates_and_redeliveries_keep_the_newest_version(worker):
    """Writers update one verse while workers index stale and fresh requests in random order."""
    store = worker.content_store()
    store.put("verse", "hot", text="version 0", metadata={}, owner_id=None)
    rng = random.Random(7)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        for n in range(1, 15):
            store.put("verse", "hot", text=f"version {n} {rng.random()}", metadata={}, owner_id=None)

    def indexer() -> None:
        try:
            while not stop.is_set():
                run(worker, by_id("hot"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=indexer) for _ in range(3)]
    for t in workers:
        t.start()
    writers = [threading.Thread(target=writer) for _ in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in workers:
        t.join()
    assert not errors
    run(worker, by_id("hot"))  # the last request after the last write (what the write-through queues)
    row = store.get("verse", "hot", owner_id=None)
    payload = point(worker, "hot")
    assert payload["version"] == row.version and payload["content_hash"] == row.content_hash


def test_a_delete_racing_index_requests_is_never_undone(worker):
    """An index request that read the row before the delete writes only if its version is newer: never."""
    from embedsvc.adapters.qdrant import Point

    store = worker.content_store()
    live = store.put("verse", "v9", text="text", metadata={}, owner_id=None)
    run(worker, by_id("v9"))
    store.delete("verse", "v9", owner_id=None)
    run(worker, by_id("v9"))
    # A slow worker that embedded the live row before the delete writes now: the conditional write refuses it.
    from embedsvc.services.index_points import live_payload

    dimensions = worker.settings().registry.models["te3s"].dimensions

    worker.vector_store().upsert_if_newer(
        "verse_te3s", [Point(live.point_id, [0.1] * dimensions, live_payload(live, "te3s", 0))]
    )
    assert point(worker, "v9")["deleted"] is True


def test_an_older_tombstone_is_rewritten_so_a_late_save_cannot_revive_the_content(worker):
    """Delete (v3, tombstoned), save (v4, slow), delete (v5, its tombstone write failed, queued): the worker
    rewrites the tombstone at v5, and the late v4 write is refused."""
    from embedsvc.adapters.qdrant import Point
    from embedsvc.services.index_points import live_payload

    store = worker.content_store()
    store.put("verse", "v1", text="first", metadata={}, owner_id=None)
    store.put("verse", "v1", text="second", metadata={}, owner_id=None)
    store.delete("verse", "v1", owner_id=None)  # v3
    run(worker, by_id("v1"))
    assert point(worker, "v1")["version"] == 3
    saved = store.put("verse", "v1", text="third", metadata={}, owner_id=None)  # v4, its vector still coming
    store.delete("verse", "v1", owner_id=None)  # v5, tombstone write failed: only the queued request
    assert run(worker, by_id("v1")).deleted == 1
    dimensions = worker.settings().registry.models["te3s"].dimensions
    worker.vector_store().upsert_if_newer(
        "verse_te3s", [Point(saved.point_id, [0.1] * dimensions, live_payload(saved, "te3s", 0))]
    )
    payload = point(worker, "v1")
    assert payload["deleted"] is True and payload["version"] == 5
