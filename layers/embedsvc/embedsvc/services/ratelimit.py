"""The shared rate-limit ledger: every caller reserves tokens and a request in DynamoDB before a provider call.

Accounting. One item per limit key (`v2#provider:model`). The window is cut into `slots_per_window`
slots; a grant at time `now` adds its tokens and one request to the slot's attribute `s_<slot>`
(`slot = floor(now / slot_seconds)`; both counters packed in one number, tokens x 10^9 + requests, so
each write touches one attribute per slot and the item stays small: DynamoDB bills a write by the whole
item's size), and the same amounts to the running totals `tokens_total` and `requests_total`, which
always equal the sum of the slots present. A slot counts until the
window, one extra slot and a guard (`guard_seconds`, the spread of grant-to-provider delays) have
passed it, so every provider window `(T - W, T]` lies inside what a decision counts: the provider
never sees more than its limit in any window, however many processes share the item.

Atomicity. A grant is one UpdateItem whose ConditionExpression is the budget check itself:
`tokens_total <= limit - tokens` (and the same for requests), no cooldown, and for bulk "users idle or
total under the ceiling". DynamoDB evaluates it on the live item, so no read-then-write race can
over-grant, and grants commute: concurrent callers only fail each other's conditions when the budget
is really at stake. (A version compare-and-set would fail every write that raced any other write;
under load that turned into chains of retries that starved realtime callers.) Slots that left the
window stay in the totals, which only errs on the safe side, until a grant needs their room or enough
pile up: that grant removes them in the same write, subtracts exactly their values (conditioned on
those values being unchanged) and raises `removed_below`. A caller whose clock runs ahead removes slots
that one whose clock runs behind still counts; the guard covers that skew, so such removals are safe
and do not hold anyone back. Every grant's condition requires only that no slot was removed beyond what
a clock one guard ahead removes (`removal_ceiling`), so a caller whose clock reading went stale before
its write landed cannot miss slots removed meanwhile. A failed condition returns the item
(`ReturnValuesOnConditionCheckFailure`), so the caller decides again without another read. The last
item seen is kept per process only as a hint: when it says the request fits, the first attempt is the
write alone (one call); otherwise, or after a wait, the caller reads first (a consistent GetItem, then
the UpdateItem). `reconcile` adds the
difference between the provider's reported usage and the estimate to the reservation's slot and the
totals with an atomic ADD (an exact estimate writes nothing); writes refresh `expires_at`, the
table's TTL attribute, so idle keys disappear.

Waiting. When the budget is spent the caller computes from the slots when enough of them leave the
window for its request to fit, and sleeps that long (capped, plus jitter so waiters aiming at the same
slot do not all arrive together) before deciding again: no polling. A provider 429 sets
`cooldown_until` to the later of the stored value and now + Retry-After; every caller waits it out.

Lanes. `realtime` may use the whole budget. `bulk` is granted only while the window's total (all lanes)
stays at or below `bulk_ceiling` x limit whenever users are active, and at or below `bulk_idle_ceiling`
x limit (0.98) when they are idle: that idle reserve is what the first arriving users are granted at
once, before bulk has backed off. Users are active while `realtime_until` lies ahead: a realtime grant
sets it to now + window, and a realtime caller that has to wait first writes its demand there. Bulk
conditions test it atomically, so from that write on, bulk callers in every process leave the room
above the ceiling, and the slots that leave the window go to the waiting realtime caller. Bulk can
also be paced (at most `bulk_pace` x the average rate over any eighth of a window), so that a backlog
does not take the whole window in one burst: the window then frees a little every few slots, and an
arriving user waits that long, not up to a window.

Tenants. With a tenant share configured, a grant must also fit the tenant's own item (`<key>#tenant#<id>`,
the same sliding window with `share` x limit as its caps). Both conditional updates go in one
TransactWriteItems, so either both budgets take the grant or neither does; one tenant's burst can spend
its share and no more. (Two calls per grant then: a consistent BatchGetItem and the transaction.)

DynamoDB failure. Errors that waiting cannot fix (AccessDenied, ResourceNotFound, ValidationException,
an unknown code) fail closed: `LedgerMisconfigured` (503) names the table and is logged as an error, in
every lane, so a broken deployment is loud, never a silent fallback. Transient failures (throttling,
5xx, timeouts, no endpoint) shed the caller by default: `LedgerUnavailable` (503 + Retry-After; the
worker's message is redelivered), and the provider is never called unmetered. So the sum of what every
process grants stays within the limit, whatever fails.
An operator who prefers serving some users during a DynamoDB outage sets `fallback_share` f and
`fallback_processes` P (the API function's reserved concurrency). Then DynamoDB only ever grants
(1 - f) x limit, and a realtime caller in an API process grants from memory at most f x limit / P per
window plus guard. Such grants are made only by a process older than one window plus guard, so every
fallback grant inside a window comes from processes that were all alive when it began: with Lambda
running at most P environments of the function at once, they add up to at most f x limit, and
DynamoDB's grants and the fallback's together stay within the limit.
Errors and fallback grants are counted as CloudWatch metrics (`LedgerErrors` by kind,
`LedgerFallbackGrants`), which the template alarms on. A failed `reconcile` or `report_throttle` is
logged and swallowed: the provider call already happened, and its 429 backstops any under-count.

Guard and estimates. Slot times come from each process's clock and a request reaches the provider some
time after its grant, so a slot keeps counting for `guard_seconds` after its window: the guard must
cover twice the clock skew between callers plus the spread of grant-to-arrival delays (per provider,
`ProviderSpec.guard_seconds`, 2 s for HTTP providers by default). The window counted is therefore
W + one slot + guard, and the provider's continuous window of W never sees more than the limit. The
guarantee holds for the tokens reserved: a caller whose estimate can undercount (the `estimate`
tokenizer) reserves the estimate times a margin (`ModelSpec.token_estimate_margin`), and reconcile
refunds what the provider did not count. One `LimitSpec` window per key; acquire right before the
call (a grant that waits long before its request leaves eats into the guard).

Budgets. A reservation may carry charges against a task's or a tenant's budget (services/budgets.py:
items in this table with a `remaining` counter). `acquire` grants the rate limit as above, then charges
each budget with one conditional UpdateItem whose condition is `remaining >= this charge` on the live
item; a refused charge undoes the grant (and any budget already charged) and raises BudgetExceeded, all
before the provider is called. Each budget's decision is thus a single atomic write: concurrent callers
in every process can never together pass a budget, and a grant is charged only once it is really made
(charging first would hold budget through a rate-limit wait and refuse others for room later given
back). The charges are deliberately not in one TransactWriteItems with the grant: that would put the
provider's item, the hottest in the table, into transactions, and DynamoDB rejects every plain
UpdateItem of an item while a transaction on it is in flight (TransactionConflictException), shedding
unbudgeted callers; it would also double the write units of that item and cost a read per grant. What
the split costs is a grant that may be made and given back (one more write), never an overspend.
`reconcile` corrects each charge by the provider's reported usage; a failed provider call refunds it. A
budget that DynamoDB cannot charge fails closed (503): the fallback limiter never serves budgeted work.
The per-process hint of each budget (from the last write) only decides whether to read before a wait:
a caller whose budget looks spent reads it (consistent) and is refused at once, before any rate-limit
wait, only if the read confirms it.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import BotoCoreError, ClientError

from embedsvc.errors import (
    BudgetExceeded,
    EmbedServiceError,
    InvalidRequest,
    LedgerMisconfigured,
    LedgerUnavailable,
    ServiceOverloaded,
)
from embedsvc.services.budgets import (
    BUDGET_REFUSED_METRIC,
    BudgetCharge,
    BudgetState,
    adjust_update,
    charge_update,
    ledger_error,
    month_of,
    refusal,
    refused_update,
    rollover_update,
)

logger = Logger(child=True)

# A slot keeps counting this long after the window has passed it: the spread, between two requests, of the
# delay from the grant's clock reading to the provider's (the write's round trip, the send, the network).
DEFAULT_GUARD_SECONDS = 0.1
# Bulk may use this share of a limit while users are idle: the rest is the room the first users to arrive
# are granted at once, while bulk callers in every process learn they are active and back off to
# `bulk_ceiling`. With the whole budget, those first users waited for bulk's slots to leave the window.
DEFAULT_BULK_IDLE_CEILING = 0.98
_COMPACT_AT_STALE_SLOTS = 8  # bounds the item's size when the budget is never tight enough to force it
_MAX_COMPACTED_SLOTS = 50  # keeps condition and update expressions well under DynamoDB's 4 KB
_MAX_SLEEP_SECONDS = 5.0
_EPSILON_SECONDS = 0.001  # wake just past a slot boundary, never just before it
_FALLBACK_RETRY_AFTER_SECONDS = 1.0
_CONFLICTS_BEFORE_BACKOFF = 10
# A slot's attribute holds tokens x base + requests (DynamoDB numbers are exact to 38 digits); a slot never
# holds a billion requests.
SLOT_REQUESTS_BASE = 1_000_000_000
# Ledger items are `<KEY_VERSION>#provider:model`: a change of the item's layout takes a new prefix, so code of
# two layouts never reads each other's items (the old ones expire by TTL).
KEY_VERSION = "v2"
# Pacing looks at the last 1/_PACE_SPAN_DIVISOR of a window.
_PACE_SPAN_DIVISOR = 8
_MAX_LEASE_REQUESTS = 16
_MAX_LEASE_SHARE = 0.02  # a lease never holds more than this share of a limit
# DynamoDB error codes that waiting can fix; any other error fails closed (LedgerMisconfigured).
_TRANSIENT_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "TransactionConflictException",
        "TransactionInProgressException",
        "ExpiredTokenException",
    }
)
# A cancelled transaction's per-item reasons that waiting can fix ("None": the item was fine).
_TRANSIENT_TRANSACTION_REASONS = frozenset(
    {
        "None",
        "TransactionConflict",
        "ThrottlingError",
        "ProvisionedThroughputExceeded",
        "RequestLimitExceeded",
    }
)
# CloudWatch metrics (EMF) the ledger emits; the template's alarms and dashboard name them.
LEDGER_ERRORS_METRIC = "LedgerErrors"
LEDGER_FALLBACK_METRIC = "LedgerFallbackGrants"
# The peak share (percent) of a limit's window in use, as this process's grants saw it (dimension `lane`),
# emitted at most once per _UTILIZATION_EMIT_SECONDS per lane: LedgerSaturatedAlarm watches the realtime one.
LEDGER_UTILIZATION_METRIC = "LedgerUtilization"
# Requests shed because the limit stayed spent longer than they could wait (429 / redelivery), by `lane`.
LEDGER_OVERLOADED_METRIC = "LedgerOverloaded"
# Provider 429s written to the ledger, by `limit` (provider:model).
PROVIDER_THROTTLES_METRIC = "ProviderThrottles"
_UTILIZATION_EMIT_SECONDS = 60.0
_BUDGET_WRITE_TRIES = 5


class Lane(StrEnum):
    REALTIME = "realtime"
    BULK = "bulk"


@dataclass(frozen=True)
class LimitSpec:
    key: str  # provider:model; one ledger item per key
    tpm: int  # tokens per window
    rpm: int  # requests per window
    window_seconds: float = 60.0
    guard_seconds: float | None = None  # the provider's guard; None: the ledger's default


@dataclass(frozen=True)
class Reservation:
    limit: LimitSpec
    tokens: int
    lane: Lane
    slot: int
    waited_seconds: float
    granted_at: float = 0.0
    fallback: bool = False  # granted by the in-process fallback limiter, not recorded in DynamoDB
    tenant_limit: LimitSpec | None = None  # the tenant's item the grant also went to
    leased: bool = False  # served from this process's lease (a grant made for several requests)
    charges: tuple[BudgetCharge, ...] = ()  # the budgets this reservation was charged to


@dataclass
class _Lease:
    """What is left of a realtime grant made for several requests, usable until `expires_at`."""

    slot: int
    expires_at: float
    tokens: int
    requests: int


@dataclass(frozen=True)
class LedgerState:
    """What one read of a key's item says."""

    slots: Mapping[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (tokens, requests)
    tokens_total: int = 0
    requests_total: int = 0
    cooldown_until: float = 0.0
    realtime_until: float = 0.0
    removed_below: int = 0  # every slot below this has been removed from the item (and the totals)
    exists: bool = False

    def slot_items(self) -> list[tuple[int, int, int]]:
        """(slot, tokens, requests), oldest first."""
        return sorted((slot, t, r) for slot, (t, r) in self.slots.items())

    def consistent(self) -> bool:
        """Whether the running totals equal the sum of the slots, as every write keeps them."""
        return (
            sum(t for t, _ in self.slots.values()) == self.tokens_total
            and sum(r for _, r in self.slots.values()) == self.requests_total
        )


@dataclass(frozen=True)
class Plan:
    """What a caller does next: wait, or write a grant (removing stale slots in the same write)."""

    wait: float
    compact: tuple[int, ...] = ()
    compact_only: bool = False  # the grant cannot fit in one write with the removals: remove first


def slot_seconds(limit: LimitSpec, slots_per_window: int) -> float:
    """How long one slot lasts."""
    return limit.window_seconds / slots_per_window


def slot_of(now: float, seconds_per_slot: float) -> int:
    """The absolute slot number `now` falls in."""
    return math.floor(now / seconds_per_slot)


def first_counted_slot(
    now: float, seconds_per_slot: float, slots_per_window: int, guard_seconds: float
) -> int:
    """The oldest slot a decision at `now` must count: the window, one extra slot, and the guard."""
    return slot_of(now - guard_seconds, seconds_per_slot) - slots_per_window


def removal_ceiling(now: float, seconds_per_slot: float, slots_per_window: int, guard_seconds: float) -> int:
    """The highest `removed_below` a decision at `now` accepts: what a clock one guard ahead removes.

    A caller whose clock runs ahead removes slots that a caller whose clock runs behind still counts.
    Those removals are safe: the guard covers twice the skew plus the delivery spread, so a slot's
    requests have left every provider window by the time any clock within the skew removes it, and a
    grant landing after the removal cannot share a window with them. Only a reading stale by more than
    the delivery spread (a process frozen between its clock reading and its write) sees removals beyond.
    """
    return first_counted_slot(now + guard_seconds, seconds_per_slot, slots_per_window, guard_seconds)


def item_key(limit_key: str) -> dict[str, dict[str, str]]:
    """The DynamoDB key of a limit's item."""
    return {"pk": {"S": f"{KEY_VERSION}#{limit_key}"}}


def pack_slot(tokens: int, requests: int) -> int:
    """One slot's counters as one number: a write then touches one attribute per slot, not two."""
    return tokens * SLOT_REQUESTS_BASE + requests


def unpack_slot(value: int) -> tuple[int, int]:
    """(tokens, requests) of a packed slot; requests are never negative, so the remainder is exact."""
    requests = value % SLOT_REQUESTS_BASE
    return (value - requests) // SLOT_REQUESTS_BASE, requests


def _slots_of(item: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    return {
        int(name[2:]): unpack_slot(int(value["N"]))
        for name, value in item.items()
        if name.startswith("s_") and name[2:].lstrip("-").isdigit()
    }


def parse_item(item: Mapping[str, Any] | None) -> LedgerState:
    """A ledger item in DynamoDB's wire format, as a LedgerState."""
    if not item:
        return LedgerState()

    def number(name: str) -> float:
        return float(item[name]["N"]) if name in item else 0.0

    return LedgerState(
        slots=_slots_of(item),
        tokens_total=int(number("tokens_total")),
        requests_total=int(number("requests_total")),
        cooldown_until=number("cooldown_until"),
        realtime_until=number("realtime_until"),
        removed_below=int(number("removed_below")),
        exists=True,
    )


def merge_update(known: LedgerState, attributes: Mapping[str, Any], removed: tuple[int, ...]) -> LedgerState:
    """`known` after a write that returned `attributes` (UPDATED_NEW) and removed the `removed` slots."""
    slots = {slot: counts for slot, counts in known.slots.items() if slot not in removed}
    slots.update(_slots_of(attributes))

    def number(name: str, default: float) -> float:
        return float(attributes[name]["N"]) if name in attributes else default

    return LedgerState(
        slots=slots,
        tokens_total=int(number("tokens_total", known.tokens_total)),
        requests_total=int(number("requests_total", known.requests_total)),
        cooldown_until=number("cooldown_until", known.cooldown_until),
        realtime_until=number("realtime_until", known.realtime_until),
        removed_below=int(number("removed_below", known.removed_below)),
        exists=True,
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
    requests: int = 1,
) -> float:
    """Seconds until `tokens` and `requests` fit under the caps: 0 if they fit now, inf if never."""
    if tokens > token_cap or request_cap < requests:
        return math.inf
    oldest_counted = first_counted_slot(now, seconds_per_slot, slots_per_window, guard_seconds)
    counted = [(slot, max(t, 0), max(r, 0)) for slot, t, r in slots if slot >= oldest_counted]
    used_tokens = sum(t for _, t, _ in counted)
    used_requests = sum(r for _, _, r in counted)
    if used_tokens + tokens <= token_cap and used_requests + requests <= request_cap:
        return 0.0
    for slot, t, r in counted:
        used_tokens -= t
        used_requests -= r
        if used_tokens + tokens <= token_cap and used_requests + requests <= request_cap:
            leaves_at = (slot + slots_per_window + 1) * seconds_per_slot + guard_seconds
            return max(leaves_at - now, 0.0) + _EPSILON_SECONDS
    return math.inf


def lane_caps(
    limit: LimitSpec, lane: Lane, users_active: bool, bulk_ceiling: float, bulk_idle_ceiling: float = 1.0
) -> tuple[int, int]:
    """The token and request caps a caller in `lane` is held to, with users active or idle."""
    if lane is Lane.BULK:
        share = bulk_ceiling if users_active else bulk_idle_ceiling
        return math.floor(share * limit.tpm), math.floor(share * limit.rpm)
    return limit.tpm, limit.rpm


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
    requests: int = 1,
    bulk_pace: float | None = None,
    bulk_idle_ceiling: float = 1.0,
) -> float:
    """Seconds this caller must wait before its grant (0: grant now), from one read of the item."""
    seconds_per_slot = slot_seconds(limit, slots_per_window)
    slots = state.slot_items()

    def wait_under(token_cap: int, request_cap: int) -> float:
        return wait_until_fits(
            slots,
            now=now,
            seconds_per_slot=seconds_per_slot,
            slots_per_window=slots_per_window,
            guard_seconds=guard_seconds,
            tokens=tokens,
            token_cap=token_cap,
            request_cap=request_cap,
            requests=requests,
        )

    # Bulk never takes the idle reserve (1 - bulk_idle_ceiling), users active or not.
    wait = wait_under(*lane_caps(limit, lane, False, bulk_ceiling, bulk_idle_ceiling))
    # Slots were removed beyond what any clock within the skew removes: this reading is stale; wait until
    # the removals lie under this caller's ceiling too (the write's condition refuses it until then).
    if removal_ceiling(now, seconds_per_slot, slots_per_window, guard_seconds) < state.removed_below:
        accepted_at = (state.removed_below + slots_per_window) * seconds_per_slot
        wait = max(wait, accepted_at - now + _EPSILON_SECONDS)
    if lane is Lane.BULK and state.realtime_until > now:
        # Users are active: bulk fits under the ceiling, or waits for users to go idle (whichever is first).
        ceiling = wait_under(*lane_caps(limit, lane, True, bulk_ceiling, bulk_idle_ceiling))
        wait = min(ceiling, max(wait, state.realtime_until - now))
    if lane is Lane.BULK and bulk_pace:
        wait = max(
            wait, pace_wait(slots, limit, tokens, now, slots_per_window=slots_per_window, pace=bulk_pace)
        )
    return max(wait, state.cooldown_until - now, 0.0)


def pace_wait(
    slots: list[tuple[int, int, int]],
    limit: LimitSpec,
    tokens: int,
    now: float,
    *,
    slots_per_window: int,
    pace: float,
) -> float:
    """Seconds until bulk may take `tokens` without going faster than `pace` x the limit's average rate.

    Without pacing, a bulk backlog takes a whole window's budget in one burst, and the window then frees
    in bursts a window apart: a user arriving between two bursts waits up to a window for room. Paced,
    bulk's grants spread over the window, and room frees every few slots. Pacing protects latency, not the
    limit, so it is decided here, from the read item, and not in the write's condition.
    """
    seconds_per_slot = slot_seconds(limit, slots_per_window)
    span = max(1, slots_per_window // _PACE_SPAN_DIVISOR)  # the recent slots the pace looks at
    cap = pace * limit.tpm * span / slots_per_window
    current = slot_of(now, seconds_per_slot)
    recent = [(slot, t) for slot, t, _ in slots if slot > current - span and t > 0]
    used = sum(t for _, t in recent)
    if used + tokens <= cap or not recent:
        return 0.0  # a request larger than the pace's room goes alone
    for slot, t in sorted(recent):
        used -= t
        if used + tokens <= cap:
            return (slot + span) * seconds_per_slot - now + _EPSILON_SECONDS
    return (current + 1) * seconds_per_slot - now + _EPSILON_SECONDS


def plan_grant(
    state: LedgerState,
    limit: LimitSpec,
    tokens: int,
    lane: Lane,
    now: float,
    *,
    slots_per_window: int,
    bulk_ceiling: float,
    guard_seconds: float = 0.0,
    requests: int = 1,
    bulk_pace: float | None = None,
    bulk_idle_ceiling: float = 1.0,
) -> Plan:
    """Wait, or grant now; and which stale slots the grant's write removes."""
    wait = plan_wait(
        state,
        limit,
        tokens,
        lane,
        now,
        slots_per_window=slots_per_window,
        bulk_ceiling=bulk_ceiling,
        guard_seconds=guard_seconds,
        requests=requests,
        bulk_pace=bulk_pace,
        bulk_idle_ceiling=bulk_idle_ceiling,
    )
    if wait > 0:
        return Plan(wait)
    users_active = state.realtime_until > now
    token_cap, request_cap = lane_caps(limit, lane, users_active, bulk_ceiling, bulk_idle_ceiling)
    oldest = first_counted_slot(now, slot_seconds(limit, slots_per_window), slots_per_window, guard_seconds)
    stale = [slot for slot in sorted(state.slots) if slot < oldest]

    def fits(removed: tuple[int, ...]) -> bool:
        freed_tokens = sum(state.slots[s][0] for s in removed)
        freed_requests = sum(state.slots[s][1] for s in removed)
        return (
            state.tokens_total - freed_tokens + tokens <= token_cap
            and state.requests_total - freed_requests + requests <= request_cap
        )

    if fits(()) and len(stale) < _COMPACT_AT_STALE_SLOTS:
        return Plan(0.0)
    removed = tuple(stale[:_MAX_COMPACTED_SLOTS])
    return Plan(0.0, removed, compact_only=not fits(removed))


class _LedgerDown(Exception):
    """DynamoDB did not answer usefully; carries the original error and whether waiting can help."""

    def __init__(self, cause: Exception, *, transient: bool, code: str = ""):
        super().__init__(repr(cause))
        self.cause = cause
        self.transient = transient
        self.code = code


class _LocalWindow:
    """This process's sliding window, used only while DynamoDB is unreachable."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int, int]] = deque()  # (at, tokens, requests)

    def wait(self, now: float, window: float, tokens: int, token_cap: float, request_cap: float) -> float:
        while self.events and self.events[0][0] <= now - window:
            self.events.popleft()
        if tokens > token_cap or request_cap < 1:
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


@dataclass(frozen=True)
class _Budget:
    """One ledger item a grant must fit in: the provider's own, or one tenant's share of it."""

    limit: LimitSpec
    shared: bool  # the provider's item: lanes, cooldowns and realtime demand live there


def _n(value: float) -> dict[str, str]:
    return {"N": str(value) if isinstance(value, int) else repr(float(value))}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class RateLimitLedger:
    """Reserve provider budget in DynamoDB before each call; reconcile after; share 429 cooldowns."""

    def __init__(
        self,
        table_name: str,
        client=None,
        *,
        bulk_ceiling: float = 0.8,
        bulk_idle_ceiling: float = DEFAULT_BULK_IDLE_CEILING,
        slots_per_window: int = 60,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        fallback_share: float = 0.0,
        fallback_processes: int = 0,
        guard_seconds: float = DEFAULT_GUARD_SECONDS,
        metrics: Any = None,
        lease_seconds: float = 0.0,
        bulk_pace: float | None = None,
        budgets: Any = None,
    ):
        if not 0 < bulk_ceiling <= 1:
            raise ValueError("bulk_ceiling must be in (0, 1]")
        if not bulk_ceiling <= bulk_idle_ceiling <= 1:
            raise ValueError("bulk_idle_ceiling must be in [bulk_ceiling, 1]")
        if slots_per_window < 1:
            raise ValueError("slots_per_window must be at least 1")
        if not 0 <= fallback_share < 1 or fallback_processes < 0:
            raise ValueError("fallback_share must be in [0, 1) and fallback_processes >= 0")
        self.table_name = table_name
        self._client = client
        self.bulk_ceiling = bulk_ceiling
        self.bulk_idle_ceiling = bulk_idle_ceiling
        self.slots_per_window = slots_per_window
        self.clock = clock
        self.sleep = sleep
        self.fallback_share = fallback_share
        self.fallback_processes = fallback_processes
        self.guard_seconds = guard_seconds
        self.metrics = metrics  # an OpsMetrics (EMF) for errors and fallback grants, or None
        self.lease_seconds = lease_seconds  # 0: every realtime request is its own grant
        self.bulk_pace = bulk_pace  # None: bulk may take the whole window at once while users are idle
        # The BudgetStore whose budgets callers may charge (the router asks it which exist), or None.
        self.budgets = budgets
        self._budget_hints: dict[str, BudgetState] = {}
        self._utilization: dict[Lane, tuple[float, float]] = {}  # lane -> (peak share, last emitted at)
        self._leases: dict[str, _Lease] = {}
        self._recent: dict[str, deque[float]] = {}
        self.started_at = clock()
        self._lock = threading.Lock()
        self._random = random.Random()
        self._hints: dict[str, LedgerState] = {}
        self._local: dict[str, _LocalWindow] = {}
        self._local_cooldowns: dict[str, float] = {}
        self._stats: dict[str, float] = dict.fromkeys(
            (
                "dynamodb_calls",
                "dynamodb_seconds",
                "get_item_calls",
                "update_item_calls",
                "batch_get_item_calls",
                "transact_write_items_calls",
                "grants",
                "conflicts",
                "waits",
                "wait_seconds",
                "demand_marks",
                "compactions",
                "repairs",
                "reconcile_writes",
                "throttles_reported",
                "overloaded",
                "ledger_errors",
                "misconfigured",
                "shed",
                "fallback_grants",
                "leases",
                "lease_grants",
                "budget_writes",
                "budget_reads",
                "budget_refused",
                "budget_released_grants",
            ),
            0,
        )

    @property
    def client(self):
        """The boto3 DynamoDB client, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from embedsvc.adapters.aws import client

                    # Short timeouts and few retries: a caller would rather be shed than hang.
                    self._client = client("dynamodb", fast=True)
        return self._client

    def stats(self) -> dict:
        """Counters for benchmarks: DynamoDB calls, grants, conditional-write conflicts, waits, fallbacks."""
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._stats[name] += amount

    def _emit(self, name: str, value: float = 1, **dimensions: str) -> None:
        if self.metrics is not None:
            self.metrics.count(name, value, **dimensions)

    def guard_for(self, limit: LimitSpec) -> float:
        """The guard this limit's decisions use: the provider's own, else the ledger's default."""
        return self.guard_seconds if limit.guard_seconds is None else limit.guard_seconds

    def budgeted(self, limit: LimitSpec) -> LimitSpec:
        """What DynamoDB may grant of `limit`: all of it, or all but the share kept for in-memory fallback."""
        if not self.fallback_share:
            return limit
        keep = 1.0 - self.fallback_share
        return replace(limit, tpm=math.floor(keep * limit.tpm), rpm=math.floor(keep * limit.rpm))

    @staticmethod
    def tenant_limit(limit: LimitSpec, tenant: str, share: float) -> LimitSpec:
        """A tenant's share of a (budgeted) limit, kept in its own item."""
        return replace(
            limit,
            key=f"{limit.key}#tenant#{tenant}",
            tpm=max(1, math.floor(share * limit.tpm)),
            rpm=max(1, math.floor(share * limit.rpm)),
        )

    def _call(self, operation: str, *, table: bool = True, **kwargs) -> dict:
        self._count("dynamodb_calls")
        self._count(f"{operation}_calls")
        if table:
            kwargs["TableName"] = self.table_name
        started = time.perf_counter()
        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as exc:
            code = _error_code(exc)
            if code in ("ConditionalCheckFailedException", "TransactionCanceledException"):
                raise
            self._count("ledger_errors")
            transient = code in _TRANSIENT_CODES
            self._emit(LEDGER_ERRORS_METRIC, kind="transient" if transient else "misconfigured")
            raise _LedgerDown(exc, transient=transient, code=code) from exc
        except BotoCoreError as exc:  # no endpoint, timeouts, connection resets: the network, not us
            self._count("ledger_errors")
            self._emit(LEDGER_ERRORS_METRIC, kind="transient")
            raise _LedgerDown(exc, transient=True) from exc
        finally:
            self._count("dynamodb_seconds", time.perf_counter() - started)

    def _update(
        self, key: str, *, known: LedgerState | None = None, removed: tuple[int, ...] = (), **kwargs
    ) -> tuple[LedgerState | None, bool]:
        """A conditional UpdateItem: (the item after it, True), or (the item that failed it, False).

        With `known` (the item as this caller last saw it) the write returns only what it changed, and the
        item after it is `known` with those changes and the `removed` slots dropped: a hint, possibly
        missing other callers' slots, which is all a hint needs to be (every grant's condition checks the
        live item). Returning the whole item every time would send ~2 attributes per slot on every grant.
        """
        try:
            response = self._call(
                "update_item",
                Key=item_key(key),
                ReturnValues="ALL_NEW" if known is None else "UPDATED_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **kwargs,
            )
        except ClientError as exc:
            item = exc.response.get("Item")
            state = parse_item(item) if item else None
            self._remember(key, state)
            return state, False
        attributes = response.get("Attributes") or {}
        state = parse_item(attributes) if known is None else merge_update(known, attributes, removed)
        self._remember(key, state)
        return state, True

    def _read(self, keys: list[str]) -> list[LedgerState]:
        """Consistent reads of the items: one GetItem, or one BatchGetItem for a grant with a tenant item."""
        if len(keys) == 1:
            response = self._call("get_item", Key=item_key(keys[0]), ConsistentRead=True)
            states = {keys[0]: parse_item(response.get("Item"))}
        else:
            found: dict[str, Any] = {}
            request: dict = {self.table_name: {"Keys": [item_key(k) for k in keys], "ConsistentRead": True}}
            for _ in range(3):
                response = self._call("batch_get_item", table=False, RequestItems=request)
                for item in response.get("Responses", {}).get(self.table_name, []):
                    found[item["pk"]["S"].removeprefix(f"{KEY_VERSION}#")] = item
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
            else:
                raise _LedgerDown(RuntimeError("BatchGetItem left keys unprocessed"), transient=True)
            states = {key: parse_item(found.get(key)) for key in keys}
        for key, state in states.items():
            self._remember(key, state)
        return [states[key] for key in keys]

    def _remember(self, key: str, state: LedgerState | None) -> None:
        with self._lock:
            if state is None:
                self._hints.pop(key, None)
                return
            self._hints[key] = state
            if state.cooldown_until > self._local_cooldowns.get(key, 0.0):
                self._local_cooldowns[key] = state.cooldown_until

    def _expires_at(self, limit: LimitSpec, *times: float) -> dict[str, str]:
        return _n(math.ceil(max(times) + 2 * limit.window_seconds + self.guard_for(limit)))

    def _grant_update(
        self,
        budget: _Budget,
        state: LedgerState,
        plan: Plan,
        tokens: int,
        lane: Lane,
        now: float,
        slot: int,
        requests: int = 1,
    ) -> dict[str, Any]:
        """The UpdateItem arguments of a grant (and any removals); the condition is the budget check."""
        limit = budget.limit
        names = {"#tt": "tokens_total", "#tr": "requests_total", "#exp": "expires_at"}
        values: dict[str, dict[str, str]] = {}
        conditions: list[str] = []
        sets = ["#exp = :exp"]
        freed_tokens = sum(state.slots[s][0] for s in plan.compact)
        freed_requests = sum(state.slots[s][1] for s in plan.compact)
        granted_tokens, granted_requests = (0, 0) if plan.compact_only else (tokens, requests)
        seconds_per_slot = slot_seconds(limit, self.slots_per_window)
        adds = ["#tt :dt", "#tr :dr"]
        values[":dt"] = _n(granted_tokens - freed_tokens)
        values[":dr"] = _n(granted_requests - freed_requests)
        realtime_until = state.realtime_until
        if not plan.compact_only:
            adds.append(f"s_{slot} :packed")
            values[":packed"] = _n(pack_slot(tokens, requests))
            # Bulk leaves the idle reserve free on the provider's item; a tenant's item has no reserve.
            item_lane = lane if budget.shared else Lane.REALTIME
            max_t, max_r = lane_caps(limit, item_lane, False, self.bulk_ceiling, self.bulk_idle_ceiling)
            values[":max_t"] = _n(max_t - tokens + freed_tokens)
            values[":max_r"] = _n(max_r - requests + freed_requests)
            conditions.append("(attribute_not_exists(#tt) OR (#tt <= :max_t AND #tr <= :max_r))")
            # No slot was removed beyond what a clock one guard ahead removes: a caller whose clock reading
            # went stale, beyond what the guard covers, before its write landed cannot miss removed slots.
            names["#rb"] = "removed_below"
            values[":removable"] = _n(
                removal_ceiling(now, seconds_per_slot, self.slots_per_window, self.guard_for(limit))
            )
            conditions.append("(attribute_not_exists(#rb) OR #rb <= :removable)")
            if budget.shared:
                names["#cd"] = "cooldown_until"
                names["#rt"] = "realtime_until"
                values[":now"] = _n(now)
                conditions.append("(attribute_not_exists(#cd) OR #cd <= :now)")
                if lane is Lane.BULK:
                    bmax_t, bmax_r = lane_caps(limit, lane, True, self.bulk_ceiling)
                    values[":bmax_t"] = _n(bmax_t - tokens + freed_tokens)
                    values[":bmax_r"] = _n(bmax_r - requests + freed_requests)
                    conditions.append(
                        "(attribute_not_exists(#rt) OR #rt <= :now OR attribute_not_exists(#tt)"
                        " OR (#tt <= :bmax_t AND #tr <= :bmax_r))"
                    )
                else:
                    realtime_until = max(realtime_until, now + limit.window_seconds)
                    values[":rt"] = _n(realtime_until)
                    sets.append("#rt = :rt")
        for index, stale in enumerate(plan.compact):
            # Subtract exactly what is removed: the slot must still hold what was read.
            values[f":st{index}"] = _n(pack_slot(*state.slots[stale]))
            conditions.append(f"s_{stale} = :st{index}")
        values[":exp"] = self._expires_at(limit, now, state.cooldown_until, realtime_until)
        if plan.compact:
            names["#rb"] = "removed_below"
            values[":rb"] = _n(max(state.removed_below, max(plan.compact) + 1))
            sets.append("#rb = :rb")
            conditions.append("(attribute_not_exists(#rb) OR #rb <= :rb)")
        expression = f"SET {', '.join(sets)} ADD {', '.join(adds)}"
        if plan.compact:
            self._count("compactions")
            expression += " REMOVE " + ", ".join(f"s_{stale}" for stale in plan.compact)
        kwargs: dict[str, Any] = {
            "UpdateExpression": expression,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }
        if conditions:
            kwargs["ConditionExpression"] = " AND ".join(conditions)
        return kwargs

    def _write_grants(
        self,
        budgets: list[_Budget],
        states: list[LedgerState],
        plans: list[Plan],
        tokens: int,
        lane: Lane,
        now: float,
        slot: int,
        requests: int = 1,
    ) -> tuple[list[LedgerState | None], bool]:
        """One conditional write over every item the grant must fit: an UpdateItem, or a transaction."""
        updates = [
            self._grant_update(budget, state, plan, tokens, lane, now, slot, requests)
            for budget, state, plan in zip(budgets, states, plans, strict=True)
        ]
        if len(budgets) == 1:
            state, written = self._update(
                budgets[0].limit.key, known=states[0], removed=plans[0].compact, **updates[0]
            )
            return [state], written
        items = [
            {
                "Update": {
                    "TableName": self.table_name,
                    "Key": item_key(budget.limit.key),
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                    **update,
                }
            }
            for budget, update in zip(budgets, updates, strict=True)
        ]
        try:
            self._call("transact_write_items", table=False, TransactItems=items)
        except ClientError as exc:
            reasons = [str(r.get("Code", "None")) for r in exc.response.get("CancellationReasons", [])]
            if "ConditionalCheckFailed" in reasons:
                # The reasons carry the items that failed; the others were not read: read them all again.
                for budget in budgets:
                    self._remember(budget.limit.key, None)
                return [None] * len(budgets), False
            transient = all(code in _TRANSIENT_TRANSACTION_REASONS for code in reasons)
            self._count("ledger_errors")
            self._emit(LEDGER_ERRORS_METRIC, kind="transient" if transient else "misconfigured")
            raise _LedgerDown(exc, transient=transient, code=",".join(reasons)) from exc
        # A transaction returns no items: the next grant reads them (two calls per grant with tenant shares).
        for budget in budgets:
            self._remember(budget.limit.key, None)
        return [None] * len(budgets), True

    def _repair(self, limit: LimitSpec, state: LedgerState) -> LedgerState | None:
        """Set the totals back to the sum of the slots (no write of this module breaks that; a hand edit might)."""
        logger.warning("ledger totals disagree with their slots; repairing", extra={"limit_key": limit.key})
        self._count("repairs")
        new, _ = self._update(
            limit.key,
            UpdateExpression="SET #tt = :st, #tr = :sr",
            ConditionExpression="(attribute_not_exists(#tt) OR #tt = :ot) AND (attribute_not_exists(#tr) OR #tr = :or)",
            ExpressionAttributeNames={"#tt": "tokens_total", "#tr": "requests_total"},
            ExpressionAttributeValues={
                ":st": _n(sum(t for t, _ in state.slots.values())),
                ":sr": _n(sum(r for _, r in state.slots.values())),
                ":ot": _n(state.tokens_total),
                ":or": _n(state.requests_total),
            },
        )
        return new

    def _mark_demand(self, limit: LimitSpec, state: LedgerState, until: float, now: float) -> None:
        """Tell bulk callers everywhere that a realtime caller is waiting, until `until`."""
        if state.realtime_until >= until:
            return
        self._count("demand_marks")
        self._update(
            limit.key,
            UpdateExpression="SET #rt = :rt, #exp = :exp",
            ConditionExpression="attribute_not_exists(#rt) OR #rt < :rt",
            ExpressionAttributeNames={"#rt": "realtime_until", "#exp": "expires_at"},
            ExpressionAttributeValues={
                ":rt": _n(until),
                ":exp": self._expires_at(limit, now, state.cooldown_until, until),
            },
        )

    def _validate(self, limit: LimitSpec, tokens: int) -> None:
        if tokens < 0:
            raise InvalidRequest(f"a reservation needs a non-negative token count, got {tokens}")
        if tokens > limit.tpm or limit.rpm < 1:
            raise InvalidRequest(
                f"a request of {tokens} tokens can never fit the budget of {limit.key} "
                f"({limit.tpm} tokens, {limit.rpm} requests per {limit.window_seconds:g}s); split it"
            )

    def _jitter(self, limit: LimitSpec) -> float:
        # Spread waiters that target the same boundary, so most find the slot taken by a read, not a failed write.
        return self._random.uniform(0, min(0.5 * slot_seconds(limit, self.slots_per_window), 0.1))

    def acquire(
        self,
        limit: LimitSpec,
        tokens: int,
        lane: Lane,
        *,
        max_wait_seconds: float,
        tenant: str | None = None,
        tenant_share: float | None = None,
        charges: Sequence[BudgetCharge] = (),
    ) -> Reservation:
        """Block until `tokens` and one request are reserved; ServiceOverloaded if that takes too long.

        With `tenant` and `tenant_share`, the grant must also fit that tenant's share of the limit, in the
        same atomic write (a transaction over the provider's item and the tenant's). With `charges`, each
        budget is charged after the grant, each in one conditional write; BudgetExceeded (nothing granted
        or charged) when one would be passed.
        """
        # A spent budget is refused before any rate-limit wait.
        pending = self._precheck_budgets(charges) if charges else None
        reservation = self._grant(
            limit, tokens, lane, max_wait_seconds=max_wait_seconds, tenant=tenant, tenant_share=tenant_share
        )
        if pending is None:
            return reservation
        try:
            charged = self._charge_budgets(pending)
        except BaseException:
            self._release_grant(reservation)
            raise
        return replace(reservation, charges=charged)

    def _grant(
        self,
        limit: LimitSpec,
        tokens: int,
        lane: Lane,
        *,
        max_wait_seconds: float,
        tenant: str | None = None,
        tenant_share: float | None = None,
    ) -> Reservation:
        """The rate-limit grant itself (see the module's docstring): every item it must fit, one atomic write."""
        lane = Lane(lane)
        provider_limit = limit
        limit = self.budgeted(limit)
        self._validate(limit, tokens)
        budgets = [_Budget(limit, shared=True)]
        if tenant is not None and tenant_share is not None:
            budgets.append(_Budget(self.tenant_limit(limit, tenant, tenant_share), shared=False))
            self._validate(budgets[1].limit, tokens)
        start = self.clock()
        leasing = lane is Lane.REALTIME and len(budgets) == 1 and self.lease_seconds_for(limit) > 0
        if leasing:
            self._note_request(limit, start)
            leased = self._from_lease(provider_limit, tokens, start)
            if leased is not None:
                return leased
        # A busy realtime caller reserves for the requests it expects in the next lease period at once;
        # `want` falls back to this request alone whenever the larger grant would have to wait.
        want_tokens, want_requests = self._lease_size(limit, tokens, start) if leasing else (tokens, 1)
        states: list[LedgerState | None] = [self._hints.get(b.limit.key) for b in budgets]
        fresh = False  # a hint may be stale: it can start a write, never a wait
        conflicts = lost = 0
        woke_to_fit = False  # the last sleep lasted until the request should have fitted
        while True:
            now = self.clock()
            try:
                if any(state is None for state in states):
                    read = self._read([b.limit.key for b in budgets])
                    states, fresh = list(read), True
                    broken = next((i for i, s in enumerate(read) if not s.consistent()), None)
                    if broken is not None:
                        self._repair(budgets[broken].limit, read[broken])
                        states = [None] * len(budgets)
                        continue
                known = [s for s in states if s is not None]
                plans = [
                    plan_grant(
                        state,
                        budget.limit,
                        want_tokens,
                        lane if budget.shared else Lane.REALTIME,
                        now,
                        slots_per_window=self.slots_per_window,
                        bulk_ceiling=self.bulk_ceiling,
                        guard_seconds=self.guard_for(budget.limit),
                        requests=want_requests,
                        bulk_pace=self.bulk_pace if budget.shared else None,
                        bulk_idle_ceiling=self.bulk_idle_ceiling,
                    )
                    for budget, state in zip(budgets, known, strict=True)
                ]
                wait = max(plan.wait for plan in plans)
                self._note_utilization(lane, limit, known[0], want_tokens, want_requests, now)
                if wait > 0 and want_requests > 1:
                    want_tokens, want_requests = tokens, 1  # no lease when budget is short: just this request
                    continue
                if wait == 0:
                    slot = slot_of(now, slot_seconds(limit, self.slots_per_window))
                    stuck = next((i for i, p in enumerate(plans) if p.compact_only and not p.compact), None)
                    if stuck is not None:
                        # Totals that no removal can bring under the cap while the slots say it fits.
                        if fresh:
                            self._repair(budgets[stuck].limit, known[stuck])
                        states = [None] * len(budgets)
                        continue
                    compacting = next((i for i, p in enumerate(plans) if p.compact_only), None)
                    if compacting is not None:
                        # The grant cannot fit in one write with the removals: remove first, on that item alone.
                        update = self._grant_update(
                            budgets[compacting], known[compacting], plans[compacting], 0, lane, now, slot, 0
                        )
                        new_state, _ = self._update(
                            budgets[compacting].limit.key,
                            known=known[compacting],
                            removed=plans[compacting].compact,
                            **update,
                        )
                        states = list(known)
                        states[compacting] = new_state
                        fresh = new_state is not None
                        continue
                    new_states, written = self._write_grants(
                        budgets, known, plans, want_tokens, lane, now, slot, want_requests
                    )
                    if written:
                        self._count("grants")
                        if want_requests > 1:
                            self._open_lease(
                                provider_limit, slot, now, want_tokens - tokens, want_requests - 1
                            )
                        return Reservation(
                            provider_limit,
                            tokens,
                            lane,
                            slot,
                            now - start,
                            granted_at=now,
                            tenant_limit=budgets[1].limit if len(budgets) > 1 else None,
                        )
                    # The failed condition handed back the item as it is now: decide again on it.
                    self._count("conflicts")
                    conflicts += 1
                    if conflicts % _CONFLICTS_BEFORE_BACKOFF == 0:
                        self.sleep(self._jitter(limit))
                    states = new_states
                    fresh = all(s is not None for s in new_states)
                    continue
                if not fresh:
                    states = [None] * len(budgets)
                    continue
                elapsed = now - start
                if elapsed + wait > max_wait_seconds:
                    if lane is Lane.REALTIME and math.isfinite(plans[0].wait) and plans[0].wait > 0:
                        self._mark_demand(
                            limit, known[0], now + min(plans[0].wait, limit.window_seconds), now
                        )
                    self._count("overloaded")
                    self._emit(LEDGER_OVERLOADED_METRIC, lane=lane.value)
                    binding = budgets[max(range(len(plans)), key=lambda i: plans[i].wait)].limit
                    whose = "this tenant's share of " if binding is not limit else ""
                    raise ServiceOverloaded(
                        f"{whose}the rate limit of {limit.key} is spent for {wait:.2f}s, longer than the "
                        f"{max_wait_seconds:g}s this caller may wait",
                        retry_after=wait if math.isfinite(wait) else limit.window_seconds,
                    )
                pause = min(wait, _MAX_SLEEP_SECONDS, limit.window_seconds / 4) + self._jitter(limit)
                if woke_to_fit:
                    lost += 1  # it slept until the request would fit, and the room went to someone else
                if lane is Lane.BULK and lost:
                    # Bulk waiters aiming at the same freed slot wake together and all but one lose it: each
                    # loss spreads this caller's next wake-up a little more, so a herd of workers costs a
                    # few DynamoDB calls per grant instead of one per worker.
                    seconds_per_slot = slot_seconds(limit, self.slots_per_window)
                    pause += self._random.uniform(0, min(lost * seconds_per_slot, limit.window_seconds / 8))
                woke_to_fit = pause >= wait
                if lane is Lane.REALTIME and plans[0].wait > 0:
                    margin = max(2 * slot_seconds(limit, self.slots_per_window), 0.2)
                    self._mark_demand(limit, known[0], now + pause + margin, now)
            except _LedgerDown as exc:
                return self._when_ledger_down(provider_limit, tokens, lane, start, max_wait_seconds, exc)
            self._count("waits")
            self._count("wait_seconds", pause)
            self.sleep(pause)
            states = [None] * len(budgets)

    def lease_seconds_for(self, limit: LimitSpec) -> float:
        """How long a lease of this limit may serve requests: at most a quarter of the guard, which covers it."""
        return min(self.lease_seconds, self.guard_for(limit) / 4)

    def _lease_size(self, limit: LimitSpec, tokens: int, now: float) -> tuple[int, int]:
        """(tokens, requests) to reserve: this request, times the requests expected in one lease period.

        Expected from this process's own realtime requests in the last few lease periods, so an idle or
        slow caller reserves exactly what it asks (1 request), and a busy one a few requests' worth.
        """
        period = self.lease_seconds_for(limit)
        with self._lock:
            recent = self._recent.get(limit.key, ())
            expected = math.ceil(sum(1 for at in recent if at > now - 4 * period) / 4)  # per period, of 4
        requests = max(1, min(expected, _MAX_LEASE_REQUESTS, math.floor(_MAX_LEASE_SHARE * limit.rpm)))
        if requests == 1:
            return tokens, 1
        lease_tokens = min(tokens * requests, max(tokens, math.floor(_MAX_LEASE_SHARE * limit.tpm)))
        return lease_tokens, requests

    def _note_request(self, limit: LimitSpec, now: float) -> None:
        """Remember a realtime request's time: the lease size follows this process's request rate."""
        horizon = 4 * self.lease_seconds_for(limit)
        with self._lock:
            recent = self._recent.setdefault(limit.key, deque())
            recent.append(now)
            while recent and recent[0] <= now - horizon:
                recent.popleft()

    def _open_lease(self, limit: LimitSpec, slot: int, now: float, tokens: int, requests: int) -> None:
        period = self.lease_seconds_for(self.budgeted(limit))
        with self._lock:
            self._leases[limit.key] = _Lease(slot, now + period, tokens, requests)
        self._count("leases")

    def _from_lease(self, limit: LimitSpec, tokens: int, now: float) -> Reservation | None:
        """This request from the process's open lease, if it is still valid and has room; else None.

        An expired lease's unused tokens and requests go back to the ledger (one write), so what a lease
        held but did not use is counted only until then.
        """
        with self._lock:
            lease = self._leases.get(limit.key)
            fits = lease is not None and lease.tokens >= tokens and lease.requests >= 1
            if lease is not None and fits and now < lease.expires_at:
                lease.tokens -= tokens
                lease.requests -= 1
                self._stats["grants"] += 1
                self._stats["lease_grants"] += 1
                return Reservation(limit, tokens, Lane.REALTIME, lease.slot, 0.0, granted_at=now, leased=True)
            if lease is None:
                return None
            del self._leases[limit.key]
        if lease.tokens or lease.requests:
            self._reconcile_item(self.budgeted(limit), lease.slot, -lease.tokens, -lease.requests)
        return None

    def _when_ledger_down(
        self,
        limit: LimitSpec,
        tokens: int,
        lane: Lane,
        start: float,
        max_wait_seconds: float,
        exc: _LedgerDown,
    ) -> Reservation:
        """Fail closed on a misconfiguration; on a transient failure shed, or grant from this process's share."""
        if not exc.transient:
            self._count("misconfigured")
            logger.error(
                "rate-limit ledger table refused the request; failing closed",
                extra={"table": self.table_name, "code": exc.code, "error": repr(exc.cause)},
            )
            raise LedgerMisconfigured(
                f"the rate-limit ledger table '{self.table_name}' refused the request ({exc.code or 'error'}): "
                "check that the table exists in this region and that this function may read and update it",
                retry_after=_FALLBACK_RETRY_AFTER_SECONDS,
            ) from exc
        if lane is Lane.REALTIME and self.fallback_processes > 0 and self.fallback_share > 0:
            return self._acquire_fallback(limit, tokens, start, max_wait_seconds, exc)
        self._count("shed")
        logger.warning(
            "rate-limit ledger unavailable; shedding the request rather than calling the provider unmetered",
            extra={"limit_key": limit.key, "lane": lane.value, "error": repr(exc.cause)},
        )
        raise LedgerUnavailable(
            f"the rate-limit ledger is unavailable ({exc.code or type(exc.cause).__name__}); retry shortly",
            retry_after=_FALLBACK_RETRY_AFTER_SECONDS,
        ) from exc

    def _acquire_fallback(
        self, limit: LimitSpec, tokens: int, start: float, max_wait_seconds: float, error: _LedgerDown
    ) -> Reservation:
        """Grant from this process's share of the kept-back fallback budget while DynamoDB is unreachable."""
        now = self.clock()
        window = limit.window_seconds + self.guard_for(limit)
        if now - self.started_at < window:
            # A process younger than a window might replace one that granted from memory in that window
            # (a recycled Lambda environment): only processes older than a window may grant, so that every
            # fallback grant in a window comes from processes alive at its start, at most `fallback_processes`.
            self._count("shed")
            raise LedgerUnavailable(
                "the rate-limit ledger is unavailable and this process is too new to grant from memory; "
                "retry shortly",
                retry_after=_FALLBACK_RETRY_AFTER_SECONDS,
            ) from error
        logger.warning(
            "rate-limit ledger unavailable; realtime caller uses the in-process fallback limiter",
            extra={"limit_key": limit.key, "error": repr(error.cause), "share": self.fallback_share},
        )
        token_cap = self.fallback_share * limit.tpm / self.fallback_processes
        request_cap = math.floor(self.fallback_share * limit.rpm / self.fallback_processes)
        while True:
            now = self.clock()
            with self._lock:
                local = self._local.setdefault(limit.key, _LocalWindow())
                wait = local.wait(now, window, tokens, token_cap, request_cap)
                wait = max(wait, self._local_cooldowns.get(limit.key, 0.0) - now)
                if wait == 0:
                    local.add(now, tokens, 1)
                    self._stats["fallback_grants"] += 1
                    self._stats["grants"] += 1
                    slot = slot_of(now, slot_seconds(limit, self.slots_per_window))
                    self._emit(LEDGER_FALLBACK_METRIC, kind="grant")
                    return Reservation(limit, tokens, Lane.REALTIME, slot, now - start, now, fallback=True)
            if now - start + wait > max_wait_seconds:
                self._count("overloaded")
                self._emit(LEDGER_OVERLOADED_METRIC, lane=Lane.REALTIME.value)
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
        """Correct the reserved estimate with the provider's reported usage (no call if it was exact).

        The budgets it was charged to move by the same difference (and its cost at the model's price).
        """
        for charge in reservation.charges:
            self._adjust_budget(
                charge,
                int(actual_tokens) - charge.tokens,
                BudgetCharge.of(charge.scope, charge.key, actual_tokens, charge.price_per_million).nusd
                - charge.nusd,
            )
        delta = int(actual_tokens) - reservation.tokens
        if delta == 0:
            return
        if reservation.fallback:
            with self._lock:
                self._local.setdefault(reservation.limit.key, _LocalWindow()).add(
                    reservation.granted_at, delta, 0
                )
            return
        if reservation.leased and delta < 0:
            with self._lock:
                lease = self._leases.get(reservation.limit.key)
                if lease is not None and lease.slot == reservation.slot:
                    lease.tokens -= delta  # the lease keeps the refund, and returns it when it closes
                    return
        self._reconcile_item(self.budgeted(reservation.limit), reservation.slot, delta)
        if reservation.tenant_limit is not None:
            self._reconcile_item(reservation.tenant_limit, reservation.slot, delta)

    def _reconcile_item(self, limit: LimitSpec, reserved_slot: int, delta: int, requests: int = 0) -> None:
        now = self.clock()
        seconds_per_slot = slot_seconds(limit, self.slots_per_window)
        guard = self.guard_for(limit)
        # The oldest slot that a caller whose clock runs up to a guard ahead still keeps.
        kept = first_counted_slot(now + guard, seconds_per_slot, self.slots_per_window, guard)
        # Close to leaving the window, the slot may be removed under us: extra usage then goes to the
        # current slot (counted longer, safe), and a refund is dropped (the estimate stands, safe).
        if reserved_slot >= kept + 2:
            slot = reserved_slot
        elif delta > 0:
            slot, requests = slot_of(now, seconds_per_slot), 0
        else:
            return
        try:
            self._update(
                limit.key,
                known=self._hints.get(limit.key),
                UpdateExpression=f"SET #exp = if_not_exists(#exp, :exp) ADD s_{slot} :packed, #tt :delta, #tr :dr",
                ExpressionAttributeNames={
                    "#tt": "tokens_total",
                    "#tr": "requests_total",
                    "#exp": "expires_at",
                },
                ExpressionAttributeValues={
                    ":packed": _n(pack_slot(delta, requests)),
                    ":delta": _n(delta),
                    ":dr": _n(requests),
                    ":exp": self._expires_at(limit, now),
                },
            )
            self._count("reconcile_writes")
        except _LedgerDown as exc:
            logger.warning(
                "could not reconcile a reservation; the estimate stands until its slot expires",
                extra={"limit_key": limit.key, "delta": delta, "error": repr(exc.cause)},
            )

    def _note_utilization(
        self, lane: Lane, limit: LimitSpec, state: LedgerState, tokens: int, requests: int, now: float
    ) -> None:
        """Track the peak share of the window a decision saw (with its own request); emit it once a minute."""
        if self.metrics is None:
            return
        seconds_per_slot = slot_seconds(limit, self.slots_per_window)
        oldest = first_counted_slot(now, seconds_per_slot, self.slots_per_window, self.guard_for(limit))
        counted = [(t, r) for slot, (t, r) in state.slots.items() if slot >= oldest]
        share = max(
            (sum(max(t, 0) for t, _ in counted) + tokens) / max(limit.tpm, 1),
            (sum(r for _, r in counted) + requests) / max(limit.rpm, 1),
        )
        with self._lock:
            # A process's first minute is emitted at its end, like every other: a short-lived process or
            # an idle one emits nothing (the alarm treats missing data as fine).
            peak, emitted_at = self._utilization.get(lane, (0.0, now))
            peak = max(peak, min(share, 1.0))
            if now - emitted_at < _UTILIZATION_EMIT_SECONDS:
                self._utilization[lane] = (peak, emitted_at)
                return
            self._utilization[lane] = (0.0, now)
        self._emit(LEDGER_UTILIZATION_METRIC, round(100 * peak, 1), lane=lane.value)

    def _precheck_budgets(self, charges: Sequence[BudgetCharge]) -> list[BudgetCharge]:
        """The charges, tenants' dated to this month; BudgetExceeded at once when a budget is confirmed spent.

        Only this process's hint of a budget (its last write) can make it read: a budget that looks spent is
        read (consistently), and refused only if the read says so too.
        """
        now = self.clock()
        pending: list[BudgetCharge] = []
        for charge in charges:
            if charge.scope == "tenant":
                hinted = self._budget_hints.get(charge.pk)
                month = month_of(now)
                charge = replace(charge, period=max(month, hinted.period or month) if hinted else month)
            pending.append(charge)
            hint = self._budget_hints.get(charge.pk)
            if hint is None or hint.as_of(charge.period).fits(charge):
                continue
            self._count("budget_reads")
            try:
                item = self._call("get_item", Key={"pk": {"S": charge.pk}}, ConsistentRead=True).get("Item")
            except _LedgerDown as exc:
                raise self._budget_down(exc) from exc
            if not item:
                self._budget_gone(charge)
                continue
            state = BudgetState.parse(item)
            self._budget_hints[charge.pk] = state
            if not state.as_of(charge.period).fits(charge):
                raise self._refuse(charge, state.as_of(charge.period), now)
        return pending

    def _charge_budgets(self, charges: Sequence[BudgetCharge]) -> tuple[BudgetCharge, ...]:
        """Charge each budget (one conditional write each); a refusal refunds those already charged."""
        charged: list[BudgetCharge] = []
        try:
            for charge in charges:
                done = self._charge(charge)
                if done is not None:
                    charged.append(done)
        except BaseException:
            for done in charged:
                self._adjust_budget(done, -done.tokens, -done.nusd)
            raise
        return tuple(charged)

    def _charge(self, charge: BudgetCharge) -> BudgetCharge | None:
        """Charge one budget: the charge as written, None if the budget is gone, or BudgetExceeded."""
        for _ in range(_BUDGET_WRITE_TRIES):
            self._count("budget_writes")
            try:
                answer = self._call(
                    "update_item",
                    Key={"pk": {"S": charge.pk}},
                    ReturnValues="ALL_NEW",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                    **charge_update(charge),
                )
            except _LedgerDown as exc:
                raise self._budget_down(exc) from exc
            except ClientError as exc:  # the condition failed: the item says why
                item = exc.response.get("Item")
                if not item:
                    self._budget_gone(charge)
                    return None
                state = BudgetState.parse(item)
                self._budget_hints[charge.pk] = state
                if charge.period is not None and state.period != charge.period:
                    if state.period and state.period > charge.period:
                        charge = replace(charge, period=state.period)  # this clock is behind the item's month
                    else:
                        self._roll_over(charge, state)
                    continue
                raise self._refuse(charge, state, self.clock()) from None
            self._budget_hints[charge.pk] = BudgetState.parse(answer.get("Attributes") or {})
            return charge
        raise LedgerUnavailable(
            f"the {charge.scope} budget '{charge.key}' kept changing under this charge; retry shortly",
            retry_after=1.0,
        )

    def _roll_over(self, charge: BudgetCharge, state: BudgetState) -> None:
        """Start the tenant's new month on its item; whoever loses the race finds it already done."""
        assert charge.period is not None
        try:
            self._call("update_item", Key={"pk": {"S": charge.pk}}, **rollover_update(state, charge.period))
        except _LedgerDown as exc:
            raise self._budget_down(exc) from exc
        except ClientError:
            pass  # another caller rolled it over (or a limit changed): the next charge decides on the item

    def _refuse(self, charge: BudgetCharge, state: BudgetState, now: float) -> BudgetExceeded:
        self._count("budget_refused")
        self._emit(BUDGET_REFUSED_METRIC, scope=charge.scope)
        if not state.refused:  # mark it once (Budget.exhausted), so that a job watching it can pause
            with contextlib.suppress(ClientError, _LedgerDown):
                self._call("update_item", Key={"pk": {"S": charge.pk}}, **refused_update(charge, now))
            self._budget_hints[charge.pk] = replace(state, refused=True)
        logger.info(
            "reservation refused: budget spent",
            extra={"scope": charge.scope, "budget": charge.key, "tokens": charge.tokens, "nusd": charge.nusd},
        )
        return refusal(charge, state, now)

    def _budget_gone(self, charge: BudgetCharge) -> None:
        """The budget was cleared: nothing to charge, and this process stops looking for it."""
        self._budget_hints.pop(charge.pk, None)
        if self.budgets is not None:
            self.budgets.forget(charge.scope, charge.key)

    def _budget_down(self, exc: _LedgerDown) -> EmbedServiceError:
        """A budget DynamoDB cannot read or charge fails closed, in every lane: the work is not done unbudgeted."""
        self._count("shed" if exc.transient else "misconfigured")
        logger.warning(
            "budget could not be charged; refusing to call the provider unbudgeted",
            extra={"table": self.table_name, "code": exc.code, "error": repr(exc.cause)},
        )
        return ledger_error(exc.cause, self.table_name)

    def _adjust_budget(self, charge: BudgetCharge, tokens: int, nusd: int) -> None:
        """Move a charge's spend (reconcile, refund); a budget cleared or a month passed meanwhile is left alone."""
        if not tokens and not nusd:
            return
        try:
            self._count("budget_writes")
            self._call("update_item", Key={"pk": {"S": charge.pk}}, **adjust_update(charge, tokens, nusd))
        except ClientError:
            pass  # cleared, or rolled into a new month: that month does not pay for this one
        except _LedgerDown as exc:
            logger.warning(
                "could not correct a budget's spend; the charge stands",
                extra={
                    "scope": charge.scope,
                    "budget": charge.key,
                    "tokens": tokens,
                    "error": repr(exc.cause),
                },
            )

    def refund_charges(self, reservation: Reservation) -> Reservation:
        """Give back what a reservation charged its budgets (its request failed: nothing was billed)."""
        for charge in reservation.charges:
            self._adjust_budget(charge, -charge.tokens, -charge.nusd)
        return replace(reservation, charges=())

    def _release_grant(self, reservation: Reservation) -> None:
        """Undo a rate-limit grant whose request will not be sent (a budget refused it)."""
        self._count("budget_released_grants")
        if reservation.fallback:
            return  # granted from memory: it stays counted there until it leaves the window (safe)
        if reservation.leased:
            with self._lock:
                lease = self._leases.get(reservation.limit.key)
                if lease is not None and lease.slot == reservation.slot:
                    lease.tokens += reservation.tokens
                    lease.requests += 1
                    return
        self._reconcile_item(self.budgeted(reservation.limit), reservation.slot, -reservation.tokens, -1)
        if reservation.tenant_limit is not None:
            self._reconcile_item(reservation.tenant_limit, reservation.slot, -reservation.tokens, -1)

    def report_throttle(self, limit: LimitSpec, retry_after_seconds: float) -> None:
        """Record a provider 429: every caller, in every process, waits until now + retry_after."""
        now = self.clock()
        until = now + max(float(retry_after_seconds), 0.0)
        self._count("throttles_reported")
        self._emit(PROVIDER_THROTTLES_METRIC, limit=limit.key)
        with self._lock:
            self._local_cooldowns[limit.key] = max(self._local_cooldowns.get(limit.key, 0.0), until)
        try:
            self._update(
                limit.key,
                UpdateExpression="SET #cd = :cd, #exp = :exp",
                ConditionExpression="attribute_not_exists(#cd) OR #cd < :cd",
                ExpressionAttributeNames={"#cd": "cooldown_until", "#exp": "expires_at"},
                ExpressionAttributeValues={":cd": _n(until), ":exp": self._expires_at(limit, now, until)},
            )
        except _LedgerDown as exc:
            logger.warning(
                "could not record a provider 429 in the ledger; only this process backs off",
                extra={
                    "limit_key": limit.key,
                    "retry_after": retry_after_seconds,
                    "error": repr(exc.cause),
                },
            )


class NoopLedger:
    """The ledger where no limit applies (the in-process local model): grants at once, records nothing."""

    def __init__(self) -> None:
        self._grants = 0

    def acquire(
        self,
        limit: LimitSpec,
        tokens: int,
        lane: Lane,
        *,
        max_wait_seconds: float,
        tenant: str | None = None,
        tenant_share: float | None = None,
        charges: Sequence[BudgetCharge] = (),
    ) -> Reservation:
        """Grant at once (the in-process model is free: budgets count what metered providers bill)."""
        self._grants += 1
        return Reservation(limit, tokens, Lane(lane), 0, 0.0, granted_at=time.time())

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> None:
        """Nothing to correct."""

    def refund_charges(self, reservation: Reservation) -> Reservation:
        """Nothing was charged."""
        return reservation

    def report_throttle(self, limit: LimitSpec, retry_after_seconds: float) -> None:
        """Nothing to record."""

    def stats(self) -> dict:
        """The same counters as RateLimitLedger; only grants move."""
        return {"dynamodb_calls": 0, "grants": self._grants, "conflicts": 0, "waits": 0}


def create_ledger_table(client, table_name: str) -> None:
    """Create the ledger table (partition key `pk`, TTL on `expires_at`) unless it exists."""
    from embedsvc.adapters.aws import create_table_with_ttl

    create_table_with_ttl(client, table_name, {"pk": "HASH"})
