"""Budgets that act: a task's (lifetime) or a tenant's (per UTC calendar month) cap in dollars or tokens.

Storage. One item per budget in the rate-limit ledger table (`budget#task#<id>`, `budget#tenant#<id>`;
the ledger's own items are `v2#...`, so neither ever reads the other's): the limits `limit_tokens` and
`limit_nusd`, the counters `spent_*` and `remaining_*`, and for a tenant the month the counters are for
(`period`, "YYYY-MM" in UTC). Dollars are kept in nano-dollars, integers: DynamoDB adds them exactly (and
moto, whose decimal arithmetic trips over exponents, too); a charge rounds its cost up. Budget items
carry no `expires_at`: the table's TTL never removes them; `clear` does.

Why a `remaining` counter. A DynamoDB condition compares but cannot add: `spent + :n <= limit` cannot be
written, `remaining >= :n` can. Every write that moves spend ADDs the same amount to `spent_*` and
subtracts it from `remaining_*` in one update, and `set` writes `remaining = :limit - spent` (evaluated on
the live item, in the same write), so `remaining = limit - spent` always holds, whatever runs concurrently.

Charging (see `RateLimitLedger.acquire`). A charge is one conditional UpdateItem on the budget item:
`attribute_exists(pk) AND (no token limit OR remaining_tokens >= :t) AND (no dollar limit OR
remaining_nusd >= :u) [AND period = :month]`, ADD the amounts. DynamoDB evaluates the condition on the
live item and serializes writes to it, so however many Lambdas charge one budget at once, the sum of the
charges it accepts never passes its limit: no read-then-write race. Only `reconcile` (the provider
counted more than was reserved) can take spend past the limit, by that difference.

Months. A tenant's item holds one month. The first charge that sees an older `period` rolls the item over
(`SET period, spent = 0, remaining = limit`, conditioned on the old period and on which limits exist), so
exactly one writer does it; a charge carries its month in its condition, so it never lands on the wrong
one, and a caller whose clock is behind adopts the item's newer month.

Lookups. Which tasks and tenants have budgets at all is cached per process for `lookup_seconds` (15 s):
without a budget a call pays no DynamoDB write for it. A budget set while a task runs takes effect within
that time; one cleared stops being charged at once (the charge's `attribute_exists` fails).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any, Literal, cast

from botocore.exceptions import BotoCoreError, ClientError

from embedsvc.errors import BudgetExceeded, InvalidRequest, LedgerMisconfigured, LedgerUnavailable

Scope = Literal["task", "tenant"]
SCOPES: tuple[Scope, ...] = ("task", "tenant")
# The ops metric (EMF, dimension `scope`) each refused reservation emits; BudgetReachedAlarm watches it.
BUDGET_REFUSED_METRIC = "BudgetRefused"
NANO_PER_USD = 10**9
LOOKUP_SECONDS = 15.0
_MAX_LOOKUPS = 4096  # cached lookups kept per process before the cache starts afresh
_WRITE_TRIES = 5
_MAX_KEY_LENGTH = 256
_BATCH_GET = 100
_NAMES = {
    "#pk": "pk",
    "#lt": "limit_tokens",
    "#lu": "limit_nusd",
    "#st": "spent_tokens",
    "#su": "spent_nusd",
    "#rt": "remaining_tokens",
    "#ru": "remaining_nusd",
}
_TRANSIENT_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "TransactionConflictException",
        "ExpiredTokenException",
    }
)


def budget_pk(scope: Scope, key: str) -> str:
    """The ledger table's partition key of a budget."""
    return f"budget#{scope}#{key}"


def month_of(now: float) -> str:
    """The UTC calendar month `now` falls in, as "YYYY-MM" (strings in this form sort as months do)."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def seconds_until_next_month(now: float) -> float:
    """Seconds from `now` until the next UTC month begins: when a tenant's monthly budget refills."""
    at = datetime.fromtimestamp(now, UTC)
    start = datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)
    return max(start.timestamp() - now, 1.0)


def nano_usd(tokens: int, price_per_million: float) -> int:
    """The cost of `tokens` in nano-dollars, rounded up (a budget never undercounts a charge)."""
    cost = Decimal(str(price_per_million)) * Decimal(int(tokens)) * 1000  # x / 1e6 tokens x 1e9 nano
    return int(cost.to_integral_value(rounding=ROUND_CEILING))


def usd_to_nano(usd: float) -> int:
    return int((Decimal(str(usd)) * NANO_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def _n(value: int) -> dict[str, str]:
    return {"N": str(int(value))}


@dataclass(frozen=True)
class BudgetCharge:
    """What one reservation charges one budget: its tokens and their cost at the model's price."""

    scope: Scope
    key: str
    tokens: int
    nusd: int
    price_per_million: float = 0.0
    period: str | None = None  # a tenant's charge: the month it lands in (set by the ledger)

    @classmethod
    def of(cls, scope: Scope, key: str, tokens: int, price_per_million: float) -> BudgetCharge:
        return cls(scope, key, int(tokens), nano_usd(tokens, price_per_million), price_per_million)

    @property
    def pk(self) -> str:
        return budget_pk(self.scope, self.key)

    def usd(self) -> float:
        return self.nusd / NANO_PER_USD


@dataclass(frozen=True)
class Budget:
    """A budget as read: limits (None: no limit of that kind), spend so far, and what is left."""

    limit_usd: float | None
    limit_tokens: int | None
    spent_usd: float
    spent_tokens: int
    remaining_usd: float | None
    remaining_tokens: int | None
    # A limit is used up, or the budget refused a reservation since its limits were last set (what is left
    # is less than the work asks for): work under it stops until the budget is raised (or the month ends).
    exhausted: bool
    scope: Scope = "task"
    key: str = ""
    period: str | None = None  # a tenant's budget: the UTC month these numbers are for

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "key": self.key,
            "period": self.period,
            "limit_usd": self.limit_usd,
            "limit_tokens": self.limit_tokens,
            "spent_usd": self.spent_usd,
            "spent_tokens": self.spent_tokens,
            "remaining_usd": self.remaining_usd,
            "remaining_tokens": self.remaining_tokens,
            "exhausted": self.exhausted,
        }


@dataclass(frozen=True)
class BudgetState:
    """A budget item in integer units (tokens, nano-dollars), as DynamoDB holds it."""

    limit_tokens: int | None = None
    limit_nusd: int | None = None
    spent_tokens: int = 0
    spent_nusd: int = 0
    remaining_tokens: int = 0
    remaining_nusd: int = 0
    period: str | None = None
    refused: bool = False  # a charge was refused since the limits were last set (or the month began)

    @classmethod
    def parse(cls, item: Mapping[str, Any]) -> BudgetState:
        def number(name: str) -> int | None:
            return int(Decimal(item[name]["N"])) if name in item else None

        return cls(
            limit_tokens=number("limit_tokens"),
            limit_nusd=number("limit_nusd"),
            spent_tokens=number("spent_tokens") or 0,
            spent_nusd=number("spent_nusd") or 0,
            remaining_tokens=number("remaining_tokens") or 0,
            remaining_nusd=number("remaining_nusd") or 0,
            period=item["period"]["S"] if "period" in item else None,
            refused="refused_at" in item,
        )

    def as_of(self, period: str | None) -> BudgetState:
        """The item as a caller in `period` sees it: an older month's spend no longer counts."""
        if period is None or self.period is None or self.period >= period:
            return self
        return replace(
            self,
            spent_tokens=0,
            spent_nusd=0,
            remaining_tokens=self.limit_tokens or 0,
            remaining_nusd=self.limit_nusd or 0,
            period=period,
            refused=False,
        )

    def fits(self, charge: BudgetCharge) -> bool:
        """Whether the charge passes the write's condition on this state."""
        return (self.limit_tokens is None or self.remaining_tokens >= charge.tokens) and (
            self.limit_nusd is None or self.remaining_nusd >= charge.nusd
        )

    def budget(self, scope: Scope, key: str) -> Budget:
        remaining_tokens = self.remaining_tokens if self.limit_tokens is not None else None
        remaining_nusd = self.remaining_nusd if self.limit_nusd is not None else None
        return Budget(
            limit_usd=None if self.limit_nusd is None else self.limit_nusd / NANO_PER_USD,
            limit_tokens=self.limit_tokens,
            spent_usd=self.spent_nusd / NANO_PER_USD,
            spent_tokens=self.spent_tokens,
            remaining_usd=None if remaining_nusd is None else remaining_nusd / NANO_PER_USD,
            remaining_tokens=remaining_tokens,
            exhausted=self.refused
            or (remaining_tokens is not None and remaining_tokens <= 0)
            or (remaining_nusd is not None and remaining_nusd <= 0),
            scope=scope,
            key=key,
            period=self.period,
        )


def charge_update(charge: BudgetCharge) -> dict[str, Any]:
    """UpdateItem arguments of a charge: its condition is the budget check itself."""
    names = dict(_NAMES)
    values = {
        ":t": _n(charge.tokens),
        ":mt": _n(-charge.tokens),
        ":u": _n(charge.nusd),
        ":mu": _n(-charge.nusd),
    }
    condition = (
        "attribute_exists(#pk) AND (attribute_not_exists(#lt) OR #rt >= :t)"
        " AND (attribute_not_exists(#lu) OR #ru >= :u)"
    )
    if charge.period is not None:
        names["#p"] = "period"
        values[":p"] = {"S": charge.period}
        condition += " AND #p = :p"
    return {
        "UpdateExpression": "ADD #st :t, #rt :mt, #su :u, #ru :mu",
        "ConditionExpression": condition,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def adjust_update(charge: BudgetCharge, tokens: int, nusd: int) -> dict[str, Any]:
    """UpdateItem arguments moving a charge's spend by (tokens, nusd): reconcile, or a refund (negative)."""
    names = {k: v for k, v in _NAMES.items() if k in ("#pk", "#st", "#su", "#rt", "#ru")}
    values = {":t": _n(tokens), ":mt": _n(-tokens), ":u": _n(nusd), ":mu": _n(-nusd)}
    condition = "attribute_exists(#pk)"  # a cleared budget is not brought back by a late correction
    if charge.period is not None:
        names["#p"] = "period"
        values[":p"] = {"S": charge.period}
        condition += " AND #p = :p"  # nor is last month's correction charged to this month
    return {
        "UpdateExpression": "ADD #st :t, #rt :mt, #su :u, #ru :mu",
        "ConditionExpression": condition,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def rollover_update(state: BudgetState, period: str) -> dict[str, Any]:
    """UpdateItem arguments starting a tenant's new month: spend 0, remaining = limit; exactly one writer wins."""
    names = {"#pk": "pk", "#p": "period", "#st": "spent_tokens", "#su": "spent_nusd"}
    sets = ["#p = :p", "#st = :zero", "#su = :zero"]
    conditions = ["attribute_exists(#pk)", "#p = :old"]
    for limit, remaining, present in (
        ("#lt", "#rt", state.limit_tokens is not None),
        ("#lu", "#ru", state.limit_nusd is not None),
    ):
        names[limit] = _NAMES[limit]
        if present:
            names[remaining] = _NAMES[remaining]
            sets.append(f"{remaining} = {limit}")
            conditions.append(f"attribute_exists({limit})")
        else:
            conditions.append(f"attribute_not_exists({limit})")  # a limit set meanwhile: read again
    return {
        "UpdateExpression": "SET " + ", ".join(sets) + " REMOVE refused_at",
        "ConditionExpression": " AND ".join(conditions),
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": {
            ":p": {"S": period},
            ":old": {"S": state.period or ""},
            ":zero": _n(0),
        },
    }


def refused_update(charge: BudgetCharge, now: float) -> dict[str, Any]:
    """UpdateItem arguments marking a budget as having refused work (`Budget.exhausted`)."""
    names = {"#pk": "pk", "#r": "refused_at"}
    values = {":now": _n(int(now))}
    condition = "attribute_exists(#pk)"
    if charge.period is not None:
        names["#p"] = "period"
        values[":p"] = {"S": charge.period}
        condition += " AND #p = :p"
    return {
        "UpdateExpression": "SET #r = :now",
        "ConditionExpression": condition,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def refusal(charge: BudgetCharge, state: BudgetState, now: float) -> BudgetExceeded:
    """The error a refused charge raises: which budget, how much is used, what this request needed."""
    name = f"the {charge.scope} budget '{charge.key}'" + (f" for {charge.period}" if charge.period else "")
    parts = []
    if state.limit_tokens is not None and state.remaining_tokens < charge.tokens:
        parts.append(
            f"{state.spent_tokens:,} of {state.limit_tokens:,} tokens spent, this request needs {charge.tokens:,}"
        )
    if state.limit_nusd is not None and state.remaining_nusd < charge.nusd:
        parts.append(
            f"${state.spent_nusd / NANO_PER_USD:.6f} of ${state.limit_nusd / NANO_PER_USD:.6f} spent, "
            f"this request needs ${charge.usd():.6f}"
        )
    retry_after = seconds_until_next_month(now) if charge.scope == "tenant" else None
    when = "it refills when the next UTC month begins" if charge.scope == "tenant" else "raise it to go on"
    return BudgetExceeded(
        f"{name} would be exceeded ({'; '.join(parts) or 'no room left'}); {when} "
        f"(embedsvc budgets show --{charge.scope} {charge.key}).",
        scope=charge.scope,
        key=charge.key,
        retry_after=retry_after,
    )


def ledger_error(exc: Exception, table_name: str) -> LedgerUnavailable | LedgerMisconfigured:
    """A DynamoDB failure of a budget read or write, as the ledger reports its own: budgets fail closed."""
    code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
    if isinstance(exc, BotoCoreError) or code in _TRANSIENT_CODES:
        return LedgerUnavailable(
            f"the budget store is unavailable ({code or type(exc).__name__}); retry shortly", retry_after=1.0
        )
    return LedgerMisconfigured(
        f"the rate-limit ledger table '{table_name}' refused a budget request ({code or 'error'}): check that "
        "the table exists in this region and that this function may read and update it",
        retry_after=1.0,
    )


def _check_scope(scope: str, key: str) -> Scope:
    if scope not in SCOPES:
        raise InvalidRequest(f"a budget's scope is one of {', '.join(SCOPES)}, not {scope!r}")
    if not key or len(key) > _MAX_KEY_LENGTH:
        raise InvalidRequest(f"a budget's {scope} id must be 1 to {_MAX_KEY_LENGTH} characters")
    return cast(Scope, scope)


class BudgetStore:
    """Task and tenant budgets, as items in the ledger table; `RateLimitLedger` enforces them."""

    def __init__(
        self,
        table_name: str,
        client=None,
        *,
        clock=time.time,
        lookup_seconds: float = LOOKUP_SECONDS,
    ):
        self.table_name = table_name
        self._client = client
        self.clock = clock
        self.lookup_seconds = lookup_seconds
        self._lock = threading.Lock()
        self._lookups: dict[tuple[Scope, str], tuple[bool, float]] = {}  # (scope, key) -> (exists, read at)

    @property
    def client(self):
        """The boto3 DynamoDB client, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from embedsvc.adapters.aws import client

                    self._client = client("dynamodb", fast=True)
        return self._client

    def _call(self, operation: str, **kwargs) -> dict:
        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise
            raise ledger_error(exc, self.table_name) from exc
        except BotoCoreError as exc:
            raise ledger_error(exc, self.table_name) from exc

    def _read(self, pk: str) -> BudgetState | None:
        item = self._call(
            "get_item", TableName=self.table_name, Key={"pk": {"S": pk}}, ConsistentRead=True
        ).get("Item")
        return BudgetState.parse(item) if item else None

    def set(self, scope: Scope, key: str, *, usd: float | None = None, tokens: int | None = None) -> None:
        """Set a budget's limits (a limit not given is removed); spend so far is kept."""
        scope = _check_scope(scope, key)
        if usd is None and tokens is None:
            raise InvalidRequest("a budget needs a limit in dollars (usd), tokens, or both")
        if (usd is not None and (not math.isfinite(usd) or usd < 0)) or (tokens is not None and tokens < 0):
            raise InvalidRequest("a budget's limits must be finite and not negative")
        limits = {
            ("#lt", "#rt", "#st"): None if tokens is None else int(tokens),
            ("#lu", "#ru", "#su"): None if usd is None else usd_to_nano(usd),
        }
        pk = budget_pk(scope, key)
        for _ in range(_WRITE_TRIES):
            now = self.clock()
            period = month_of(now) if scope == "tenant" else None
            state = self._read(pk)
            names: dict[str, str] = dict(_NAMES)
            values: dict[str, Any] = {":now": _n(int(now))}
            sets = ["#updated = :now"]
            names["#updated"] = "updated_at"
            # New limits: whether they refuse is for the next charge to say.
            removes: list[str] = ["refused_at"]
            if state is None:
                item: dict[str, Any] = {
                    "pk": {"S": pk},
                    "scope": {"S": scope},
                    "key": {"S": key},
                    "spent_tokens": _n(0),
                    "spent_nusd": _n(0),
                    "updated_at": _n(int(now)),
                }
                if period is not None:
                    item["period"] = {"S": period}
                for (limit, remaining, _), value in limits.items():
                    if value is not None:
                        item[_NAMES[limit]] = item[_NAMES[remaining]] = _n(value)
                try:
                    self._call(
                        "put_item",
                        TableName=self.table_name,
                        Item=item,
                        ConditionExpression="attribute_not_exists(pk)",
                    )
                except ClientError:
                    continue  # someone created it meanwhile: update it instead
                break
            new_month = period is not None and (state.period or "") < period
            conditions = ["attribute_exists(#pk)"]
            if period is not None:
                names["#p"] = "period"
                values[":old"] = {"S": state.period or ""}
                conditions.append("#p = :old")
            if new_month:
                values[":p"] = {"S": period}
                values[":zero"] = _n(0)
                sets += ["#p = :p", "#st = :zero", "#su = :zero"]
            for index, ((limit, remaining, spent), value) in enumerate(limits.items()):
                if value is None:
                    removes += [limit, remaining]
                    continue
                values[f":l{index}"] = _n(value)
                sets.append(f"{limit} = :l{index}")
                # remaining = limit - spent, on the live item: exact whatever charges land meanwhile.
                sets.append(f"{remaining} = :l{index}" if new_month else f"{remaining} = :l{index} - {spent}")
            expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
            condition = " AND ".join(conditions)
            used = set(re.findall(r"#\w+", f"{expression} {condition}"))  # DynamoDB refuses unused names
            try:
                self._call(
                    "update_item",
                    TableName=self.table_name,
                    Key={"pk": {"S": pk}},
                    UpdateExpression=expression,
                    ConditionExpression=condition,
                    ExpressionAttributeNames={k: v for k, v in names.items() if k in used},
                    ExpressionAttributeValues=values,
                )
            except ClientError:
                continue  # cleared, or its month rolled over meanwhile: read again
            break
        else:
            raise LedgerUnavailable(f"the {scope} budget '{key}' kept changing; try again", retry_after=1.0)
        self.forget(scope, key)

    def get(self, scope: Scope, key: str) -> Budget | None:
        """The budget, or None; a tenant's as of the current month (a past month's spend does not count)."""
        scope = _check_scope(scope, key)
        state = self._read(budget_pk(scope, key))
        if state is None:
            return None
        return state.as_of(month_of(self.clock()) if scope == "tenant" else None).budget(scope, key)

    def clear(self, scope: Scope, key: str) -> None:
        """Remove the budget: its task or tenant is no longer capped (reservations in flight stop charging it)."""
        scope = _check_scope(scope, key)
        self._call("delete_item", TableName=self.table_name, Key={"pk": {"S": budget_pk(scope, key)}})
        self.forget(scope, key)

    def forget(self, scope: Scope, key: str) -> None:
        """Drop this process's cached lookup of a budget (it was set, cleared, or found gone)."""
        with self._lock:
            self._lookups.pop((scope, key), None)

    def active(self, wanted: Iterable[tuple[Scope, str]]) -> AbstractSet[tuple[Scope, str]]:
        """Which of these (scope, key) pairs have a budget: cached per process, one BatchGetItem for the rest.

        A failed read answers from the stale cache where it can, and fails closed otherwise
        (LedgerUnavailable): a budget that cannot be looked up is not skipped.
        """
        now = self.clock()
        wanted = set(wanted)
        found: set[tuple[Scope, str]] = set()
        missing: list[tuple[Scope, str]] = []
        with self._lock:
            for pair in wanted:
                cached = self._lookups.get(pair)
                if cached is not None and now - cached[1] < self.lookup_seconds:
                    if cached[0]:
                        found.add(pair)
                else:
                    missing.append(pair)
        if not missing:
            return found
        try:
            present = self._exist([budget_pk(*pair) for pair in missing])
        except (LedgerUnavailable, LedgerMisconfigured):
            with self._lock:
                stale = {pair: self._lookups.get(pair) for pair in missing}
            if any(entry is None for entry in stale.values()):
                raise
            return found | {pair for pair, entry in stale.items() if entry is not None and entry[0]}
        with self._lock:
            if len(self._lookups) > _MAX_LOOKUPS:
                self._lookups.clear()
            for pair in missing:
                exists = budget_pk(*pair) in present
                self._lookups[pair] = (exists, now)
                if exists:
                    found.add(pair)
        return found

    def _exist(self, pks: list[str]) -> AbstractSet[str]:
        present: set[str] = set()
        for start in range(0, len(pks), _BATCH_GET):
            request: dict = {
                self.table_name: {
                    "Keys": [{"pk": {"S": pk}} for pk in pks[start : start + _BATCH_GET]],
                    "ProjectionExpression": "pk",
                }
            }
            for _ in range(5):
                answer = self._call("batch_get_item", RequestItems=request)
                present.update(
                    item["pk"]["S"] for item in answer.get("Responses", {}).get(self.table_name, [])
                )
                request = answer.get("UnprocessedKeys") or {}
                if not request:
                    break
            else:
                raise LedgerUnavailable(
                    "BatchGetItem left budget keys unprocessed; retry shortly", retry_after=1.0
                )
        return present
