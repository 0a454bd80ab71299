"""Budgets end to end: a runaway reindex stops at its budget, a refused API request answers 429, the CLI."""

from __future__ import annotations

import json

import pytest

from embedsvc.services.indexing import Incoming
from embedsvc.services.tokens import count_tokens
from tests.conftest import sim_registry

TASK = "reindex-2026-11"


@pytest.fixture
def worker(aws, sim, emf, monkeypatch):
    """The worker with a DLQ (moto), in-memory Qdrant, te3s served by the simulator."""
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder

    dlq = client("sqs").create_queue(QueueName="test-index-dlq")["QueueUrl"]
    monkeypatch.setenv("INDEX_DLQ_URL", dlq)
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(sim_registry(sim)))
    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"note": ["te3s"]}))
    reset_settings()
    container.put("costs", CostRecorder(sink=emf.append))
    return container


def reindex_message(i: int) -> str:
    return json.dumps(
        {
            "schema_version": 1,
            "content_type": "note",
            "id": f"n{i}",
            "text": f"note {i}: " + " ".join(["grace and peace to you"] * 3),
            "owner_id": "tenant-a",
            "source": "reindex",
            "task_id": TASK,
            "priority": "bulk",
            "updated_at": "2026-11-01T00:00:00+00:00",
        }
    )


def dlq_reasons(container) -> list[str]:
    from embedsvc.adapters.aws import client

    reasons = []
    while True:
        answer = client("sqs").receive_message(
            QueueUrl=container.settings().index_dlq_url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            VisibilityTimeout=600,
        )
        messages = answer.get("Messages", [])
        if not messages:
            return reasons
        reasons += [m["MessageAttributes"]["failure_reason"]["StringValue"] for m in messages]


def budget_refusals(emf: list[dict]) -> list[dict]:
    return [blob for blob in emf if "BudgetRefused" in blob]


def test_a_runaway_reindex_stops_at_its_budget_within_one_request(worker, sim, emf):
    spec = worker.settings().registry.model("te3s")
    bodies = [reindex_message(i) for i in range(60)]
    per_message = count_tokens(spec, [json.loads(bodies[0])["text"]])[0]
    per_request = 10 * per_message  # the worker packs a batch of 10 into one provider request
    limit = 3 * per_request + per_request // 2  # three and a half requests' worth
    worker.budgets().set("task", TASK, tokens=limit)

    outcomes = []
    for start in range(0, len(bodies), 10):  # SQS delivers the backlog in batches of 10
        batch = [Incoming(f"m{i}", bodies[i]) for i in range(start, start + 10)]
        outcomes.append(worker.indexer().process(batch))

    received = sum(r.tokens for r in sim.records)
    budget = worker.budgets().get("task", TASK)
    assert budget is not None and budget.exhausted
    assert budget.spent_tokens == received <= limit  # never past it, and what was charged is what was sent
    assert received > limit - per_request  # it stopped within one request of the budget, not earlier
    assert sum(o.indexed for o in outcomes) == 30 and len(sim.records) == 3
    refused = [mid for o in outcomes for mid, reason in o.dead_lettered.items()]
    assert len(refused) == 30 and all(o.retry == [] for o in outcomes)  # dead-lettered, not retried
    reasons = dlq_reasons(worker)
    assert len(reasons) == 30 and all(r.startswith("budget_exceeded: the task budget") for r in reasons)
    assert budget_refusals(emf) and all(b["scope"] == "task" for b in budget_refusals(emf))

    # A redelivered batch (a Lambda that timed out after dead-lettering) is not dead-lettered twice.
    again = worker.indexer().process([Incoming(f"m{i}", bodies[i]) for i in range(50, 60)])
    assert len(again.dead_lettered) == 10 and dlq_reasons(worker) == []
    assert len(sim.records) == 3


def test_raising_the_budget_lets_the_task_go_on(worker, sim):
    spec = worker.settings().registry.model("te3s")
    bodies = [reindex_message(i) for i in range(4)]
    per_message = count_tokens(spec, [json.loads(bodies[0])["text"]])[0]
    worker.budgets().set("task", TASK, tokens=per_message)
    first = worker.indexer().process([Incoming("a", bodies[0]), Incoming("b", bodies[1])])
    assert first.indexed == 0 and len(first.dead_lettered) == 2  # one request of two: more than the budget
    worker.budgets().set("task", TASK, tokens=10 * per_message)
    budget = worker.budgets().get("task", TASK)
    assert budget is not None and not budget.exhausted
    second = worker.indexer().process([Incoming("c", bodies[2]), Incoming("d", bodies[3])])
    assert second.indexed == 2


def test_a_budget_refused_api_request_answers_429_in_openai_shape(service, sim, call_api):
    service.budgets().set("tenant", "tenant-a", usd=0.000001)  # $1e-6: 50 te3s tokens
    text = " ".join(["In the beginning was the Word"] * 20)
    status, body, headers = call_api({"model": "te3s", "input": text})
    assert status == 429
    error = body["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    assert "tenant budget 'tenant-a'" in error["message"] and error["param"] is None
    assert int(headers["retry-after"]) > 0  # a monthly budget refills when the month ends
    assert headers["x-should-retry"] == "false"
    assert sim.calls == 0  # refused before any provider call

    status, body, _ = call_api({"model": "te3s", "input": "grace"})  # a small one still fits
    assert status == 200

    service.budgets().clear("tenant", "tenant-a")
    service.budgets().set("task", "import-9", tokens=3)
    status, body, headers = call_api({"model": "te3s", "input": text}, headers={"X-Task-Id": "import-9"})
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    assert "task budget 'import-9'" in body["error"]["message"]
    assert "retry-after" not in headers  # a task's budget is for its lifetime: waiting does not help


def test_the_cli_sets_shows_and_clears_budgets(aws, capsys):
    from embedsvc.cli import main

    assert main(["budgets", "set", "--task", "mig-1", "--usd", "2.5", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["limit_usd"] == 2.5 and shown["spent_usd"] == 0 and shown["limit_tokens"] is None
    assert main(["budgets", "set", "--tenant", "acme", "--tokens", "1000"]) == 0
    assert "1,000 left" in capsys.readouterr().out
    assert main(["budgets", "show", "--tenant", "acme", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["remaining_tokens"] == 1000
    assert main(["budgets", "clear", "--task", "mig-1"]) == 0
    assert main(["budgets", "show", "--task", "mig-1"]) == 1
    assert "no budget" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["budgets", "set", "--task", "x", "--tenant", "y", "--usd", "1"])  # one owner only
