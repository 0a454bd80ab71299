"""Seeded chaos: writes, deletes, redeliveries and injected failures; after repair, no gap is left.

Each seed plays a random sequence against the real components (Postgres, Qdrant local mode, moto SQS,
the provider simulator over HTTP): write-through saves and deletes, worker runs over whatever is on the
queue, redeliveries of messages already handled, and failures of Qdrant, the queue, the provider and
Postgres injected at random. Then the failures stop, the repair job and the worker run, the audit
runs; the audit must find no gap, and every live row's point must hold its current text's hash and
version, every deleted row's point must be a tombstone or absent.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from embedsvc.adapters.index_queue import IndexQueue
from embedsvc.errors import ContentStoreUnavailable, EmbedServiceError, ProviderError, VectorStoreUnavailable
from embedsvc.observability import CallContext
from embedsvc.services.audit import AuditJob
from embedsvc.services.documents import DocumentService
from embedsvc.services.indexing import Incoming, Indexer
from embedsvc.services.repair import RepairJob
from tests.conftest import sim_registry

IDS = [f"doc-{i}" for i in range(12)]
TENANTS = ["tenant-a", "tenant-b"]


class Faults:
    """Which dependencies fail now, and how often a call to a failing one fails."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.rates = {"qdrant": 0.0, "queue": 0.0, "provider": 0.0, "postgres": 0.0}

    def shuffle(self) -> None:
        for name in self.rates:
            self.rates[name] = self.rng.choice([0.0, 0.0, 0.3, 0.8])

    def heal(self) -> None:
        self.rates = dict.fromkeys(self.rates, 0.0)

    def hit(self, name: str) -> bool:
        return self.rng.random() < self.rates[name]


class Flaky:
    """A proxy whose named methods fail when `faults` says so."""

    def __init__(
        self, inner: Any, faults: Faults, dependency: str, methods: set[str], error: type[EmbedServiceError]
    ):
        self._inner, self._faults, self._dependency, self._methods, self._error = (
            inner,
            faults,
            dependency,
            methods,
            error,
        )

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in self._methods:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._faults.hit(self._dependency):
                raise self._error(f"injected {self._dependency} failure")
            return attribute(*args, **kwargs)

        return call


class FlakyQueue:
    def __init__(self, inner: IndexQueue, faults: Faults):
        self._inner, self._faults = inner, faults

    def send(self, messages):
        if self._faults.hit("queue"):
            return list(range(len(messages)))
        return self._inner.send(messages)


@pytest.fixture
def world(aws, sim, emf, content_db, monkeypatch):
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder

    sqs = client("sqs")
    queue_url = sqs.create_queue(QueueName="chaos-index")["QueueUrl"]
    monkeypatch.setenv("INDEX_QUEUE_URL", queue_url)
    monkeypatch.setenv("INDEX_DLQ_URL", sqs.create_queue(QueueName="chaos-dlq")["QueueUrl"])
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(sim_registry(sim)))
    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"note": ["te3s"], "verse": ["te3s"]}))
    reset_settings()
    container.put("costs", CostRecorder(sink=emf.append))
    return container, sqs, queue_url


def receive(sqs, queue_url: str, limit: int = 10) -> list[tuple[Incoming, str]]:
    answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=limit, VisibilityTimeout=0)
    return [(Incoming(m["MessageId"], m["Body"]), m["ReceiptHandle"]) for m in answer.get("Messages", [])]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_after_chaos_the_repair_and_the_audit_leave_no_gap(world, seed):
    container, sqs, queue_url = world
    rng = random.Random(seed)
    faults = Faults(rng)
    settings = container.settings()
    store, vectors, queue = container.content_store(), container.vector_store(), container.index_queue()
    flaky_store = Flaky(
        store, faults, "postgres", {"put", "delete", "rows_by_point"}, ContentStoreUnavailable
    )
    flaky_vectors = Flaky(
        vectors,
        faults,
        "qdrant",
        {"upsert", "upsert_if_newer", "payloads", "overwrite_payloads_if_newer"},
        VectorStoreUnavailable,
    )
    flaky_embeddings = Flaky(
        container.embedding_service(), faults, "provider", {"embed_partial"}, ProviderError
    )
    documents = DocumentService(
        settings, flaky_store, flaky_embeddings, flaky_vectors, FlakyQueue(queue, faults)
    )
    dead: list[str] = []
    indexer = Indexer(
        settings,
        flaky_embeddings,
        flaky_vectors,
        lambda items: dead.extend(r for _, r in items) and [],
        store=flaky_store,
    )
    handled: list[Incoming] = []
    counts = {"saves": 0, "deletes": 0, "failed_commits": 0, "worker_runs": 0, "redeliveries": 0}

    for step in range(70):
        if step % 10 == 0:
            faults.shuffle()
        action = rng.choices(["put", "delete", "work", "redeliver"], weights=[5, 2, 3, 1])[0]
        content_type = rng.choice(["verse", "note"])
        tenant = rng.choice(TENANTS)
        context = CallContext(source="verse_index", user_id="u", tenant_id=tenant)
        try:
            if action == "put":
                documents.put(
                    content_type,
                    rng.choice(IDS),
                    text=f"text {seed}-{step} {rng.random()}",
                    metadata={"step": step},
                    context=context,
                )
                counts["saves"] += 1
            elif action == "delete":
                documents.delete(content_type, rng.choice(IDS), context=context)
                counts["deletes"] += 1
        except ContentStoreUnavailable:
            counts["failed_commits"] += 1  # nothing committed: the client sees a 503 and retries
        except EmbedServiceError as exc:
            assert exc.code == "document_not_found"  # deleting what is not there (or no longer)
        if action == "work":
            batch = receive(sqs, queue_url)
            outcome = indexer.process([m for m, _ in batch])
            for message, receipt in batch:
                if message.message_id not in outcome.retry:
                    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=receipt)
                    handled.append(message)
            counts["worker_runs"] += 1
        elif action == "redeliver" and handled:
            indexer.process([Incoming(f"again-{step}", rng.choice(handled).body)])  # an old message again
            counts["redeliveries"] += 1

    faults.heal()
    assert counts["saves"] > 10 and counts["worker_runs"] > 5
    repair = RepairJob(store, vectors, queue, settings).run()
    assert repair.ok
    healthy = Indexer(settings, container.embedding_service(), vectors, lambda items: [], store=store)
    for _ in range(3):  # the repair's and the audit's requests, and anything left from the chaos
        while batch := receive(sqs, queue_url):
            outcome = healthy.process([m for m, _ in batch])
            assert outcome.retry == []
            for _, receipt in batch:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=receipt)
        AuditJob(store, vectors, queue, None, settings, container.ops_metrics()).run()
    report = (
        AuditJob(store, vectors, queue, None, settings, container.ops_metrics()).run(dry_run=True).as_dict()
    )
    for name, collection in report["collections"].items():
        assert (collection["missing"], collection["orphaned"], collection["stale"]) == (0, 0, 0), (
            name,
            report,
        )
    assert dead == []  # nothing in the chaos was poison: every failure was transient

    for content_type in ("verse", "note"):
        for state in store.iter_point_states(content_type):
            payload = vectors.payloads(f"{content_type}_te3s", [state.point_id]).get(state.point_id)
            if state.deleted:
                assert payload is None or payload["deleted"] is True
            else:
                assert payload is not None and not payload["deleted"]
                assert (payload["content_hash"], payload["version"]) == (state.content_hash, state.version)
