"""The embedding worker: SQS batches -> one packed provider call -> Qdrant, with per-message verdicts."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from embedsvc.adapters.qdrant import point_id
from embedsvc.errors import VectorStoreUnavailable
from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.local.provider_sim import Fault, hash_vector
from embedsvc.services.indexing import Incoming
from tests.conftest import load_event, sim_registry

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def worker(aws, sim, emf, monkeypatch):
    """The worker's dependencies: moto SQS DLQ, in-memory Qdrant, models served by the simulator."""
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


def message(content_id: str, text: str | None = "some text", **fields) -> str:
    body = {
        "schema_version": 1,
        "content_type": "note",
        "id": content_id,
        "text": text,
        "owner_id": "tenant-a",
        "source": "note_index",
        "task_id": "task-1",
        "priority": "bulk",
        "updated_at": T0.isoformat(),
        **fields,
    }
    return json.dumps(body)


def incoming(*bodies: str, prefix: str = "m") -> list[Incoming]:
    return [Incoming(f"{prefix}{i}", body) for i, body in enumerate(bodies)]


def dlq_messages(container) -> list[dict]:
    from embedsvc.adapters.aws import client

    answer = client("sqs").receive_message(
        QueueUrl=container.settings().index_dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    )
    return answer.get("Messages", [])


def stored(container, collection: str, content_id: str, content_type: str = "note") -> dict | None:
    return (
        container.vector_store()
        .payloads(collection, [point_id(content_type, content_id)])
        .get(point_id(content_type, content_id))
    )


def test_a_batch_is_embedded_with_one_provider_request_and_upserted(worker, sim):
    outcome = worker.indexer().process(incoming(*(message(f"n{i}", f"note text {i}") for i in range(5))))
    assert outcome.retry == [] and outcome.indexed == 5
    assert [r.inputs for r in sim.records] == [5]
    payload = stored(worker, "note_te3s", "n3")
    assert payload["id"] == "n3" and payload["owner_id"] == "tenant-a" and payload["model"] == "te3s"
    assert payload["updated_at"] == int(T0.timestamp() * 1000)
    records = worker.vector_store().client.retrieve("note_te3s", [point_id("note", "n3")], with_vectors=True)
    assert np.allclose(records[0].vector, hash_vector("note text 3", 1536), atol=1e-5)


def test_poison_message_goes_to_the_dlq_with_its_reason_and_the_others_succeed(worker, sim):
    from functions.embed_worker.app import lambda_handler

    answer = lambda_handler(load_event("embed_worker/batch_with_poison.json"), LocalLambdaContext("worker"))
    assert answer == {"batchItemFailures": []}  # the poison is acknowledged: it is in the DLQ, not retried
    (dead,) = dlq_messages(worker)
    reason = dead["MessageAttributes"]["failure_reason"]["StringValue"]
    assert "unsupported schema_version 7" in reason
    assert (
        json.loads(dead["Body"])["schema_version"] == 7
    )  # the original body, for a producer to fix and replay
    assert worker.vector_store().count("verse_te3s") == 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (message("x", text=None), "text is required"),
        (message("x", text="   "), "text is empty"),
        (message("x", models=["nope"]), "unknown model"),
        (message("x", content_type="Bad Type"), "content_type"),
        (message("x", priority="urgent"), "priority"),
        (message("x", surprise=1), "surprise"),
    ],
)
def test_every_kind_of_invalid_message_is_dead_lettered_with_a_reason(worker, sim, body, reason):
    outcome = worker.indexer().process(incoming(body))
    assert outcome.retry == []
    assert reason in outcome.dead_lettered["m0"]
    assert reason in dlq_messages(worker)[0]["MessageAttributes"]["failure_reason"]["StringValue"]
    assert sim.calls == 0


def test_an_unreachable_dlq_means_retry_not_loss(worker, monkeypatch):
    worker.indexer().dead_letter = lambda items: [i.message_id for i, _ in items]
    outcome = worker.indexer().process(incoming("garbage"))
    assert outcome.retry == ["m0"] and outcome.dead_lettered == {}


def test_a_429_in_the_middle_of_a_batch_fails_only_the_affected_messages(worker, sim):
    # small-test-model packs 4 inputs per request: 10 messages -> requests of 4, 4, 2.
    sim.inject(
        Fault(),  # the first request passes
        *[Fault(status=429, headers={"retry-after-ms": "20"})] * 3,  # the second is throttled three times
    )
    bodies = [message(f"n{i}", f"text {i}", models=["small"]) for i in range(10)]
    outcome = worker.indexer().process(incoming(*bodies))
    assert sorted(outcome.retry) == ["m4", "m5", "m6", "m7"]
    assert outcome.indexed == 6
    assert stored(worker, "note_small", "n4") is None and stored(worker, "note_small", "n9") is not None


def test_qdrant_down_fails_every_message_transiently_and_acknowledges_nothing(worker, monkeypatch):
    store = worker.vector_store()

    def down(*args, **kwargs):
        raise VectorStoreUnavailable("qdrant upsert failed: connection refused")

    monkeypatch.setattr(store, "upsert", down)
    outcome = worker.indexer().process(incoming(message("a"), message("b", "other")))
    assert sorted(outcome.retry) == ["m0", "m1"]
    assert outcome.indexed == 0 and outcome.dead_lettered == {}


def test_duplicate_delivery_is_idempotent_and_unchanged_content_costs_no_provider_call(worker, sim, emf):
    batch = incoming(message("a", "alpha"), message("b", "beta"))
    worker.indexer().process(batch)
    calls, cost_events = sim.calls, len([b for b in emf if "Tokens" in b])
    outcome = worker.indexer().process(batch)
    assert outcome.unchanged == 2 and outcome.indexed == 0
    assert sim.calls == calls and len([b for b in emf if "Tokens" in b]) == cost_events
    assert sum(b["SavedTokens"][0] for b in emf if "SavedTokens" in b) == 2  # the skips, as saved tokens
    assert worker.vector_store().count("note_te3s") == 2


def test_changed_text_is_reembedded(worker, sim):
    worker.indexer().process(incoming(message("a", "first version")))
    later = (T0 + timedelta(minutes=1)).isoformat()
    worker.indexer().process(incoming(message("a", "translation corrected", updated_at=later)))
    records = worker.vector_store().client.retrieve("note_te3s", [point_id("note", "a")], with_vectors=True)
    assert np.allclose(records[0].vector, hash_vector("translation corrected", 1536), atol=1e-5)


def test_an_older_update_never_overwrites_a_newer_vector(worker, sim):
    newer, older = (T0 + timedelta(hours=1)).isoformat(), T0.isoformat()
    worker.indexer().process(incoming(message("a", "newest text", updated_at=newer)))
    outcome = worker.indexer().process(incoming(message("a", "stale text", updated_at=older)))
    assert outcome.stale == 1 and outcome.retry == []
    records = worker.vector_store().client.retrieve("note_te3s", [point_id("note", "a")], with_vectors=True)
    assert np.allclose(records[0].vector, hash_vector("newest text", 1536), atol=1e-5)


def test_within_one_batch_the_newest_update_wins(worker, sim):
    newer = (T0 + timedelta(hours=1)).isoformat()
    outcome = worker.indexer().process(
        incoming(message("a", "newest", updated_at=newer), message("a", "older"))
    )
    assert outcome.superseded == 1 and outcome.retry == []
    assert [r.inputs for r in sim.records] == [1]
    records = worker.vector_store().client.retrieve("note_te3s", [point_id("note", "a")], with_vectors=True)
    assert np.allclose(records[0].vector, hash_vector("newest", 1536), atol=1e-5)


def test_delete_leaves_a_tombstone_that_search_and_count_skip_and_an_older_delete_is_ignored(worker):
    worker.indexer().process(
        incoming(message("a", "alpha", updated_at=(T0 + timedelta(hours=1)).isoformat()))
    )
    worker.indexer().process(incoming(message("a", text=None, delete=True)))  # older than the vector
    assert stored(worker, "note_te3s", "a")["deleted"] is False
    later = (T0 + timedelta(hours=2)).isoformat()
    outcome = worker.indexer().process(incoming(message("a", text=None, delete=True, updated_at=later)))
    assert outcome.deleted == 1
    assert stored(worker, "note_te3s", "a")["deleted"] is True
    store = worker.vector_store()
    assert store.count("note_te3s") == 0 and store.count("note_te3s", include_tombstones=True) == 1
    assert store.search("note_te3s", hash_vector("alpha", 1536), limit=5) == []


def test_an_update_older_than_a_delete_does_not_resurrect_the_content(worker, sim):
    worker.indexer().process(incoming(message("a", "alpha")))
    later = (T0 + timedelta(hours=2)).isoformat()
    worker.indexer().process(incoming(message("a", text=None, delete=True, updated_at=later)))
    outcome = worker.indexer().process(
        incoming(message("a", "late alpha", updated_at=(T0 + timedelta(hours=1)).isoformat()))
    )
    assert outcome.stale == 1
    assert worker.vector_store().count("note_te3s") == 0


def test_a_delete_that_arrives_before_its_content_still_wins(worker, sim):
    later = (T0 + timedelta(hours=2)).isoformat()
    worker.indexer().process(incoming(message("a", text=None, delete=True, updated_at=later)))
    outcome = worker.indexer().process(incoming(message("a", "alpha")))
    assert outcome.stale == 1 and sim.calls == 0
    assert worker.vector_store().count("note_te3s") == 0


def test_content_newer_than_its_delete_comes_back(worker, sim):
    worker.indexer().process(incoming(message("a", text=None, delete=True)))
    later = (T0 + timedelta(hours=1)).isoformat()
    outcome = worker.indexer().process(incoming(message("a", "alpha again", updated_at=later)))
    assert outcome.indexed == 1 and worker.vector_store().count("note_te3s") == 1


def test_a_new_owner_with_the_same_text_rewrites_the_payload_without_a_provider_call(worker, sim):
    worker.indexer().process(incoming(message("a", "same text")))
    later = (T0 + timedelta(minutes=5)).isoformat()
    outcome = worker.indexer().process(
        incoming(message("a", "same text", owner_id="tenant-b", metadata={"moved": True}, updated_at=later))
    )
    assert outcome.refreshed == 1 and sim.calls == 1
    payload = stored(worker, "note_te3s", "a")
    assert payload["owner_id"] == "tenant-b" and payload["metadata"] == {"moved": True}
    assert payload["updated_at"] == int((T0 + timedelta(minutes=5)).timestamp() * 1000)
    assert [
        h.id
        for h in worker.vector_store().search(
            "note_te3s", hash_vector("same text", 1536), limit=1, owner_id="tenant-a"
        )
    ] == []


def test_without_updated_at_the_sqs_sent_timestamp_orders_versions(worker, sim):
    def body(text: str) -> str:
        raw = json.loads(message("a", text))
        del raw["updated_at"]
        return json.dumps(raw)

    worker.indexer().process([Incoming("new", body("newer text"), sent_at_ms=2_000_000)])
    outcome = worker.indexer().process(
        [Incoming("old", body("older text"), sent_at_ms=1_000_000)]
    )  # redelivered late
    assert outcome.stale == 1
    records = worker.vector_store().client.retrieve("note_te3s", [point_id("note", "a")], with_vectors=True)
    assert np.allclose(records[0].vector, hash_vector("newer text", 1536), atol=1e-5)


def test_an_input_the_provider_rejects_is_isolated_and_dead_lettered_alone(worker, sim):
    # One request of 4 is refused; halving finds the one input the provider refuses.
    sim.inject(
        Fault(status=400, message="input 0 is not allowed"),
        Fault(status=400, message="input 0 is not allowed"),
        Fault(status=400, message="input 0 is not allowed"),
    )
    outcome = worker.indexer().process(incoming(*(message(f"n{i}", f"text {i}") for i in range(4))))
    assert outcome.retry == []
    assert list(outcome.dead_lettered) == ["m0"] and "input 0 is not allowed" in outcome.dead_lettered["m0"]
    assert outcome.indexed == 3
    assert [r.inputs for r in sim.records] == [4, 2, 1, 1, 2]


def test_the_newest_update_wins_per_collection_not_per_content(worker, sim):
    newer = (T0 + timedelta(hours=1)).isoformat()
    outcome = worker.indexer().process(
        incoming(
            message("a", "for te3s", models=["te3s"], updated_at=newer),
            message("a", "for small", models=["small"]),
        )
    )
    assert outcome.superseded == 0 and outcome.indexed == 2
    assert stored(worker, "note_small", "a") is not None and stored(worker, "note_te3s", "a") is not None


def test_work_not_started_before_the_deadline_is_returned_for_redelivery(worker, sim):
    import time

    outcome = worker.indexer().process(incoming(message("a"), "not json"), deadline=time.monotonic() - 1)
    assert outcome.retry == ["m0"] and "m1" in outcome.dead_lettered  # poison still reaches the DLQ
    assert sim.calls == 0


def test_an_unknown_cost_source_is_dead_lettered(worker, sim):
    outcome = worker.indexer().process(incoming(message("a", source="marketing")))
    assert "unknown source 'marketing'" in outcome.dead_lettered["m0"]


def test_costs_in_a_mixed_batch_are_attributed_to_each_messages_source(worker, sim, emf):
    bodies = [
        message("a", "one two three four", source="note_index"),
        message("v", "five six", source="verse_index"),
    ]
    worker.indexer().process(incoming(*bodies))
    assert sim.calls == 1
    tokens = {blob["source"]: blob["Tokens"][0] for blob in emf}
    assert set(tokens) == {"note_index", "verse_index"}
    assert sum(tokens.values()) == sim.records[0].tokens
    assert sum(blob["ProviderRequests"][0] for blob in emf) == 1


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_randomized_faults_every_message_ends_in_qdrant_or_the_dlq(worker, sim, monkeypatch, seed):
    """SQS semantics played out: retries until success, or maxReceiveCount then the DLQ. Nothing is lost."""
    rng = random.Random(seed)
    store = worker.vector_store()
    real_upsert = store.upsert

    def flaky_upsert(collection, points):
        if rng.random() < 0.25:
            raise VectorStoreUnavailable("qdrant timed out")
        real_upsert(collection, points)

    monkeypatch.setattr(store, "upsert", flaky_upsert)
    bodies: dict[str, str] = {}
    for i in range(40):
        if rng.random() < 0.15:
            bodies[f"m{i}"] = rng.choice(
                ["{", message(f"x{i}", text=None), json.dumps({"schema_version": 2})]
            )
        else:
            bodies[f"m{i}"] = message(
                f"n{i}", f"text {i} {rng.random()}", models=[rng.choice(["te3s", "small"])]
            )
    receives = dict.fromkeys(bodies, 0)
    queue = list(bodies)
    redriven: set[str] = set()
    max_receives = 5
    while queue:
        for _ in range(rng.randint(0, 3)):
            sim.inject(
                rng.choice([Fault(status=500), Fault(status=429, headers={"retry-after-ms": "5"}), Fault()])
            )
        batch_ids = queue[:10]
        queue = queue[10:]
        for mid in batch_ids:
            receives[mid] += 1
        outcome = worker.indexer().process([Incoming(mid, bodies[mid], receives[mid]) for mid in batch_ids])
        for mid in outcome.retry:
            if receives[mid] >= max_receives:
                redriven.add(mid)  # SQS's redrive policy moves it to the DLQ
            else:
                queue.append(mid)
        sim.faults.clear()
    dead = {m["Body"] for m in dlq_messages(worker)}
    while batch := dlq_messages(worker):
        dead |= {m["Body"] for m in batch}
    for mid, body in bodies.items():
        try:
            parsed = json.loads(body)
            content_id, model = parsed["id"], parsed["models"][0]
        except (ValueError, KeyError, TypeError):
            content_id = None
        in_qdrant = content_id is not None and stored(worker, f"note_{model}", content_id) is not None
        if content_id is None or "text" not in parsed or parsed.get("text") is None:
            assert body in dead, f"poison {mid} did not reach the DLQ with its reason"
        else:
            assert in_qdrant or mid in redriven, f"{mid} was lost"
    valid = [mid for mid, body in bodies.items() if '"text": "text' in body]
    # Redrive is the exception: most valid messages must make it (a worker that always fails would not).
    assert len(redriven) <= len(valid) // 4


def test_the_handler_accepts_records_without_sqs_attributes(worker, sim):
    from functions.embed_worker.app import lambda_handler

    event = {
        "Records": [
            {
                "messageId": "m1",
                "receiptHandle": "r",
                "body": message("a"),
                "attributes": {},
                "eventSource": "aws:sqs",
            }
        ]
    }
    assert lambda_handler(event, LocalLambdaContext("worker")) == {"batchItemFailures": []}
    assert stored(worker, "note_te3s", "a") is not None


class ShortLivedContext(LocalLambdaContext):
    """A Lambda invocation with only `seconds` left before its timeout."""

    def __init__(self, seconds: float):
        super().__init__("worker")
        self._ends_at = __import__("time").monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self._ends_at - __import__("time").monotonic()) * 1000)


def test_a_batch_with_too_little_time_left_is_returned_without_calling_the_provider(worker, sim):
    import time

    from functions.embed_worker.app import SAFETY_SECONDS, lambda_handler

    event = load_event("embed_worker/batch_ok.json")
    started = time.monotonic()
    answer = lambda_handler(event, ShortLivedContext(SAFETY_SECONDS + 2.0))  # 2 s < a provider call's 5 s
    assert time.monotonic() - started < 2.0
    assert len(answer["batchItemFailures"]) == len(event["Records"])
    assert sim.calls == 0


def test_a_rate_limit_wait_never_runs_past_the_deadline(worker, sim):
    import time

    from embedsvc.services.ratelimit import Lane

    router = worker.router()
    limit = router.limit_for("sim", "text-embedding-3-small")
    spent = worker.ledger().budgeted(limit)
    # A user took the whole window: it is full for 60 s (bulk alone never takes the idle reserve).
    worker.ledger().acquire(limit, spent.tpm, Lane.REALTIME, max_wait_seconds=0)
    started = time.monotonic()
    outcome = worker.indexer().process(incoming(message("a")), deadline=started + 8.0)
    assert time.monotonic() - started < 4.0  # it may wait 8 - 5 s at most, and knows at once it cannot fit
    assert outcome.retry == ["m0"] and sim.calls == 0


def test_a_slow_provider_call_is_cut_at_the_deadline(worker, sim, monkeypatch):
    import time

    monkeypatch.setattr(worker.router(), "min_call_seconds", 0.5)
    worker.settings().registry.providers["sim"].timeout_seconds = 30.0  # the provider's own timeout is long
    sim.inject(Fault(delay_seconds=6.0))
    started = time.monotonic()
    outcome = worker.indexer().process(incoming(message("a")), deadline=started + 1.5)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0  # cut at the deadline, not after the provider's 30 s
    assert outcome.retry == ["m0"]


def test_a_redelivered_batch_does_not_dead_letter_a_message_twice(worker, sim):
    batch = incoming(message("a"), "not json")
    first = worker.indexer().process(batch)
    second = worker.indexer().process(batch)  # e.g. the Lambda timed out after the first try
    assert "m1" in first.dead_lettered and "m1" in second.dead_lettered  # acknowledged both times
    assert second.retry == []
    assert len(dlq_messages(worker)) == 1  # but sent once


def test_a_crash_after_dead_lettering_redelivers_the_batch_and_sends_nothing_twice(worker, sim, monkeypatch):
    import time

    from embedsvc.adapters.aws import client
    from embedsvc.local.poller import RETRY_VISIBILITY_SECONDS, SqsPoller
    from functions.embed_worker.app import lambda_handler

    sqs = client("sqs")
    queue = sqs.create_queue(QueueName="crash-index", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    for body in (message("a"), "not json"):
        sqs.send_message(QueueUrl=queue, MessageBody=body)
    store = worker.vector_store()
    real_upsert = store.upsert

    def crash(*args, **kwargs):
        raise RuntimeError("Task timed out after 120.00 seconds")  # what a killed invocation looks like

    monkeypatch.setattr(store, "upsert", crash)
    poller = SqsPoller(sqs, queue, lambda_handler, batch_size=10, window_seconds=0)
    assert poller.poll_once() == 2  # dead-letters the poison, then dies: the whole batch comes back
    monkeypatch.setattr(store, "upsert", real_upsert)
    time.sleep(RETRY_VISIBILITY_SECONDS + 0.5)  # the failed batch becomes visible again
    delivered = poller.drain(idle_polls=3, timeout_seconds=20)
    assert delivered == 2
    assert stored(worker, "note_te3s", "a") is not None
    assert len(dlq_messages(worker)) == 1


def test_a_delete_replaces_the_vector_so_the_deleted_text_s_embedding_is_gone(worker, sim):
    from embedsvc.services.indexing import tombstone_vector

    worker.indexer().process(incoming(message("a", "a private thought")))
    later = (T0 + timedelta(hours=1)).isoformat()
    worker.indexer().process(incoming(message("a", text=None, delete=True, updated_at=later)))
    (record,) = worker.vector_store().client.retrieve("note_te3s", [point_id("note", "a")], with_vectors=True)
    assert record.payload["deleted"] is True
    assert np.allclose(record.vector, tombstone_vector(1536))
    assert not np.allclose(record.vector, hash_vector("a private thought", 1536), atol=1e-3)
