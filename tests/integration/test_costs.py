"""Cost attribution end to end: API calls, queue work, a repair and a reindex, read back as `embedsvc costs`.

Given the real handlers (API, worker, repair) on moto, Postgres and the provider simulator, with the
roll-up table in moto, when a known sequence of calls runs, then the roll-up read through the CLI's own
path (`embedsvc costs --aws --format json`, one Query per day and dimension) gives exact tokens and
dollars per source, tenant, user and task, the saved tokens of the cache hit and the content-hash skips,
and the reindex as running. A flush that fails never fails the request, and never counts twice.
"""

from __future__ import annotations

import json

import pytest

from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.local.provider_sim import sim_tokens
from tests.conftest import sim_registry

TE3S = "text-embedding-3-small"
NANO_PER_TOKEN = 20  # $0.02 per 1M tokens = 20 nano-dollars per token
COSTS_TABLE = "test-costs"


def usd(tokens: int) -> float:
    return tokens * NANO_PER_TOKEN / 1e9


def toks(*texts: str) -> int:
    return sum(sim_tokens(TE3S, t) for t in texts)


@pytest.fixture
def costs(aws, sim, content_db, monkeypatch):
    """The service on moto with a costs table, queue and DLQ; te3s served by the simulator."""
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.adapters.cost_store import create_costs_table
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder

    sqs = client("sqs")
    monkeypatch.setenv("INDEX_QUEUE_URL", sqs.create_queue(QueueName="costs-index")["QueueUrl"])
    monkeypatch.setenv("INDEX_DLQ_URL", sqs.create_queue(QueueName="costs-dlq")["QueueUrl"])
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(sim_registry(sim)))
    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"note": ["te3s"], "verse": ["te3s"]}))
    monkeypatch.setenv("COSTS_TABLE", COSTS_TABLE)
    create_costs_table(client("dynamodb"), COSTS_TABLE)
    reset_settings()
    blobs: list[dict] = []
    container.put("costs", CostRecorder(sink=blobs.append, store=container.cost_store))
    container.blobs = blobs  # type: ignore[attr-defined]
    return container


def sqs_event(bodies: list[str], prefix: str) -> dict:
    return {
        "Records": [
            {"messageId": f"{prefix}-{i}", "body": body, "attributes": {}, "eventSource": "aws:sqs"}
            for i, body in enumerate(bodies)
        ]
    }


def memo(content_id: str, text: str, **fields) -> str:
    """A message with its text: `memo` is not a content-store type, so the worker embeds what it carries."""
    body = {"content_type": "memo", "id": content_id, "text": text, "priority": "bulk", **fields}
    return json.dumps(body)


def drain(container) -> list[str]:
    from embedsvc.adapters.aws import client

    sqs, url = client("sqs"), container.settings().index_queue_url
    bodies = []
    while got := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        for m in got:
            bodies.append(m["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return bodies


def costs_json(*args: str, capsys) -> dict:
    from embedsvc.cli import main

    capsys.readouterr()
    assert main(["costs", "--aws", "--format", "json", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_every_path_is_attributed_exactly_and_read_back_through_the_cli(costs, call_api, sim, capsys):
    from functions.embed_worker.app import lambda_handler as worker
    from functions.repair.app import lambda_handler as repair

    # Given: users' queries, one of them repeated (the cache answers it) ...
    query_texts = ["alpha beta", "gamma"]
    assert call_api({"input": query_texts, "model": TE3S})[0] == 200
    assert call_api({"input": query_texts, "model": TE3S})[0] == 200  # all from the cache: saved
    tagged = "delta epsilon zeta"
    headers = {"X-Cost-Source": "note_index", "X-Task-Id": "job-7"}
    assert call_api({"input": tagged, "model": TE3S}, headers=headers)[0] == 200
    # ... queue work for another tenant, delivered twice (the second time its content hash is unchanged) ...
    imported = ["first imported note", "second imported note, longer"]
    work = [
        memo(f"n{i}", t, source="note_index", owner_id="tenant-b", task_id="import-1")
        for i, t in enumerate(imported)
    ]
    for attempt in ("first", "again"):
        answer = worker(sqs_event(work, attempt), LocalLambdaContext("worker"))
        assert answer == {"batchItemFailures": []}
    # ... a repair of a verse whose vector was never written ...
    verse = "In the beginning was the Word"
    costs.content_store().put("verse", "John.1.1", text=verse, metadata={}, owner_id=None)
    repair({}, LocalLambdaContext("repair"))
    queued = drain(costs)
    assert [json.loads(b)["source"] for b in queued] == ["repair"]
    assert worker(sqs_event(queued, "repair"), LocalLambdaContext("worker")) == {"batchItemFailures": []}
    # ... and a reindex job.
    reindexed = ["old text one", "old text two", "old text three"]
    job = [memo(f"r{i}", t, source="reindex", task_id="reindex-42") for i, t in enumerate(reindexed)]
    assert worker(sqs_event(job, "reindex"), LocalLambdaContext("worker")) == {"batchItemFailures": []}

    q, t, w, r, x = toks(*query_texts), toks(tagged), toks(*imported), toks(verse), toks(*reindexed)
    report = costs_json("--days", "1", capsys=capsys)

    # Then: per source, exact tokens and dollars (integer nano-dollars in the roll-up).
    assert report["by_source"] == {
        "user_query": {"tokens": q, "usd": usd(q), "requests": 1},
        "note_index": {"tokens": t + w, "usd": usd(t + w), "requests": 2},
        "repair": {"tokens": r, "usd": usd(r), "requests": 1},
        "reindex": {"tokens": x, "usd": usd(x), "requests": 1},
    }
    assert sim.calls == 5  # the cache hit and the redelivery called no provider
    # per user: the API key's principal; the worker's owner (a tenant) for queued content
    users = {u["user_id"]: (u["tokens"], u["usd"]) for u in report["top_users"]}
    assert users == {"user-1": (q + t, usd(q + t)), "tenant-b": (w, usd(w))}
    # per task, with their sources
    tasks = {task["task_id"]: (task["tokens"], task["usd"], task["sources"]) for task in report["top_tasks"]}
    assert tasks == {
        "job-7": (t, usd(t), ["note_index"]),
        "import-1": (w, usd(w), ["note_index"]),
        "reindex-42": (x, usd(x), ["reindex"]),
    }
    # saved: the repeated query (cache) and the redelivered import (content hash), nothing else
    assert report["saved_usd"] == pytest.approx(usd(q + w), rel=1e-12)
    assert report["saved_tokens"] == q + w
    share = report["indexing_share"]
    assert share["share_tokens"] == pytest.approx((t + w + r + x) / (q + t + w + r + x))
    (running,) = report["running_reindex"]
    assert (running["task_id"], running["tokens"], running["usd"]) == ("reindex-42", x, usd(x))

    # per tenant: the breakdown `--by tenant` (verses and the reindex belong to no tenant)
    by_tenant = costs_json("--days", "1", "--by", "tenant", capsys=capsys)
    assert {k: v["tokens"] for k, v in by_tenant["breakdown"].items()} == {"tenant-a": q + t, "tenant-b": w}
    assert by_tenant["unattributed"]["tokens"] == r + x
    # what the migration workflow reads for a backfill's spend
    assert costs.cost_store().task_totals("reindex-42") == {"tokens": x, "usd": usd(x), "requests": 1}
    assert costs.cost_store().task_totals("never-ran") == {"tokens": 0, "usd": 0.0, "requests": 0}

    # EMF agrees with the roll-up, per source (the metrics an alarm or a dashboard reads)
    emf_tokens: dict[str, float] = {}
    for blob in costs.blobs:
        if "Tokens" in blob:
            emf_tokens[blob["source"]] = emf_tokens.get(blob["source"], 0) + blob["Tokens"][0]
            assert blob["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["source", "model"], ["source"]]
    assert emf_tokens == {"user_query": q, "note_index": t + w, "repair": r, "reindex": x}


class _FlakyDynamoDB:
    """The moto client, with update_item failing as told: `before` errors first, then the real call."""

    def __init__(self, inner, errors: list[Exception]):
        self.inner = inner
        self.errors = errors
        self.update_calls = 0

    def update_item(self, **kwargs):
        self.update_calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.inner.update_item(**kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _client_error(code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}}, "UpdateItem")


def _store(costs, errors: list[Exception]):
    from embedsvc.adapters.aws import client
    from embedsvc.adapters.cost_store import CostStore

    flaky = _FlakyDynamoDB(client("dynamodb"), errors)
    return CostStore(COSTS_TABLE, flaky, parallel=1, sleep=lambda s: None), flaky


def test_a_failed_flush_never_fails_the_request(costs, call_api):
    from botocore.exceptions import ReadTimeoutError

    from embedsvc.observability import CostRecorder

    store, flaky = _store(costs, [ReadTimeoutError(endpoint_url="x")] * 100)
    costs.put("costs", CostRecorder(sink=lambda blob: None, store=store))
    status, body, _ = call_api({"input": "a query", "model": TE3S})
    assert status == 200 and body["data"]
    assert flaky.update_calls > 0  # it tried, and the answer still went out
    assert costs.cost_store().totals([_today()], "source") == {}  # and nothing half-counted


def test_a_throttled_write_is_retried_once_and_an_ambiguous_one_never(costs):
    from botocore.exceptions import ReadTimeoutError

    from embedsvc.observability import CallContext, CostRecorder

    context = CallContext(source="user_query")
    # Throttled: DynamoDB applied nothing, so one retry is safe and the item counts once.
    store, flaky = _store(costs, [_client_error("ThrottlingException")])
    recorder = CostRecorder(sink=lambda blob: None, store=store)
    recorder.record(model="te3s", provider="sim", tokens=100, price_per_million=0.02, context=context)
    outcome = recorder.flush()
    assert outcome.dropped == 0 and flaky.update_calls == outcome.items + 1
    # A read timeout: it may have been applied; sending it again could count it twice, so it is dropped.
    store, flaky = _store(costs, [ReadTimeoutError(endpoint_url="x")])
    recorder = CostRecorder(sink=lambda blob: None, store=store)
    recorder.record(model="te3s", provider="sim", tokens=7, price_per_million=0.02, context=context)
    outcome = recorder.flush()
    assert outcome.dropped == 1 and flaky.update_calls == outcome.items  # no second attempt
    assert recorder.flush().items == 0  # and it is not kept for a later flush either
    by_source = costs.cost_store().totals([_today()], "source")
    # The throttled write counted once; the dropped one (it was the first key, the source's) not at all.
    assert by_source["user_query"].tokens == 100


def test_a_big_buffer_is_flushed_before_the_invocation_ends(costs):
    from embedsvc.observability import CallContext, CostRecorder

    recorder = CostRecorder(sink=lambda blob: None, store=costs.cost_store(), max_buffered=10)
    for i in range(4):  # 4 users x (source, model, source#model, tenant, user) items > 10
        context = CallContext(user_id=f"u{i}", tenant_id=f"t{i}")
        recorder.record(model="te3s", provider="sim", tokens=10, price_per_million=0.02, context=context)
    assert recorder.pending() < 10
    recorder.flush()
    assert costs.cost_store().totals([_today()], "source")["user_query"].tokens == 40


def test_the_table_report_and_the_chart(costs, call_api, tmp_path, capsys):
    from embedsvc.cli import main

    call_api({"input": ["one", "two"], "model": TE3S}, headers={"X-Task-Id": "t-1"})
    chart = tmp_path / "spend.png"
    capsys.readouterr()
    assert main(["costs", "--aws", "--days", "3", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "by source" in out and "user_query" in out and "top tasks" in out and "t-1" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000


def test_the_local_roll_up_outlives_its_process_through_its_saved_items(costs, call_api, tmp_path, capsys):
    """What the demo does at its end, and what `embedsvc costs` does locally: save, then load elsewhere."""
    from embedsvc.adapters.aws import client
    from embedsvc.adapters.cost_store import CostStore, create_costs_table

    call_api({"input": "saved for later", "model": TE3S}, headers={"X-Task-Id": "demo"})
    saved = costs.cost_store().export_items(tmp_path / "costs-table.jsonl")
    assert saved > 0
    create_costs_table(client("dynamodb"), "another-process")
    other = CostStore("another-process", client("dynamodb"))
    assert other.import_items(tmp_path / "costs-table.jsonl") == saved
    assert other.task_totals("demo") == costs.cost_store().task_totals("demo")
    assert other.task_totals("demo")["tokens"] == toks("saved for later")


def _today() -> str:
    import time

    from embedsvc.observability import utc_day

    return utc_day(time.time())
