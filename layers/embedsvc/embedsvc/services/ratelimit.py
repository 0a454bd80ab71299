"""The shared rate-limit ledger: every caller reserves tokens and a request in DynamoDB before a provider call.

Design. One item per limit key (`provider:model`) holds per-slot counters: the window is cut into
`slots_per_window` slots of `window / slots_per_window` seconds, and a grant at time `now` adds its tokens
to `t_<slot>` and one request to `r_<slot>`, where `slot = floor(now / slot_seconds)`. A caller may be
granted if the slots from `slot - slots_per_window` up to the newest (the window plus one extra slot, and
any slot a clock running ahead wrote) leave room for it. Every provider window `(T - W, T]` lies inside
such a span of slots, so the provider never sees more than its limit in any window, however many
processes share the item. The grant is one UpdateItem conditioned on the version read (optimistic
compare-and-set): a ConditionalCheckFailed returns the current item (`ReturnValuesOnConditionCheckFailure`)
and the caller decides again, so no read-then-write race can over-grant. The same write removes slots
no window can reach any more and refreshes `expires_at` (the table's TTL attribute) so idle keys vanish.
Happy path: one consistent GetItem and one UpdateItem. `reconcile` adds the difference between the
provider's reported usage and the estimate to the reservation's own slot with an atomic ADD, bumping
the version so a decision taken on the old counts fails its condition; an exact estimate writes nothing.

Waiting. When the budget is spent the caller computes, from the slots, when enough of them leave the
window for its request to fit, and sleeps exactly that long (capped, plus a little jitter so waiters do
not read in lockstep) before deciding again: no polling. A provider 429 sets `cooldown_until` to the
later of the stored value and now + Retry-After; every caller in every process waits it out.

Lanes. `realtime` may use the whole budget. `bulk` is granted only while the window's total (all lanes)
stays at or below `bulk_ceiling` x limit whenever users are active, and uses the whole budget when they
are idle. Users are active while `realtime_until` lies ahead: a realtime grant sets it to now + window,
and a realtime caller that has to wait first writes its demand there (bumping the version, so a bulk
grant decided before the write fails its condition). Bulk callers in every process therefore leave the
headroom above the ceiling, and each slot that leaves the window goes to the waiting realtime caller.

DynamoDB failure (throttling, errors, timeouts, no endpoint). Bulk raises `LedgerUnavailable`: its SQS
message is retried later, and the provider is never called unmetered. Realtime falls back to an
in-process sliding window granting at most `fallback_fraction` x limit per window in this process (it
also honours any cooldown this process knows of), logs a warning, and tries DynamoDB again on its next
call. Fallback grants are invisible to other processes: the fraction bounds the overshoot while users
keep being served. A failed `reconcile` or `report_throttle` is logged and swallowed: the provider call
already happened, and its 429 backstops any under-count.

Limits of the design: slot times come from each process's clock, so clocks must agree to within about
a slot (NTP-synchronised Lambda clocks agree to milliseconds); one `LimitSpec` window per key.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import BotoCoreError, ClientError

from embedsvc.errors import InvalidRequest, LedgerUnavailable, ServiceOverloaded

logger = Logger(child=True)

# Removal keeps one slot more than any window reads, so a process whose clock lags by a slot still
# finds every slot it must count.
_KEEP_EXTRA_SLOTS = 2
# A slot keeps counting this long after the window has passed it: the spread, between two requests, of the
# delay from grant to the provider's clock (the write's round trip, the HTTP send, the provider's queue).
DEFAULT_GUARD_SECONDS = 0.1
_MAX_REMOVALS_PER_WRITE = 40  # keeps the update expression small after a long idle spell
_MAX_SLEEP_SECONDS = 5.0
_EPSILON_SECONDS = 0.001  # wake just past a slot boundary, never just before it
_FALLBACK_RETRY_AFTER_SECONDS = 1.0


class Lane(StrEnum):
    REALTIME = "realtime"
    BULK = "bulk"


@dataclass(frozen=True)
class LimitSpec:
    key: str  # provider:model; one ledger item per key
    tpm: int  # tokens per window
    rpm: int  # requests per window
    window_seconds: float = 60.0


@dataclass(frozen=True)
class Reservation:
    limit: LimitSpec
    tokens: int
    lane: Lane
    slot: int
    waited_seconds: float
    granted_at: float = 0.0
    fallback: bool = False  # granted by the in-process fallback limiter, not recorded in DynamoDB


@dataclass(frozen=True)
class LedgerState:
    """What one read of a key's item says."""

    version: int = 0  # 0: no item yet
    slots: Mapping[int, tuple[int, int]] | None = None  # slot -> (tokens, requests)
    cooldown_until: float = 0.0
    realtime_until: float = 0.0

    def slot_items(self) -> list[tuple[int, int, int]]:
        """(slot, tokens, requests), oldest first."""
        return sorted((slot, t, r) for slot, (t, r) in (self.slots or {}).items())


def slot_seconds(limit: LimitSpec, slots_per_window: int) -> float:
    """How long one slot lasts."""
    return limit.window_seconds / slots_per_window


def slot_of(now: float, seconds_per_slot: float) -> int:
    """The absolute slot number `now` falls in."""
    return math.floor(now / seconds_per_slot)


def first_counted_slot(now: float, seconds_per_slot: float, slots_per_window: int, guard_seconds: float) -> int:
    """The oldest slot a decision at `now` must count: the window, one extra slot, and the guard."""
    return slot_of(now - guard_seconds, seconds_per_slot) - slots_per_window


def parse_item(item: Mapping[str, Any] | None) -> LedgerState:
    """A ledger item in DynamoDB's wire format, as a LedgerState."""
    if not item:
        return LedgerState()
    tokens: dict[int, int] = {}
    requests: dict[int, int] = {}
    for name, value in item.items():
        if name[:2] in ("t_", "r_") and name[2:].lstrip("-").isdigit():
            target = tokens if name[0] == "t" else requests
            target[int(name[2:])] = int(float(value["N"]))
    slots = {slot: (tokens.get(slot, 0), requests.get(slot, 0)) for slot in tokens.keys() | requests.keys()}

    def number(name: str) -> float:
        return float(item[name]["N"]) if name in item else 0.0

    return LedgerState(
        version=int(number("v")),
        slots=slots,
        cooldown_until=number("cooldown_until"),
        realtime_until=number("realtime_until"),
    )


def wait_until_fits(
    slots: list[tuple[int, int, int]],
    *,
    now: float,
    seconds_per_slot: float,
    slots_per_window: int,
    guard_seconds: float,
    tokens: int,
    token_cap: float,
    request_cap: float,
) -> float:
    """Seconds until `tokens` and one request fit under the caps: 0 if they fit now, inf if never."""
    if tokens > token_cap or request_cap < 1:
        return math.inf
    oldest_counted = first_counted_slot(now, seconds_per_slot, slots_per_window, guard_seconds)
    counted = [(slot, max(t, 0), max(r, 0)) for slot, t, r in slots if slot >= oldest_counted]
    used_tokens = sum(t for _, t, _ in counted)
    used_requests = sum(r for _, _, r in counted)
    if used_tokens + tokens <= token_cap and used_requests + 1 <= request_cap:
        return 0.0
    for slot, t, r in counted:
        used_tokens -= t
        used_requests -= r
        if used_tokens + tokens <= token_cap and used_requests + 1 <= request_cap:
            leaves_at = (slot + slots_per_window + 1) * seconds_per_slot + guard_seconds
            return max(leaves_at - now, 0.0) + _EPSILON_SECONDS
    return math.inf


def plan_wait(
    state: LedgerState,
    limit: LimitSpec,
    tokens: int,
    lane: Lane,
    now: float,
    *,
    slots_per_window: int,
    bulk_ceiling: float,
    guard_seconds: float = 0.0,
) -> float:
    """Seconds this caller must wait before its grant (0: grant now), from one read of the item."""
    seconds_per_slot = slot_seconds(limit, slots_per_window)
    slots = state.slot_items()

    def wait_under(fraction: float) -> float:
        return wait_until_fits(
            slots,
            now=now,
            seconds_per_slot=seconds_per_slot,
            slots_per_window=slots_per_window,
            guard_seconds=guard_seconds,
            tokens=tokens,
            token_cap=fraction * limit.tpm,
            request_cap=fraction * limit.rpm,
        )

    wait = wait_under(1.0)
    if lane is Lane.BULK and state.realtime_until > now:
        # Users are active: bulk fits under the ceiling, or waits for users to go idle (whichever is first).
        wait = min(wait_under(bulk_ceiling), max(wait, state.realtime_until - now))
    return max(wait, state.cooldown_until - now, 0.0)


class _LedgerDown(Exception):
    """DynamoDB did not answer usefully; carries the original error."""


class _LocalWindow:
    """This process's sliding window, used only while DynamoDB is unreachable."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int, int]] = deque()  # (at, tokens, requests)

    def wait(self, now: float, window: float, tokens: int, token_cap: float, request_cap: float) -> float:
        while self.events and self.events[0][0] <= now - window:
            self.events.popleft()
        if tokens > token_cap:
            return math.inf
        # Corrections from reconcile arrive out of order: sort before walking the oldest first.
        events = sorted(self.events)
        used_tokens = sum(max(t, 0) for _, t, _ in events)
        used_requests = sum(r for _, _, r in events)
        if used_tokens + tokens <= token_cap and used_requests + 1 <= request_cap:
            return 0.0
        for at, t, r in events:
            used_tokens -= max(t, 0)
            used_requests -= r
            if used_tokens + tokens <= token_cap and used_requests + 1 <= request_cap:
                return at + window - now + _EPSILON_SECONDS
        return math.inf

    def add(self, at: float, tokens: int, requests: int) -> None:
        self.events.append((at, tokens, requests))


class RateLimitLedger:
    """Reserve provider budget in DynamoDB before each call; reconcile after; share 429 cooldowns."""

    def __init__(
        self,
        table_name: str,
        client=None,
        *,
        bulk_ceiling: float = 0.8,
        slots_per_window: int = 60,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        fallback_fraction: float = 0.25,
        guard_seconds: float = DEFAULT_GUARD_SECONDS,
    ):
        if not 0 < bulk_ceiling <= 1:
            raise ValueError("bulk_ceiling must be in (0, 1]")
        if slots_per_window < 1:
            raise ValueError("slots_per_window must be at least 1")
        self.table_name = table_name
        self._client = client
        self.bulk_ceiling = bulk_ceiling
        self.slots_per_window = slots_per_window
        self.clock = clock
        self.sleep = sleep
        self.fallback_fraction = fallback_fraction
        self.guard_seconds = guard_seconds
        self._lock = threading.Lock()
        self._random = random.Random()
        self._local: dict[str, _LocalWindow] = {}
        self._local_cooldowns: dict[str, float] = {}
        self._stats: dict[str, float] = dict.fromkeys(
            (
                "dynamodb_calls",
                "get_item_calls",
                "update_item_calls",
                "grants",
                "conflicts",
                "waits",
                "wait_seconds",
                "demand_marks",
                "reconcile_writes",
                "throttles_reported",
                "overloaded",
                "ledger_errors",
                "fallback_grants",
            ),
            0,
        )

    @property
    def client(self):
        """The boto3 DynamoDB client, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    # Short timeouts and few retries: a realtime caller would rather fall back than hang.
                    self._client = boto3.client(
                        "dynamodb",
                        config=Config(
                            retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2, read_timeout=2
                        ),
                    )
        return self._client

    def stats(self) -> dict:
        """Counters for benchmarks: DynamoDB calls, grants, CAS conflicts, waits, fallbacks."""
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._stats[name] += amount

    def _call(self, operation: str, **kwargs) -> dict:
        self._count("dynamodb_calls")
        self._count(f"{operation}_calls")
        try:
            return getattr(self.client, operation)(TableName=self.table_name, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise
            self._count("ledger_errors")
            raise _LedgerDown(exc) from exc
        except BotoCoreError as exc:
            self._count("ledger_errors")
            raise _LedgerDown(exc) from exc

    def _read(self, key: str) -> LedgerState:
        response = self._call("get_item", Key={"pk": {"S": key}}, ConsistentRead=True)
        state = parse_item(response.get("Item"))
        self._remember_cooldown(key, state.cooldown_until)
        return state

    def _remember_cooldown(self, key: str, until: float) -> None:
        with self._lock:
            if until > self._local_cooldowns.get(key, 0.0):
                self._local_cooldowns[key] = until

    def _expires_at(self, limit: LimitSpec, *times: float) -> str:
        return str(math.ceil(max(times) + 2 * limit.window_seconds))

    def _grant(self, limit: LimitSpec, state: LedgerState, tokens: int, lane: Lane, now: float, slot: int) -> None:
        """Write the grant, conditioned on the version read; raises ClientError on a conflict."""
        names = {"#v": "v", "#exp": "expires_at"}
        values: dict[str, dict[str, str]] = {
            ":v1": {"N": str(state.version + 1)},
            ":tokens": {"N": str(tokens)},
            ":one": {"N": "1"},
        }
        sets = ["#v = :v1", "#exp = :exp"]
        realtime_until = state.realtime_until
        if lane is Lane.REALTIME and now + limit.window_seconds > realtime_until:
            realtime_until = now + limit.window_seconds
            names["#rt"] = "realtime_until"
            values[":rt"] = {"N": repr(realtime_until)}
            sets.append("#rt = :rt")
        values[":exp"] = {"N": self._expires_at(limit, now, state.cooldown_until, realtime_until)}
        expression = f"SET {', '.join(sets)} ADD t_{slot} :tokens, r_{slot} :one"
        seconds_per_slot = slot_seconds(limit, self.slots_per_window)
        oldest_counted = first_counted_slot(now, seconds_per_slot, self.slots_per_window, self.guard_seconds)
        oldest_kept = oldest_counted - _KEEP_EXTRA_SLOTS
        stale = [s for s in sorted(state.slots or {}) if s < oldest_kept][:_MAX_REMOVALS_PER_WRITE]
        if stale:
            expression += " REMOVE " + ", ".join(f"{p}_{s}" for s in stale for p in ("t", "r"))
        if state.version:
            condition = "#v = :v0"
            values[":v0"] = {"N": str(state.version)}
        else:
            condition = "attribute_not_exists(pk)"
        self._call(
            "update_item",
            Key={"pk": {"S": limit.key}},
            UpdateExpression=expression,
            ConditionExpression=condition,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )

    def _mark_demand(self, limit: LimitSpec, state: LedgerState, until: float, now: float) -> None:
        """Tell bulk callers everywhere that a realtime caller is waiting, until `until`."""
        if state.realtime_until >= until:
            return
        self._count("demand_marks")
        try:
            self._call(
                "update_item",
                Key={"pk": {"S": limit.key}},
                UpdateExpression="SET #rt = :rt, #exp = :exp ADD #v :one",
                ConditionExpression="attribute_not_exists(#rt) OR #rt < :rt",
                ExpressionAttributeNames={"#rt": "realtime_until", "#v": "v", "#exp": "expires_at"},
                ExpressionAttributeValues={
                    ":rt": {"N": repr(until)},
                    ":one": {"N": "1"},
                    ":exp": {"N": self._expires_at(limit, now, state.cooldown_until, until)},
                },
            )
        except ClientError:
            pass  # someone already recorded a later demand

    def _validate(self, limit: LimitSpec, tokens: int) -> None:
        if tokens < 0:
            raise InvalidRequest(f"a reservation needs a non-negative token count, got {tokens}")
        if tokens > limit.tpm or limit.rpm < 1:
            raise InvalidRequest(
                f"a request of {tokens} tokens can never fit the budget of {limit.key} "
                f"({limit.tpm} tokens, {limit.rpm} requests per {limit.window_seconds:g}s); split it"
            )

    def _jitter(self, limit: LimitSpec) -> float:
        return self._random.uniform(0, min(0.25 * slot_seconds(limit, self.slots_per_window), 0.05))

    def acquire(self, limit: LimitSpec, tokens: int, lane: Lane, *, max_wait_seconds: float) -> Reservation:
        """Block until `tokens` and one request are reserved; ServiceOverloaded if that takes too long."""
        self._validate(limit, tokens)
        lane = Lane(lane)
        start = self.clock()
        state: LedgerState | None = None
        while True:
            now = self.clock()
            try:
                if state is None:
                    state = self._read(limit.key)
                wait = plan_wait(
                    state,
                    limit,
                    tokens,
                    lane,
                    now,
                    slots_per_window=self.slots_per_window,
                    bulk_ceiling=self.bulk_ceiling,
                    guard_seconds=self.guard_seconds,
                )
                if wait == 0:
                    slot = slot_of(now, slot_seconds(limit, self.slots_per_window))
                    try:
                        self._grant(limit, state, tokens, lane, now, slot)
                    except ClientError as exc:
                        self._count("conflicts")
                        # The failed condition hands back the item as it is now: decide again on it.
                        item = exc.response.get("Item")
                        state = parse_item(item) if item else None
                        continue
                    self._count("grants")
                    return Reservation(limit, tokens, lane, slot, now - start, granted_at=now)
                elapsed = now - start
                if elapsed + wait > max_wait_seconds:
                    if lane is Lane.REALTIME and math.isfinite(wait):
                        self._mark_demand(limit, state, now + min(wait, limit.window_seconds), now)
                    self._count("overloaded")
                    raise ServiceOverloaded(
                        f"the rate limit of {limit.key} is spent for {wait:.2f}s, longer than the "
                        f"{max_wait_seconds:g}s this caller may wait",
                        retry_after=wait,
                    )
                pause = min(wait, _MAX_SLEEP_SECONDS, limit.window_seconds / 4) + self._jitter(limit)
                if lane is Lane.REALTIME:
                    margin = max(2 * slot_seconds(limit, self.slots_per_window), 0.2)
                    self._mark_demand(limit, state, now + pause + margin, now)
            except _LedgerDown as exc:
                if lane is Lane.BULK:
                    raise LedgerUnavailable(
                        f"the rate-limit ledger is unavailable ({exc.__cause__!r}); retry later",
                        retry_after=_FALLBACK_RETRY_AFTER_SECONDS,
                    ) from exc
                return self._acquire_fallback(limit, tokens, start, max_wait_seconds, exc)
            self._count("waits")
            self._count("wait_seconds", pause)
            self.sleep(pause)
            state = None

    def _acquire_fallback(
        self, limit: LimitSpec, tokens: int, start: float, max_wait_seconds: float, error: Exception
    ) -> Reservation:
        """Grant from this process's conservative share while DynamoDB is unreachable."""
        logger.warning(
            "rate-limit ledger unavailable; realtime caller uses the in-process fallback limiter",
            extra={"limit_key": limit.key, "error": repr(error.__cause__), "fraction": self.fallback_fraction},
        )
        token_cap = self.fallback_fraction * limit.tpm
        request_cap = max(1.0, math.floor(self.fallback_fraction * limit.rpm))
        while True:
            now = self.clock()
            with self._lock:
                window = self._local.setdefault(limit.key, _LocalWindow())
                wait = window.wait(now, limit.window_seconds, tokens, token_cap, request_cap)
                wait = max(wait, self._local_cooldowns.get(limit.key, 0.0) - now)
                if wait == 0:
                    window.add(now, tokens, 1)
                    self._stats["fallback_grants"] += 1
                    self._stats["grants"] += 1
                    slot = slot_of(now, slot_seconds(limit, self.slots_per_window))
                    return Reservation(limit, tokens, Lane.REALTIME, slot, now - start, now, fallback=True)
            if now - start + wait > max_wait_seconds:
                self._count("overloaded")
                raise ServiceOverloaded(
                    f"the rate-limit ledger is unavailable and this process's fallback share of {limit.key} "
                    "is spent",
                    retry_after=wait if math.isfinite(wait) else _FALLBACK_RETRY_AFTER_SECONDS,
                )
            pause = min(wait, _MAX_SLEEP_SECONDS) + self._jitter(limit)
            self._count("waits")
            self._count("wait_seconds", pause)
            self.sleep(pause)

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> None:
        """Correct the reserved estimate with the provider's reported usage (no call if it was exact)."""
        delta = int(actual_tokens) - reservation.tokens
        if delta == 0:
            return
        limit = reservation.limit
        if reservation.fallback:
            with self._lock:
                self._local.setdefault(limit.key, _LocalWindow()).add(reservation.granted_at, delta, 0)
            return
        now = self.clock()
        seconds_per_slot = slot_seconds(limit, self.slots_per_window)
        if reservation.slot < first_counted_slot(now, seconds_per_slot, self.slots_per_window, self.guard_seconds):
            return  # the slot has left every window: nobody counts it any more
        try:
            self._call(
                "update_item",
                Key={"pk": {"S": limit.key}},
                UpdateExpression=f"SET #exp = if_not_exists(#exp, :exp) ADD t_{reservation.slot} :delta, #v :one",
                ExpressionAttributeNames={"#v": "v", "#exp": "expires_at"},
                ExpressionAttributeValues={
                    ":delta": {"N": str(delta)},
                    ":one": {"N": "1"},
                    ":exp": {"N": self._expires_at(limit, now)},
                },
            )
            self._count("reconcile_writes")
        except _LedgerDown as exc:
            logger.warning(
                "could not reconcile a reservation; the estimate stands until its slot expires",
                extra={"limit_key": limit.key, "delta": delta, "error": repr(exc.__cause__)},
            )

    def report_throttle(self, limit: LimitSpec, retry_after_seconds: float) -> None:
        """Record a provider 429: every caller, in every process, waits until now + retry_after."""
        now = self.clock()
        until = now + max(float(retry_after_seconds), 0.0)
        self._count("throttles_reported")
        self._remember_cooldown(limit.key, until)
        try:
            self._call(
                "update_item",
                Key={"pk": {"S": limit.key}},
                UpdateExpression="SET #cd = :cd, #exp = :exp ADD #v :one",
                ConditionExpression="attribute_not_exists(#cd) OR #cd < :cd",
                ExpressionAttributeNames={"#cd": "cooldown_until", "#v": "v", "#exp": "expires_at"},
                ExpressionAttributeValues={
                    ":cd": {"N": repr(until)},
                    ":one": {"N": "1"},
                    ":exp": {"N": self._expires_at(limit, now, until)},
                },
            )
        except ClientError:
            pass  # a later cooldown is already recorded
        except _LedgerDown as exc:
            logger.warning(
                "could not record a provider 429 in the ledger; only this process backs off",
                extra={"limit_key": limit.key, "retry_after": retry_after_seconds, "error": repr(exc.__cause__)},
            )


class NoopLedger:
    """The ledger where no limit applies (the in-process local model): grants at once, records nothing."""

    def __init__(self) -> None:
        self._grants = 0

    def acquire(self, limit: LimitSpec, tokens: int, lane: Lane, *, max_wait_seconds: float) -> Reservation:
        """Grant at once."""
        self._grants += 1
        return Reservation(limit, tokens, Lane(lane), 0, 0.0, granted_at=time.time())

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> None:
        """Nothing to correct."""

    def report_throttle(self, limit: LimitSpec, retry_after_seconds: float) -> None:
        """Nothing to record."""

    def stats(self) -> dict:
        """The same counters as RateLimitLedger; only grants move."""
        return {"dynamodb_calls": 0, "grants": self._grants, "conflicts": 0, "waits": 0}


def create_ledger_table(client, table_name: str) -> None:
    """Create the ledger table (partition key `pk`, TTL on `expires_at`) unless it exists."""
    try:
        client.create_table(
            TableName=table_name,
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        client.get_waiter("table_exists").wait(TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
            raise
    ttl = client.describe_time_to_live(TableName=table_name).get("TimeToLiveDescription", {})
    if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        client.update_time_to_live(
            TableName=table_name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
        )
