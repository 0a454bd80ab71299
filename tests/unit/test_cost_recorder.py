"""The cost recorder's pure parts: integer dollars, roll-up keys and deltas, EMF blobs, correlation ids."""

from __future__ import annotations

import pytest

from embedsvc.adapters.cost_store import update_request
from embedsvc.observability import (
    COST_DIMENSION_SETS,
    COST_METRIC_NAMES,
    CallContext,
    CostRecorder,
    RollupKey,
    clean_correlation_id,
    correlation_from_api_event,
    correlation_from_event,
    correlation_from_message_body,
    nano_usd,
    rollup_keys,
)


class Memory:
    def __init__(self):
        self.applied: list[dict] = []

    def apply(self, deltas):
        self.applied.append(dict(deltas))
        return []


@pytest.mark.parametrize(
    ("tokens", "price", "nano"),
    [(15, 0.02, 300), (1, 0.13, 130), (1_000_000, 0.02, 20_000_000), (3, 0.065, 195), (7, 0.0, 0)],
)
def test_dollars_are_integer_nano_dollars(tokens, price, nano):
    assert nano_usd(tokens, price) == nano


def test_a_million_small_calls_add_up_exactly():
    # 0.3 micro-dollars each: an integer micro-dollar counter would have rounded every one to 0.
    assert sum(nano_usd(15, 0.02) for _ in range(1_000_000)) == 300_000_000  # $0.30


def test_a_call_adds_to_each_dimension_it_names_and_its_task_lifetime():
    keys = rollup_keys("2026-12-01", CallContext("reindex", None, "t", "job"), "te3s")
    assert {(k.day, k.dimension, k.value) for k in keys} == {
        ("2026-12-01", "source", "reindex"),
        ("2026-12-01", "model", "te3s"),
        ("2026-12-01", "source#model", "reindex#te3s"),
        ("2026-12-01", "tenant", "t"),
        ("2026-12-01", "task", "job"),
        (None, "task", "job"),
    }


def test_records_are_aggregated_per_item_until_the_flush():
    store = Memory()
    recorder = CostRecorder(sink=lambda blob: None, store=store, clock=lambda: 1_796_000_000.0)
    context = CallContext("user_query", "u1", "t1", "task-a")
    for _ in range(3):
        recorder.record(model="te3s", provider="p", tokens=10, price_per_million=0.02, context=context)
    recorder.record_saved(model="te3s", tokens=5, price_per_million=0.02, context=context)
    assert recorder.pending() == 7
    outcome = recorder.flush()
    assert outcome.items == 7 and outcome.dropped == 0 and recorder.pending() == 0
    (deltas,) = store.applied
    source = deltas[RollupKey("2026-11-30", "source", "user_query")]
    assert (source.tokens, source.nano_usd, source.requests) == (30, 600, 3)
    assert (source.saved_tokens, source.saved_nano_usd) == (5, 100)
    lifetime = deltas[RollupKey(None, "task", "task-a")]
    assert lifetime.sources == {"user_query"} and lifetime.first_seen == lifetime.last_seen == 1_796_000_000.0
    assert recorder.flush().items == 0  # flushed once, never again


def test_a_recorder_without_a_store_emits_only():
    recorder = CostRecorder(sink=lambda blob: None)
    recorder.record(model="te3s", provider="p", tokens=10, price_per_million=0.02, context=CallContext())
    assert recorder.pending() == 0 and recorder.flush().items == 0


def test_a_store_that_cannot_be_built_drops_and_does_not_raise():
    def broken():
        raise RuntimeError("no table configured")

    recorder = CostRecorder(sink=lambda blob: None, store=broken)
    recorder.record(model="te3s", provider="p", tokens=10, price_per_million=0.02, context=CallContext())
    outcome = recorder.flush()
    assert outcome.dropped == outcome.items > 0 and outcome.dropped_tokens == 10


def test_emf_blobs_publish_both_dimension_sets_and_only_the_named_metrics():
    blobs: list[dict] = []
    recorder = CostRecorder(sink=blobs.append)
    context = CallContext("note_index", "u", "t", "job")
    recorder.record(model="te3s", provider="openai", tokens=4, price_per_million=0.02, context=context)
    recorder.record_saved(model="te3s", tokens=6, price_per_million=0.02, context=context)
    recorder.record_saved(model="te3s", tokens=0, price_per_million=0.02, context=context)  # nothing
    assert len(blobs) == 2
    names = set()
    for blob in blobs:
        (directive,) = blob["_aws"]["CloudWatchMetrics"]
        assert directive["Dimensions"] == [list(d) for d in COST_DIMENSION_SETS]
        for metric in directive["Metrics"]:
            names.add(metric["Name"])
            assert isinstance(blob[metric["Name"]], list)
        assert blob["source"] == "note_index" and blob["model"] == "te3s" and blob["task_id"] == "job"
    assert names == set(COST_METRIC_NAMES)
    assert blobs[1]["SavedTokens"] == [6.0] and blobs[1]["SavedUSD"] == [pytest.approx(1.2e-7)]


def test_the_update_adds_counters_and_keeps_task_times():
    from embedsvc.observability import RollupDelta

    delta = RollupDelta(
        tokens=5, nano_usd=100, requests=1, first_seen=10.0, last_seen=12.5, sources={"reindex"}
    )
    request = update_request("t", RollupKey("2026-12-01", "task", "job"), delta, ttl_days=400)
    assert request["Key"] == {"pk": {"S": "2026-12-01#task"}, "sk": {"S": "job"}}
    expression = request["UpdateExpression"]
    assert expression.startswith("ADD #tokens :tokens, #nano :nano") and "#sources :sources" in expression
    assert "#first = if_not_exists(#first, :first)" in expression and "#last = :last" in expression
    # 400 days after the day's start (2026-12-01T00:00Z = 1796083200)
    assert request["ExpressionAttributeValues"][":expires"] == {"N": str(1796083200 + 400 * 86400)}
    lifetime = update_request("t", RollupKey(None, "task", "job"), delta, ttl_days=400)
    assert lifetime["Key"] == {"pk": {"S": "task#job"}, "sk": {"S": "total"}}


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("abc-123", "abc-123"),
        ("  req:42/x  ", "req:42/x"),
        ("x" * 300, "x" * 128),
        ("has space", None),
        ("line\nbreak", None),
        ("", None),
        (42, None),
        ("<script>", None),
    ],
)
def test_correlation_ids_are_cleaned_or_refused(raw, clean):
    assert clean_correlation_id(raw) == clean


def test_the_api_takes_the_callers_id_else_the_request_id():
    event = {"headers": {"x-correlation-id": "caller-1"}, "requestContext": {"requestId": "gw-9"}}
    assert correlation_from_api_event(event) == "caller-1"
    event["headers"] = {"X-Correlation-Id": "not ok!"}
    assert correlation_from_api_event(event) == "gw-9"
    assert correlation_from_api_event({"headers": None, "requestContext": {}}).startswith("req-")


def test_state_machine_tasks_use_the_execution_name_and_scheduled_runs_a_new_id():
    assert correlation_from_event({"correlation_id": "mig-verse-7"}) == "mig-verse-7"
    assert correlation_from_event({"Execution": {"Name": "exec-1"}}) == "exec-1"
    arn = "arn:aws:states:us-east-1:123456789012:execution:Migration:exec-2"
    assert correlation_from_event({"execution": arn}) == "exec-2"
    first, second = correlation_from_event({}, prefix="repair"), correlation_from_event(None, prefix="repair")
    assert first.startswith("repair-") and first != second


def test_a_message_body_gives_its_correlation_id():
    assert correlation_from_message_body('{"id": "a", "correlation_id": "c-1"}') == "c-1"
    assert correlation_from_message_body('{"id": "a"}') is None
    assert correlation_from_message_body("{broken") is None
    assert correlation_from_message_body("[1]") is None
