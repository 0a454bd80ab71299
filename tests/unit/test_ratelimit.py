"""The rate-limit ledger against moto's DynamoDB: budget, reconcile, cooldowns, lanes, failures."""

from __future__ import annotations

import random
import threading
import time

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from hypothesis import given, settings
from hypothesis import strategies as st
from moto import mock_aws

from embedsvc.errors import InvalidRequest, LedgerMisconfigured, LedgerUnavailable, ServiceOverloaded
from embedsvc.services.ratelimit import (
    Lane,
    LedgerState,
    LimitSpec,
    NoopLedger,
    RateLimitLedger,
    create_ledger_table,
    first_counted_slot,
    item_key,
    parse_item,
    plan_wait,
    removal_ceiling,
    slot_of,
    wait_until_fits,
)
from tests.unit.ledger_fakes import FakeClock

TABLE = "ratelimit-test"
LIMIT = LimitSpec(key="openai:text-embedding-3-small", tpm=1000, rpm=100, window_seconds=60.0)
T0 = 1_700_000_000.0


@pytest.fixture(autouse=True)
def atomic_moto_items():
    """Real DynamoDB never lets two conditional writes to one item interleave; moto must not either."""
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


def ledger_for(client, clock: FakeClock, **kwargs) -> RateLimitLedger:
    """One 'process': its own ledger instance on the shared table."""
    return RateLimitLedger(TABLE, client, clock=clock, sleep=clock.sleep, **kwargs)


def item(client, key: str = LIMIT.key) -> dict:
    return client.get_item(TableName=TABLE, Key=item_key(key), ConsistentRead=True).get("Item", {})


def max_in_any_window(events: list[tuple[float, int]], window: float) -> tuple[int, int]:
    """Most tokens and requests in any (T - window, T] that ends at an event."""
    events = sorted(events)
    most_tokens = most_requests = 0
    left = 0
    total = 0
    for right, (at, tokens) in enumerate(events):
        total += tokens
        while events[left][0] <= at - window:
            total -= events[left][1]
            left += 1
        most_tokens = max(most_tokens, total)
        most_requests = max(most_requests, right - left + 1)
    return most_tokens, most_requests


class ClientProxy:
    """A boto3 client stand-in: passes calls through, or fails them while `failures` lasts."""

    def __init__(self, client, error: Exception | None = None, failures: int = 10**9):
        self._client = client
        self.error = error
        self.failures = failures
        self.calls: list[str] = []
        self.before_update = None  # a hook that runs once, just before the next update_item

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(**kwargs):
            self.calls.append(name)
            if self.error is not None and self.failures > 0:
                self.failures -= 1
                raise self.error
            if name == "update_item" and self.before_update:
                hook, self.before_update = self.before_update, None
                hook()
            return method(**kwargs)

        return call


def throttled() -> ClientError:
    return ClientError(
        {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"}}, "UpdateItem"
    )


def unreachable() -> EndpointConnectionError:
    return EndpointConnectionError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com")


# The window arithmetic, on its own


@settings(max_examples=200, deadline=None)
@given(
    slots_per_window=st.integers(1, 20),
    guard=st.sampled_from([0.0, 0.05, 0.3]),
    steps=st.lists(
        st.tuples(st.floats(0.0, 3.0), st.integers(1, 400), st.booleans()), min_size=1, max_size=80
    ),
)
def test_grants_by_the_slot_arithmetic_never_exceed_the_limit_in_any_window(slots_per_window, guard, steps):
    """Given callers that take a grant when it fits or sleep exactly the computed wait, no continuous
    window of the provider (extended by the guard) ever holds more than the limit."""
    window, tpm, rpm = 10.0, 1000, 7
    seconds = window / slots_per_window
    slots: dict[int, list[int]] = {}
    grants: list[tuple[float, int]] = []
    now = T0
    for gap, tokens, sleeps in steps:
        now += gap
        while True:
            wait = wait_until_fits(
                sorted((s, t, r) for s, (t, r) in slots.items()),
                now=now,
                seconds_per_slot=seconds,
                slots_per_window=slots_per_window,
                guard_seconds=guard,
                tokens=tokens,
                token_cap=tpm,
                request_cap=rpm,
            )
            if wait == 0:
                slot = slots.setdefault(slot_of(now, seconds), [0, 0])
                slot[0] += tokens
                slot[1] += 1
                grants.append((now, tokens))
                break
            if not sleeps:
                break
            now += wait  # the computed wait is enough: the next try fits
    most_tokens, most_requests = max_in_any_window(grants, window + guard)
    assert most_tokens <= tpm
    assert most_requests <= rpm


def test_the_computed_wait_is_exactly_when_the_request_fits():
    slots = [(slot_of(T0, 1.0), 900, 1)]
    kwargs = dict(
        seconds_per_slot=1.0,
        slots_per_window=60,
        guard_seconds=0.0,
        tokens=200,
        token_cap=1000,
        request_cap=10,
    )
    wait = wait_until_fits(slots, now=T0 + 5, **kwargs)
    assert 55 < wait < 57  # the slot counts for the window plus one slot
    assert wait_until_fits(slots, now=T0 + 5 + wait, **kwargs) == 0
    assert wait_until_fits(slots, now=T0 + 5 + wait - 0.01, **kwargs) > 0


# Callers' clock errors (up to +-200 ms), and their calls: (caller, gap before it, tokens, delivery delay).
CLOCK_ERRORS = st.lists(
    st.sampled_from([-0.2, -0.1, 0.0, 0.1, 0.2]) | st.floats(-0.2, 0.2), min_size=2, max_size=8
)
SKEWED_CALLS = st.lists(
    st.tuples(
        st.integers(0, 7),
        st.floats(0.0, 0.5),
        st.integers(1, 300),
        st.sampled_from([0.0, 0.1]) | st.floats(0.0, 0.1),
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(skews=CLOCK_ERRORS, steps=SKEWED_CALLS)
def test_a_guard_of_twice_the_skew_plus_the_delay_spread_covers_skewed_clocks_and_late_arrivals(skews, steps):
    """Callers whose clocks are off by up to +-200 ms decide on their own clock readings; each request
    reaches the provider 0-100 ms after its grant. With a guard of 2 x 0.2 + 0.1 s, the provider's own
    window (real arrival times, no guard) never holds more than the limit."""
    window, tpm, rpm, slots_per_window, guard = 10.0, 1000, 9, 200, 0.5
    seconds = window / slots_per_window
    slots: dict[int, list[int]] = {}
    arrivals: list[tuple[float, int]] = []
    now = T0  # true time
    for caller, gap, tokens, delay in steps:
        now += gap
        skew = skews[caller % len(skews)]
        while True:  # the caller sleeps exactly the wait its own clock computes: the budget stays contended
            wait = wait_until_fits(
                sorted((s, t, r) for s, (t, r) in slots.items()),
                now=now + skew,
                seconds_per_slot=seconds,
                slots_per_window=slots_per_window,
                guard_seconds=guard,
                tokens=tokens,
                token_cap=tpm,
                request_cap=rpm,
            )
            if wait == 0:
                break
            now += wait
        slot = slots.setdefault(slot_of(now + skew, seconds), [0, 0])
        slot[0] += tokens
        slot[1] += 1
        arrivals.append((now + delay, tokens))
    most_tokens, most_requests = max_in_any_window(arrivals, window)
    assert most_tokens <= tpm
    assert most_requests <= rpm


@settings(max_examples=150, deadline=None)
@given(skews=CLOCK_ERRORS, steps=SKEWED_CALLS)
def test_removals_by_clocks_that_run_ahead_hold_no_one_back_and_keep_the_provider_within_its_limit(
    skews, steps
):
    """As above, with the ledger's own decision (`plan_wait`) and its compaction: every grant removes the
    slots its own clock says have left, so callers whose clocks run behind decide on an item that
    clocks ahead have already compacted. The guard covers it: no caller within the skew is held back by
    a removal (the write's `removed_below` condition accepts it), and the provider's own window never
    holds more than the limit."""
    window, tpm, rpm, slots_per_window, guard = 10.0, 1000, 9, 200, 0.5
    limit = LimitSpec(key="sim:compacted", tpm=tpm, rpm=rpm, window_seconds=window, guard_seconds=guard)
    seconds = window / slots_per_window
    slots: dict[int, tuple[int, int]] = {}
    removed_below = 0
    arrivals: list[tuple[float, int]] = []
    now = T0  # true time
    for caller, gap, tokens, delay in steps:
        now += gap
        reading = now + skews[caller % len(skews)]
        while True:
            assert removed_below <= removal_ceiling(reading, seconds, slots_per_window, guard)
            state = LedgerState(
                slots=dict(slots),
                tokens_total=sum(t for t, _ in slots.values()),
                requests_total=sum(r for _, r in slots.values()),
                removed_below=removed_below,
                exists=True,
            )
            wait = plan_wait(
                state,
                limit,
                tokens,
                Lane.REALTIME,
                reading,
                slots_per_window=slots_per_window,
                bulk_ceiling=0.8,
                guard_seconds=guard,
            )
            if wait == 0:
                break
            now += wait
            reading += wait
        slot = slot_of(reading, seconds)
        held = slots.get(slot, (0, 0))
        slots[slot] = (held[0] + tokens, held[1] + 1)
        oldest = first_counted_slot(reading, seconds, slots_per_window, guard)
        for stale in [s for s in slots if s < oldest]:
            del slots[stale]
            removed_below = max(removed_below, stale + 1)
        arrivals.append((now + delay, tokens))
    most_tokens, most_requests = max_in_any_window(arrivals, window)
    assert most_tokens <= tpm
    assert most_requests <= rpm


# Calls per grant


def test_happy_path_costs_one_read_and_one_write_then_one_write(ddb, clock):
    proxy = ClientProxy(ddb)
    ledger = ledger_for(proxy, clock)
    first = ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    assert proxy.calls == ["get_item", "update_item"]
    clock.sleep(0.5)
    ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    assert proxy.calls[2:] == ["update_item"]  # the last item seen says it fits: the write alone decides
    ledger.reconcile(first, 100)
    assert len(proxy.calls) == 3  # an exact estimate needs no correction
    assert ledger.stats()["grants"] == 2


# Many concurrent callers


def test_sixteen_threads_never_exceed_the_limit_in_any_window(ddb):
    limit = LimitSpec(key="sim:concurrent", tpm=1000, rpm=20, window_seconds=1.0)
    ledgers = [RateLimitLedger(TABLE, ddb, slots_per_window=10) for _ in range(16)]  # sixteen "processes"
    grants: list[tuple[float, int]] = []
    lock = threading.Lock()
    deadline = time.time() + 2.5
    start = threading.Barrier(16)

    def work(index: int) -> None:
        ledger = ledgers[index]
        rng = random.Random(index)
        start.wait()
        while time.time() < deadline:
            estimate = rng.randint(30, 150)
            lane = Lane.REALTIME if index % 4 == 0 else Lane.BULK
            try:
                reservation = ledger.acquire(limit, estimate, lane, max_wait_seconds=1.0)
            except ServiceOverloaded:
                continue
            actual = rng.randint(estimate // 2, estimate)  # the provider reports at most the estimate
            ledger.reconcile(reservation, actual)
            with lock:
                grants.append((reservation.granted_at, actual))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    most_tokens, most_requests = max_in_any_window(grants, limit.window_seconds)
    assert len(grants) >= limit.rpm  # the budget was contended, not idle
    assert most_tokens <= limit.tpm
    assert most_requests <= limit.rpm


def test_a_write_that_races_the_read_cannot_over_grant(ddb, clock):
    proxy = ClientProxy(ddb)
    first, second = ledger_for(proxy, clock), ledger_for(ddb, clock)
    first.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)  # leaves a hint that 900 fit
    proxy.before_update = lambda: second.acquire(LIMIT, 800, Lane.BULK, max_wait_seconds=0)
    with pytest.raises(ServiceOverloaded):
        first.acquire(LIMIT, 800, Lane.BULK, max_wait_seconds=0)
    assert first.stats()["conflicts"] == 1
    assert item(ddb)["tokens_total"]["N"] == "900"


# Tenant shares


def test_a_tenant_with_half_the_limit_cannot_take_more_and_leaves_the_rest_to_others(ddb, clock):
    flooder, other = ledger_for(ddb, clock), ledger_for(ddb, clock)
    taken = 0
    with pytest.raises(ServiceOverloaded) as capped:
        while True:
            flooder.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0, tenant="a", tenant_share=0.5)
            taken += 100
    assert taken == 500
    assert "this tenant's share" in capped.value.message
    for _ in range(5):  # the other tenant's half is intact
        assert other.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0, tenant="b", tenant_share=0.5)
    assert item(ddb)["tokens_total"]["N"] == "1000"
    assert item(ddb, f"{LIMIT.key}#tenant#a")["tokens_total"]["N"] == "500"


def test_a_tenant_grant_refused_by_the_provider_budget_leaves_the_tenant_item_untouched(ddb, clock):
    ledger_for(ddb, clock).acquire(LIMIT, 950, Lane.REALTIME, max_wait_seconds=0)  # shared content, no tenant
    tenant = ledger_for(ddb, clock)
    with pytest.raises(ServiceOverloaded):
        tenant.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0, tenant="a", tenant_share=0.5)
    assert item(ddb, f"{LIMIT.key}#tenant#a") == {}  # the transaction wrote neither item


def test_a_tenant_reservation_is_reconciled_in_both_items(ddb, clock):
    ledger = ledger_for(ddb, clock)
    reservation = ledger.acquire(LIMIT, 300, Lane.BULK, max_wait_seconds=0, tenant="a", tenant_share=0.5)
    ledger.reconcile(reservation, 120)
    assert item(ddb)["tokens_total"]["N"] == "120"
    assert item(ddb, f"{LIMIT.key}#tenant#a")["tokens_total"]["N"] == "120"


def test_one_flooding_tenant_is_held_to_its_share_while_another_is_served(ddb):
    limit = LimitSpec(key="sim:tenants", tpm=1000, rpm=40, window_seconds=1.0)
    grants: dict[str, list[tuple[float, int]]] = {"flood": [], "steady": []}
    refused = {"flood": 0, "steady": 0}
    lock = threading.Lock()
    steady_done = threading.Event()
    hard_stop = time.time() + 30.0  # only a hung ledger gets here

    def work(tenant: str, tokens: int, pause: float, max_wait: float, requests: int | None) -> None:
        ledger = RateLimitLedger(TABLE, ddb, slots_per_window=10)
        # A fixed number of steady requests, not a fixed time: on a slow, busy machine each acquire takes
        # longer, and counting what fits in three seconds measured the machine, not the ledger.
        while not steady_done.is_set() and time.time() < hard_stop:
            try:
                reservation = ledger.acquire(
                    limit, tokens, Lane.REALTIME, max_wait_seconds=max_wait, tenant=tenant, tenant_share=0.5
                )
            except ServiceOverloaded:
                with lock:
                    refused[tenant] += 1
                continue
            with lock:
                grants[tenant].append((reservation.granted_at, tokens))
                if requests is not None and len(grants[tenant]) >= requests:
                    steady_done.set()
            time.sleep(pause)

    # The flooder gives up quickly and asks again; the steady tenant may wait out a slow, busy machine.
    threads = [threading.Thread(target=work, args=("flood", 120, 0.0, 0.5, None)) for _ in range(6)]
    threads.append(threading.Thread(target=work, args=("steady", 50, 0.25, 2.0, 8)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    window = limit.window_seconds + 0.1  # the ledger's guard
    flood_tokens, _ = max_in_any_window(grants["flood"], window)
    all_tokens, _ = max_in_any_window(grants["flood"] + grants["steady"], window)
    assert refused["flood"] > 0  # it really flooded
    assert flood_tokens <= 500  # held to its half
    assert all_tokens <= limit.tpm
    assert steady_done.is_set() and refused["steady"] == 0  # served all 8, never starved


# Reconcile


def test_reconcile_down_returns_the_difference_to_everyone(ddb, clock):
    worker, other = ledger_for(ddb, clock), ledger_for(ddb, clock)
    reservation = worker.acquire(LIMIT, 600, Lane.REALTIME, max_wait_seconds=0)
    worker.reconcile(reservation, 200)
    with pytest.raises(ServiceOverloaded):
        other.acquire(LIMIT, 801, Lane.REALTIME, max_wait_seconds=0)
    assert other.acquire(LIMIT, 800, Lane.REALTIME, max_wait_seconds=0).waited_seconds == 0


def test_reconcile_up_reduces_what_others_can_get(ddb, clock):
    worker, other = ledger_for(ddb, clock), ledger_for(ddb, clock)
    reservation = worker.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0)
    worker.reconcile(reservation, 600)
    with pytest.raises(ServiceOverloaded):
        other.acquire(LIMIT, 401, Lane.REALTIME, max_wait_seconds=0)
    assert other.acquire(LIMIT, 400, Lane.REALTIME, max_wait_seconds=0)
    assert item(ddb)["tokens_total"]["N"] == "1000"


def test_late_reconcile_refund_is_dropped_and_late_overuse_lands_in_the_current_slot(ddb, clock):
    proxy = ClientProxy(ddb)
    ledger = ledger_for(proxy, clock)
    reservation = ledger.acquire(LIMIT, 300, Lane.BULK, max_wait_seconds=0)
    clock.sleep(LIMIT.window_seconds + 5)  # the reservation's slot has left every window
    calls = len(proxy.calls)
    ledger.reconcile(reservation, 100)
    assert len(proxy.calls) == calls
    ledger.reconcile(reservation, 500)
    current = slot_of(clock(), LIMIT.window_seconds / 60)
    assert parse_item(item(ddb)).slots[current][0] == 200


# Cooldowns


def test_a_throttle_reported_by_one_process_stops_every_caller(ddb, clock):
    hit, other = ledger_for(ddb, clock), ledger_for(ddb, clock)
    hit.report_throttle(LIMIT, 30)
    for lane in Lane:
        with pytest.raises(ServiceOverloaded) as refused:
            other.acquire(LIMIT, 10, lane, max_wait_seconds=5)
        assert refused.value.retry_after == pytest.approx(30, abs=0.01)
    reservation = other.acquire(LIMIT, 10, Lane.BULK, max_wait_seconds=60)
    assert reservation.granted_at >= T0 + 30
    assert reservation.waited_seconds >= 30


def test_a_shorter_throttle_never_shortens_the_cooldown(ddb, clock):
    ledger = ledger_for(ddb, clock)
    ledger.report_throttle(LIMIT, 30)
    ledger.report_throttle(LIMIT, 2)
    assert float(item(ddb)["cooldown_until"]["N"]) == pytest.approx(T0 + 30)


# Lanes


def test_bulk_leaves_the_idle_reserve_free_and_the_first_user_is_granted_from_it_at_once(ddb, clock):
    worker, api = ledger_for(ddb, clock, bulk_idle_ceiling=0.9), ledger_for(ddb, clock)
    for _ in range(9):
        worker.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    with pytest.raises(ServiceOverloaded):
        worker.acquire(LIMIT, 1, Lane.BULK, max_wait_seconds=0)  # 901 of 1000: into the reserve
    assert api.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0).waited_seconds == 0


def test_the_idle_reserve_is_held_by_the_write_condition_not_only_by_the_plan(ddb, clock):
    first, second = (
        ledger_for(ddb, clock, bulk_idle_ceiling=0.9),
        ledger_for(ddb, clock, bulk_idle_ceiling=0.9),
    )
    first.acquire(LIMIT, 800, Lane.BULK, max_wait_seconds=0)
    second.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)  # 900: the first's hint still says 800
    with pytest.raises(ServiceOverloaded):
        first.acquire(LIMIT, 50, Lane.BULK, max_wait_seconds=0)
    assert first.stats()["conflicts"] == 1  # the hint said it fits; DynamoDB's condition refused it
    assert int(item(ddb)["tokens_total"]["N"]) == 900


def test_bulk_uses_the_whole_budget_while_users_are_idle_without_a_reserve(ddb, clock):
    ledger = ledger_for(ddb, clock, bulk_idle_ceiling=1.0)
    for _ in range(10):
        ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    with pytest.raises(ServiceOverloaded):
        ledger.acquire(LIMIT, 1, Lane.BULK, max_wait_seconds=0)


def test_an_idle_ceiling_below_the_ceiling_is_refused(ddb, clock):
    with pytest.raises(ValueError, match="bulk_idle_ceiling"):
        ledger_for(ddb, clock, bulk_ceiling=0.8, bulk_idle_ceiling=0.7)


def test_bulk_stops_at_the_ceiling_while_users_are_active_and_realtime_takes_the_rest(ddb, clock):
    api, worker = ledger_for(ddb, clock), ledger_for(ddb, clock)
    api.acquire(LIMIT, 50, Lane.REALTIME, max_wait_seconds=0)
    bulk_tokens = 0
    with pytest.raises(ServiceOverloaded):
        while True:
            worker.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
            bulk_tokens += 100
    assert 50 + bulk_tokens == 750  # 800 is the ceiling: one more 100 would cross it
    assert api.acquire(LIMIT, 250, Lane.REALTIME, max_wait_seconds=0).waited_seconds == 0


def test_bulk_returns_to_the_idle_ceiling_once_users_leave(ddb, clock):
    api, worker = ledger_for(ddb, clock), ledger_for(ddb, clock)  # the default idle ceiling: 0.98
    api.acquire(LIMIT, 10, Lane.REALTIME, max_wait_seconds=0)
    clock.sleep(LIMIT.window_seconds + 2)  # no realtime use for a whole window
    for _ in range(9):
        worker.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    worker.acquire(LIMIT, 80, Lane.BULK, max_wait_seconds=0)  # 980 of 1000, above the 0.8 ceiling
    with pytest.raises(ServiceOverloaded):
        worker.acquire(LIMIT, 1, Lane.BULK, max_wait_seconds=0)


@pytest.mark.parametrize("realtime_waiting", [True, False])
def test_a_waiting_realtime_caller_is_not_starved_by_bulk_in_other_processes(ddb, clock, realtime_waiting):
    """Bulk fills the window while users are idle; a user arrives. The slot that frees next must go to the
    user, though a bulk worker elsewhere asks for it first."""
    worker = ledger_for(ddb, clock, bulk_idle_ceiling=1.0)
    worker.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    clock.sleep(1.0)
    for _ in range(9):
        worker.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)  # 1000 of 1000, users idle
    clock.sleep(5.0)
    first_slot_leaves = T0 + LIMIT.window_seconds + 1.0  # the window plus one slot
    bulk_outcomes: list[tuple[float, str]] = []

    def bulk_asks_whenever_the_user_sleeps(seconds: float) -> None:
        clock.sleep(seconds)
        try:
            worker.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
            bulk_outcomes.append((clock(), "granted"))
        except ServiceOverloaded:
            bulk_outcomes.append((clock(), "refused"))

    if realtime_waiting:
        api = RateLimitLedger(TABLE, ddb, clock=clock, sleep=bulk_asks_whenever_the_user_sleeps)
        reservation = api.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=120)
        assert reservation.granted_at > first_slot_leaves
        # Bulk asked after the slot freed, before the user woke, and was refused: the user got it.
        assert any(at > first_slot_leaves for at, _ in bulk_outcomes)
        assert all(outcome == "refused" for _, outcome in bulk_outcomes)
    else:
        clock.sleep(first_slot_leaves + 1.0 - clock())
        bulk_asks_whenever_the_user_sleeps(0.0)
        assert bulk_outcomes[-1][1] == "granted"  # without the user's demand, bulk may take it


def test_a_refused_realtime_caller_still_makes_bulk_yield(ddb, clock):
    worker, api = ledger_for(ddb, clock, bulk_idle_ceiling=1.0), ledger_for(ddb, clock)
    for _ in range(10):
        worker.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    with pytest.raises(ServiceOverloaded):
        api.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0)
    assert float(item(ddb)["realtime_until"]["N"]) > clock()


# Waiting limits


def test_max_wait_exceeded_raises_service_overloaded_with_an_honest_retry_after(ddb, clock):
    ledger = ledger_for(ddb, clock, bulk_idle_ceiling=1.0)
    ledger.acquire(LIMIT, 1000, Lane.BULK, max_wait_seconds=0)
    clock.sleep(10)
    with pytest.raises(ServiceOverloaded) as refused:
        ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=5)
    assert refused.value.status == 429
    retry_after = refused.value.retry_after
    assert 50 < retry_after < 52  # the window plus one slot plus the guard, from the grant
    clock.sleep(retry_after)
    assert ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0).waited_seconds == 0


def test_waiting_sleeps_until_the_budget_frees_instead_of_polling(ddb, clock):
    ledger = ledger_for(ddb, clock, bulk_idle_ceiling=1.0)
    ledger.acquire(LIMIT, 1000, Lane.BULK, max_wait_seconds=0)
    reservation = ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=120)
    assert 61 <= reservation.waited_seconds < 62
    assert ledger.stats()["waits"] <= 61 / 5 + 1  # sleeps are capped at 5 s, never short polls


def test_a_request_larger_than_the_budget_is_rejected_outright(ddb, clock):
    with pytest.raises(InvalidRequest):
        ledger_for(ddb, clock).acquire(LIMIT, LIMIT.tpm + 1, Lane.REALTIME, max_wait_seconds=60)


# DynamoDB failures


def refused(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "refused"}}, "UpdateItem")


class Recorder:
    """An OpsMetrics stand-in: what the ledger counted, by name and dimensions."""

    def __init__(self):
        self.counts: list[tuple[str, dict]] = []

    def count(self, name: str, value: float = 1, **dimensions: str) -> None:
        self.counts.append((name, dimensions))


@pytest.mark.parametrize("lane", list(Lane))
@pytest.mark.parametrize("error", [throttled(), unreachable()], ids=["throughput-exceeded", "no-endpoint"])
def test_a_transient_failure_sheds_every_lane_by_default(ddb, clock, error, lane):
    metrics = Recorder()
    ledger = ledger_for(ClientProxy(ddb, error), clock, metrics=metrics)
    with pytest.raises(LedgerUnavailable) as unavailable:
        ledger.acquire(LIMIT, 100, lane, max_wait_seconds=60)
    assert unavailable.value.retryable and unavailable.value.status == 503
    assert unavailable.value.retry_after == 1.0  # the API's Retry-After
    assert ledger.stats()["shed"] == 1 and ledger.stats()["fallback_grants"] == 0
    assert metrics.counts == [("LedgerErrors", {"kind": "transient"})]


@pytest.mark.parametrize(
    "code", ["AccessDeniedException", "ResourceNotFoundException", "ValidationException", "SomethingNew"]
)
@pytest.mark.parametrize("lane", list(Lane))
def test_an_error_waiting_cannot_fix_fails_closed_naming_the_table(ddb, clock, code, lane, caplog):
    metrics = Recorder()
    ledger = ledger_for(
        ClientProxy(ddb, refused(code)), clock, metrics=metrics, fallback_share=0.2, fallback_processes=2
    )
    clock.sleep(LIMIT.window_seconds * 2)  # old enough to use the fallback, which must not happen here
    with pytest.raises(LedgerMisconfigured) as misconfigured:
        ledger.acquire(LIMIT, 100, lane, max_wait_seconds=60)
    assert misconfigured.value.status == 503
    assert TABLE in misconfigured.value.message and code in misconfigured.value.message
    assert ledger.stats()["fallback_grants"] == 0
    assert metrics.counts == [("LedgerErrors", {"kind": "misconfigured"})]
    assert any(r.levelname == "ERROR" and "failing closed" in r.getMessage() for r in caplog.records)


def fallback_ledger(ddb, clock, *, failures: int = 10**9, **kwargs) -> RateLimitLedger:
    """An API process of a deployment keeping 20% for the fallback, with 2 API processes at most."""
    ledger = ledger_for(
        ClientProxy(ddb, throttled(), failures=failures),
        clock,
        fallback_share=0.2,
        fallback_processes=2,
        **kwargs,
    )
    clock.sleep(LIMIT.window_seconds + 1)  # older than a window: it may grant from memory
    return ledger


def test_with_a_fallback_share_dynamodb_grants_only_the_rest_of_the_limit(ddb, clock):
    ledger = ledger_for(ddb, clock, fallback_share=0.2, fallback_processes=2)
    granted = 0
    with pytest.raises(ServiceOverloaded):
        while True:
            ledger.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0)
            granted += 100
    assert granted == 800  # 0.8 x 1000: the 200 kept back cover the processes' in-memory grants


def test_realtime_falls_back_to_its_share_of_the_kept_back_budget(ddb, clock):
    metrics = Recorder()
    ledger = fallback_ledger(ddb, clock, metrics=metrics)
    # 0.2 x 1000 tokens / 2 processes = 100 tokens; 0.2 x 100 requests / 2 = 10 requests, per window.
    granted = [ledger.acquire(LIMIT, 50, Lane.REALTIME, max_wait_seconds=0) for _ in range(2)]
    assert all(r.fallback for r in granted)
    with pytest.raises(ServiceOverloaded) as over:
        ledger.acquire(LIMIT, 1, Lane.REALTIME, max_wait_seconds=0)
    assert over.value.retry_after == pytest.approx(LIMIT.window_seconds + ledger.guard_seconds, abs=0.01)
    later = ledger.acquire(LIMIT, 50, Lane.REALTIME, max_wait_seconds=120)
    assert later.fallback and later.waited_seconds >= LIMIT.window_seconds
    assert ledger.stats()["fallback_grants"] == 3
    assert metrics.counts.count(("LedgerFallbackGrants", {"kind": "grant"})) == 3
    with pytest.raises(LedgerUnavailable):  # bulk never grants from memory
        ledger.acquire(LIMIT, 1, Lane.BULK, max_wait_seconds=0)


def test_a_process_younger_than_a_window_sheds_instead_of_granting_from_memory(ddb, clock):
    young = ledger_for(ClientProxy(ddb, throttled()), clock, fallback_share=0.2, fallback_processes=2)
    clock.sleep(LIMIT.window_seconds / 2)
    with pytest.raises(LedgerUnavailable):
        young.acquire(LIMIT, 10, Lane.REALTIME, max_wait_seconds=0)
    clock.sleep(LIMIT.window_seconds)
    assert young.acquire(LIMIT, 10, Lane.REALTIME, max_wait_seconds=0).fallback


def test_fallback_counts_reconciled_usage(ddb, clock):
    ledger = fallback_ledger(ddb, clock)
    reservation = ledger.acquire(LIMIT, 40, Lane.REALTIME, max_wait_seconds=0)
    ledger.reconcile(reservation, 100)
    with pytest.raises(ServiceOverloaded):
        ledger.acquire(LIMIT, 1, Lane.REALTIME, max_wait_seconds=0)


def test_fallback_honours_a_throttle_this_process_saw(ddb, clock):
    ledger = fallback_ledger(ddb, clock)
    ledger.report_throttle(LIMIT, 20)  # the write fails; the process still remembers
    with pytest.raises(ServiceOverloaded) as over:
        ledger.acquire(LIMIT, 10, Lane.REALTIME, max_wait_seconds=5)
    assert over.value.retry_after == pytest.approx(20, abs=0.01)


def test_realtime_returns_to_dynamodb_on_the_next_call(ddb, clock):
    ledger = fallback_ledger(ddb, clock, failures=1)
    assert ledger.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0).fallback
    back = ledger.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0)
    assert not back.fallback
    assert item(ddb)["tokens_total"]["N"] == "100"


def test_a_failed_reconcile_or_throttle_report_does_not_raise(ddb, clock):
    proxy = ClientProxy(ddb)
    ledger = ledger_for(proxy, clock)
    reservation = ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    proxy.error = unreachable()
    ledger.reconcile(reservation, 150)
    ledger.report_throttle(LIMIT, 5)
    assert ledger.stats()["ledger_errors"] == 2


# The item


def test_create_ledger_table_is_idempotent_and_enables_ttl(ddb):
    create_ledger_table(ddb, TABLE)
    ttl = ddb.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}
    schema = ddb.describe_table(TableName=TABLE)["Table"]["KeySchema"]
    assert schema == [{"AttributeName": "pk", "KeyType": "HASH"}]


def test_old_slots_are_removed_and_the_item_expires_when_idle(ddb, clock):
    ledger = ledger_for(ddb, clock)
    for _ in range(30):
        ledger.acquire(LIMIT, 10, Lane.BULK, max_wait_seconds=0)
        clock.sleep(7.0)  # 210 s: several windows' worth of slots
    stored = item(ddb)
    state = parse_item(stored)
    state_slots = sorted(state.slots)
    assert len(state_slots) <= 9 + 8  # about 9 grants in the window, fewer than 8 waiting for removal
    assert int(stored["removed_below"]["N"]) > slot_of(T0, 1.0)
    assert int(stored["tokens_total"]["N"]) == sum(tokens for tokens, _ in state.slots.values())
    assert int(stored["expires_at"]["N"]) >= clock() - 7.0 + 2 * LIMIT.window_seconds


def test_totals_that_disagree_with_their_slots_are_repaired(ddb, clock):
    ledger = ledger_for(ddb, clock)
    ledger.acquire(LIMIT, 100, Lane.BULK, max_wait_seconds=0)
    ddb.update_item(
        TableName=TABLE,
        Key=item_key(LIMIT.key),
        UpdateExpression="SET tokens_total = :big",
        ExpressionAttributeValues={":big": {"N": "5000"}},
    )
    fresh = ledger_for(ddb, clock, bulk_idle_ceiling=1.0)
    fresh.acquire(LIMIT, 900, Lane.BULK, max_wait_seconds=0)
    assert fresh.stats()["repairs"] == 1
    assert item(ddb)["tokens_total"]["N"] == "1000"


SKEWED = LimitSpec(key="sim:skewed", tpm=1000, rpm=100, window_seconds=10.0, guard_seconds=0.5)


def skewed_ledger(ddb, clock: FakeClock, offset: float) -> RateLimitLedger:
    """A 'process' whose clock is off by `offset` seconds."""
    return RateLimitLedger(TABLE, ddb, clock=lambda: clock() + offset, sleep=clock.sleep)


def compact_by_a_clock_ahead(ddb, clock: FakeClock, ahead: float) -> int:
    """A process `ahead` s fast fills the window, and once the slot has left, its next grant removes it."""
    fast = skewed_ledger(ddb, clock, ahead)
    fast.acquire(SKEWED, 900, Lane.REALTIME, max_wait_seconds=0)
    clock.sleep(SKEWED.window_seconds + 2 * 10.0 / 60 + SKEWED.guard_seconds)
    fast.acquire(SKEWED, 200, Lane.REALTIME, max_wait_seconds=0)  # fits only without the old slot
    assert fast.stats()["compactions"] == 1
    return int(item(ddb, SKEWED.key)["removed_below"]["N"])


def test_a_clock_behind_is_not_held_back_by_what_a_clock_ahead_removed(ddb, clock):
    removed_below = compact_by_a_clock_ahead(ddb, clock, ahead=0.2)
    slow = skewed_ledger(ddb, clock, -0.2)
    assert first_counted_slot(clock() - 0.2, 10.0 / 60, 60, 0.5) < removed_below  # it still counts them
    assert slow.acquire(SKEWED, 100, Lane.REALTIME, max_wait_seconds=0).waited_seconds == 0


def test_a_refund_for_a_slot_a_clock_one_guard_ahead_has_removed_is_dropped(ddb, clock):
    proxy = ClientProxy(ddb)
    ledger = RateLimitLedger(TABLE, proxy, clock=clock, sleep=clock.sleep)
    reservation = ledger.acquire(SKEWED, 300, Lane.REALTIME, max_wait_seconds=0)
    # Its own clock still counts the slot (more than 2 slots from the edge); a clock 0.5 s ahead does not.
    clock.sleep(SKEWED.window_seconds + SKEWED.guard_seconds - 0.3)
    calls = len(proxy.calls)
    ledger.reconcile(reservation, 200)
    assert len(proxy.calls) == calls  # a refund there could land after its removal and undercount
    assert int(item(ddb, SKEWED.key)["tokens_total"]["N"]) == 300


def test_a_reading_stale_by_more_than_the_guard_cannot_grant_past_a_removal(ddb, clock):
    compact_by_a_clock_ahead(ddb, clock, ahead=0.2)
    stale = skewed_ledger(ddb, clock, -1.5)  # e.g. a process frozen between its clock reading and its write
    with pytest.raises(ServiceOverloaded):
        stale.acquire(SKEWED, 100, Lane.REALTIME, max_wait_seconds=0)
    waited = stale.acquire(SKEWED, 100, Lane.REALTIME, max_wait_seconds=5).waited_seconds
    assert 0.5 < waited < 1.7  # until the removals lie within what its own clock, a guard ahead, removes


def test_noop_ledger_grants_at_once():
    ledger = NoopLedger()
    reservation = ledger.acquire(LIMIT, 10**9, Lane.BULK, max_wait_seconds=0)
    ledger.reconcile(reservation, 5)
    ledger.report_throttle(LIMIT, 30)
    assert reservation.waited_seconds == 0
    assert ledger.stats()["grants"] == 1


@given(tokens=st.integers(-(10**12), 10**12), requests=st.integers(0, 10**9 - 1))
def test_a_packed_slot_gives_back_exactly_its_tokens_and_requests(tokens, requests):
    from embedsvc.services.ratelimit import pack_slot, unpack_slot

    assert unpack_slot(pack_slot(tokens, requests)) == (tokens, requests)
    # What ADDs to a packed slot do: the sum of two packed values is the packed sum.
    assert unpack_slot(pack_slot(tokens, requests) + pack_slot(-tokens, 0)) == (0, requests)


# Leases and pacing


def test_a_busy_api_process_leases_budget_for_its_next_requests_and_returns_what_it_did_not_use(ddb, clock):
    limit = LimitSpec(key="sim:lease", tpm=10_000, rpm=1000, window_seconds=60.0, guard_seconds=2.0)
    proxy = ClientProxy(ddb)
    api = ledger_for(proxy, clock, lease_seconds=0.5)
    for _ in range(40):  # 20 requests a second
        api.acquire(limit, 10, Lane.REALTIME, max_wait_seconds=0)
        clock.sleep(0.05)
    writes = proxy.calls.count("update_item")
    assert api.stats()["lease_grants"] > 20 and writes < 20  # most requests cost no DynamoDB call
    clock.sleep(5)  # the lease expires; the next request returns its unused part, then leases again
    api.acquire(limit, 10, Lane.REALTIME, max_wait_seconds=0)
    other = ledger_for(ddb, clock)
    state = parse_item(item(ddb, limit.key))
    assert state.tokens_total <= 41 * 10 + 10 * 16  # at most one lease's unused part is still counted
    assert other.acquire(limit, 10_000 - state.tokens_total, Lane.REALTIME, max_wait_seconds=0)


def test_an_idle_api_process_reserves_exactly_what_it_asks(ddb, clock):
    limit = LimitSpec(key="sim:idle", tpm=10_000, rpm=1000, window_seconds=60.0, guard_seconds=2.0)
    api = ledger_for(ddb, clock, lease_seconds=0.5)
    for _ in range(3):
        api.acquire(limit, 10, Lane.REALTIME, max_wait_seconds=0)
        clock.sleep(5)
    assert api.stats()["leases"] == 0
    assert parse_item(item(ddb, limit.key)).tokens_total == 30


def test_paced_bulk_spreads_a_backlog_over_the_window(ddb, clock):
    limit = LimitSpec(key="sim:pace", tpm=1200, rpm=1000, window_seconds=60.0, guard_seconds=0.0)
    worker = ledger_for(ddb, clock, bulk_pace=1.2, bulk_idle_ceiling=1.0)
    grants = [worker.acquire(limit, 100, Lane.BULK, max_wait_seconds=120).granted_at for _ in range(12)]
    # 1,200 tokens at 1.2 x the average rate take about 50 s, not one instant; no eighth of the window
    # (7.5 s) holds more than 1.2 x its share (180 tokens: one 100-token grant at a time).
    assert grants[-1] - grants[0] > 40
    assert all(b - a > 0 for a, b in zip(grants, grants[1:], strict=False))
    unpaced = ledger_for(ddb, clock, bulk_idle_ceiling=1.0)
    clock.sleep(200)
    start = clock()
    for _ in range(12):
        unpaced.acquire(LimitSpec("sim:burst", 1200, 1000, 60.0), 100, Lane.BULK, max_wait_seconds=0)
    assert clock() == start  # without pacing the backlog takes the window at once
