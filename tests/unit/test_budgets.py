"""Budgets that act: the ledger charges task and tenant budgets before a provider call, never past them."""

from __future__ import annotations

from datetime import UTC, datetime

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from embedsvc.errors import BudgetExceeded, InvalidRequest, LedgerUnavailable
from embedsvc.services.budgets import (
    BudgetCharge,
    BudgetStore,
    budget_pk,
    month_of,
    nano_usd,
    seconds_until_next_month,
)
from embedsvc.services.ratelimit import (
    Lane,
    LimitSpec,
    RateLimitLedger,
    create_ledger_table,
    item_key,
    parse_item,
)
from tests.unit.ledger_fakes import FakeClock, Recorder

TABLE = "budgets-test"
LIMIT = LimitSpec(key="openai:text-embedding-3-small", tpm=100_000, rpm=1000, window_seconds=60.0)
PRICE = 0.02  # text-embedding-3-small, $ per 1M tokens
T0 = datetime(2026, 11, 10, 12, tzinfo=UTC).timestamp()


class ClientProxy:
    """Passes calls through; fails update_item calls on budget items while `fail_budget_writes` is set."""

    def __init__(self, client):
        self._client = client
        self.fail_budget_writes = False
        self.calls: list[str] = []

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(**kwargs):
            self.calls.append(name)
            key = kwargs.get("Key", {}).get("pk", {}).get("S", "")
            if self.fail_budget_writes and name == "update_item" and key.startswith("budget#"):
                raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, name)
            return method(**kwargs)

        return call


@pytest.fixture(autouse=True)
def atomic_moto_items():
    from embedsvc.local.moto_atomic import serialize_dynamodb_items

    undo = serialize_dynamodb_items()
    yield
    undo()


@pytest.fixture
def ddb():
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        create_ledger_table(client, TABLE)
        yield client


@pytest.fixture
def clock():
    return FakeClock(T0)


@pytest.fixture
def store(ddb, clock):
    return BudgetStore(TABLE, ddb, clock=clock)


def ledger_for(client, clock, store, **kwargs) -> RateLimitLedger:
    return RateLimitLedger(TABLE, client, clock=clock, sleep=clock.sleep, budgets=store, **kwargs)


def charge(scope, key, tokens) -> list[BudgetCharge]:
    return [BudgetCharge.of(scope, key, tokens, PRICE)]


def ledger_tokens(ddb) -> int:
    item = ddb.get_item(TableName=TABLE, Key=item_key(LIMIT.key), ConsistentRead=True).get("Item")
    return parse_item(item).tokens_total


def test_dollars_are_counted_in_whole_nano_dollars_rounded_up():
    assert nano_usd(1_000_000, 0.02) == 20_000_000  # $0.02
    assert nano_usd(1, 0.02) == 20
    assert nano_usd(3, 0.013) == 39
    assert nano_usd(1, 0.0000001) == 1  # never rounded down to free


def test_months_are_utc_calendar_months():
    end = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()
    assert month_of(end) == "2026-12" and month_of(end + 31) == "2027-01"
    assert seconds_until_next_month(end) == pytest.approx(30)


def test_set_get_and_clear_a_budget_keeping_its_spend(ddb, clock, store):
    assert store.get("task", "reindex-1") is None
    store.set("task", "reindex-1", usd=1.5, tokens=10_000)
    budget = store.get("task", "reindex-1")
    assert budget is not None
    assert (budget.limit_usd, budget.limit_tokens, budget.spent_tokens, budget.remaining_tokens) == (
        1.5,
        10_000,
        0,
        10_000,
    )
    assert not budget.exhausted and budget.scope == "task" and budget.period is None

    ledger = ledger_for(ddb, clock, store)
    ledger.acquire(LIMIT, 4_000, Lane.BULK, max_wait_seconds=0, charges=charge("task", "reindex-1", 4_000))
    store.set("task", "reindex-1", tokens=5_000)  # dollars no longer capped; the spend stays
    budget = store.get("task", "reindex-1")
    assert budget is not None
    assert budget.limit_usd is None and budget.remaining_usd is None
    assert (budget.spent_tokens, budget.remaining_tokens) == (4_000, 1_000)
    assert budget.spent_usd == pytest.approx(4_000 * PRICE / 1e6)

    store.clear("task", "reindex-1")
    assert store.get("task", "reindex-1") is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({}, "needs a limit"), ({"usd": -1}, "not negative"), ({"tokens": -5}, "not negative")],
)
def test_a_budget_without_a_sensible_limit_is_refused(store, kwargs, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        store.set("task", "t", **kwargs)
    with pytest.raises(InvalidRequest, match="scope"):
        store.set("project", "t", tokens=1)  # type: ignore[arg-type]


def test_a_task_stops_at_its_budget_and_the_refused_grant_is_given_back(ddb, clock, store):
    store.set("task", "reindex-1", tokens=1_000)
    metrics = Recorder()
    ledger = ledger_for(ddb, clock, store, metrics=metrics)
    granted = 0
    with pytest.raises(BudgetExceeded) as refused:
        for _ in range(100):
            ledger.acquire(
                LIMIT, 300, Lane.BULK, max_wait_seconds=0, charges=charge("task", "reindex-1", 300)
            )
            granted += 300
    assert granted == 900  # 3 x 300 fit; the 4th would pass 1,000
    error = refused.value
    assert error.status == 429 and error.code == "budget_exceeded" and error.retry_after is None
    assert "task budget 'reindex-1'" in error.message and "900 of 1,000 tokens" in error.message
    assert ledger_tokens(ddb) == 900  # the rate-limit grant of the refused request was returned
    budget = store.get("task", "reindex-1")
    assert budget is not None and budget.spent_tokens == 900 and budget.exhausted
    assert ("BudgetRefused", 1, {"scope": "task"}) in metrics.counts


def test_a_spent_budget_is_refused_before_any_wait_for_rate_limit(ddb, clock, store):
    store.set("task", "reindex-1", tokens=500)
    ledger = ledger_for(ddb, clock, store)
    ledger.acquire(LIMIT, 400, Lane.BULK, max_wait_seconds=0, charges=charge("task", "reindex-1", 400))
    # The rate limit is now spent for a whole window: a caller that waited for it first would sleep.
    ledger.acquire(LIMIT, LIMIT.tpm - 400, Lane.REALTIME, max_wait_seconds=0)
    before = clock.now
    with pytest.raises(BudgetExceeded):
        ledger.acquire(LIMIT, 400, Lane.BULK, max_wait_seconds=120, charges=charge("task", "reindex-1", 400))
    assert clock.now == before  # refused at once, from the hint confirmed by one read


def test_reconcile_moves_the_budget_by_the_providers_usage_and_a_failed_call_refunds(ddb, clock, store):
    store.set("task", "t", usd=1.0)
    ledger = ledger_for(ddb, clock, store)
    reservation = ledger.acquire(
        LIMIT, 1_200, Lane.BULK, max_wait_seconds=0, charges=charge("task", "t", 1_200)
    )
    ledger.reconcile(reservation, 1_000)  # the estimate was high
    budget = store.get("task", "t")
    assert budget is not None and budget.spent_tokens == 1_000
    assert budget.spent_usd == pytest.approx(1_000 * PRICE / 1e6)
    assert budget.remaining_usd == pytest.approx(1.0 - 1_000 * PRICE / 1e6)

    failed = ledger.acquire(LIMIT, 700, Lane.BULK, max_wait_seconds=0, charges=charge("task", "t", 700))
    ledger.refund_charges(failed)  # the provider refused it: nothing billed
    budget = store.get("task", "t")
    assert budget is not None and budget.spent_tokens == 1_000


def test_a_tenant_refusal_refunds_the_task_charged_before_it(ddb, clock, store):
    store.set("task", "t", tokens=10_000)
    store.set("tenant", "acme", tokens=100)
    ledger = ledger_for(ddb, clock, store)
    both = [BudgetCharge.of("task", "t", 500, PRICE), BudgetCharge.of("tenant", "acme", 500, PRICE)]
    with pytest.raises(BudgetExceeded) as refused:
        ledger.acquire(LIMIT, 500, Lane.REALTIME, max_wait_seconds=0, charges=both)
    assert refused.value.scope == "tenant" and refused.value.key == "acme"
    assert refused.value.retry_after == pytest.approx(seconds_until_next_month(clock.now))
    task = store.get("task", "t")
    assert task is not None and task.spent_tokens == 0
    assert ledger_tokens(ddb) == 0


def test_a_tenants_budget_starts_afresh_each_utc_month(ddb, store):
    clock = FakeClock(datetime(2026, 11, 30, 23, 59, 50, tzinfo=UTC).timestamp())
    store = BudgetStore(TABLE, ddb, clock=clock)
    store.set("tenant", "acme", tokens=1_000)
    ledger = ledger_for(ddb, clock, store)
    late = ledger.acquire(
        LIMIT, 900, Lane.REALTIME, max_wait_seconds=0, charges=charge("tenant", "acme", 900)
    )
    with pytest.raises(BudgetExceeded):
        ledger.acquire(LIMIT, 900, Lane.REALTIME, max_wait_seconds=0, charges=charge("tenant", "acme", 900))
    clock.sleep(20)  # December
    other = BudgetStore(TABLE, ddb, clock=clock)
    fresh = other.get("tenant", "acme")
    assert fresh is not None and fresh.period == "2026-12" and fresh.spent_tokens == 0 and not fresh.exhausted
    december = ledger.acquire(
        LIMIT, 900, Lane.REALTIME, max_wait_seconds=0, charges=charge("tenant", "acme", 900)
    )
    assert december.charges[0].period == "2026-12"
    ledger.reconcile(late, 1_000)  # November's correction arrives late: December does not pay for it
    budget = other.get("tenant", "acme")
    assert budget is not None and (budget.period, budget.spent_tokens, budget.remaining_tokens) == (
        "2026-12",
        900,
        100,
    )


def test_a_budget_cleared_while_work_runs_is_no_longer_charged_nor_brought_back(ddb, clock, store):
    store.set("task", "t", tokens=1_000)
    ledger = ledger_for(ddb, clock, store)
    first = ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0, charges=charge("task", "t", 100))
    store.clear("task", "t")
    second = ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0, charges=charge("task", "t", 100))
    assert second.charges == ()  # not refused: uncapped now
    ledger.reconcile(first, 150)
    assert ddb.get_item(TableName=TABLE, Key={"pk": {"S": budget_pk("task", "t")}}).get("Item") is None


def test_a_budget_dynamodb_cannot_charge_fails_closed_and_returns_the_grant(ddb, clock, store):
    store.set("task", "t", tokens=1_000)
    proxy = ClientProxy(ddb)
    ledger = ledger_for(proxy, clock, store, fallback_share=0.2, fallback_processes=2)
    proxy.fail_budget_writes = True
    with pytest.raises(LedgerUnavailable):
        ledger.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0, charges=charge("task", "t", 100))
    assert ledger_tokens(ddb) == 0
    budget = store.get("task", "t")
    assert budget is not None and budget.spent_tokens == 0


def test_without_charges_the_ledger_makes_exactly_the_calls_it_made_before(ddb, clock, store):
    store.set("task", "t", tokens=1_000)
    plain = ClientProxy(ddb)
    with_store = ClientProxy(ddb)
    a = RateLimitLedger(TABLE, plain, clock=clock, sleep=clock.sleep)
    b = ledger_for(with_store, clock, store)
    for ledger in (a, b):
        for _ in range(3):
            reservation = ledger.acquire(LimitSpec("p:other", 10_000, 100), 50, Lane.BULK, max_wait_seconds=0)
            ledger.reconcile(reservation, 40)
    assert plain.calls == with_store.calls
    assert b.stats()["budget_writes"] == 0 and b.stats()["budget_reads"] == 0


def test_which_budgets_exist_is_looked_up_once_per_interval(ddb, clock):
    proxy = ClientProxy(ddb)
    store = BudgetStore(TABLE, proxy, clock=clock, lookup_seconds=15)
    store.set("task", "t", tokens=10)
    wanted = {("task", "t"), ("tenant", "acme")}
    assert store.active(wanted) == {("task", "t")}
    calls = len(proxy.calls)
    assert store.active(wanted) == {("task", "t")}
    assert len(proxy.calls) == calls  # cached
    BudgetStore(TABLE, ddb, clock=clock).set("tenant", "acme", tokens=10)  # another process sets one
    clock.sleep(16)
    assert store.active(wanted) == wanted
    assert proxy.calls[-1] == "batch_get_item"
