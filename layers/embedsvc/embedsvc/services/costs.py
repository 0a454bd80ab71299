"""Cost answers from the daily roll-up (`adapters/cost_store.py`), and the self-hosting break-even.

Everything here reads the roll-up only, one Query per day and dimension: a 30-day report over 10M calls a
month costs about 120 small queries, the same locally (moto) and on AWS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from embedsvc.observability import utc_day

if TYPE_CHECKING:
    from embedsvc.adapters.cost_store import CostStore, ItemTotals

INDEXING_SOURCES = ("note_index", "verse_index", "reindex", "backfill", "repair")
QUERY_SOURCES = ("user_query",)
EVALUATION_SOURCES = ("evaluation",)
# A task of these sources seen within RUNNING_SECONDS is a reindex running now.
REINDEX_SOURCES = frozenset({"reindex", "backfill"})
RUNNING_SECONDS = 15 * 60
BREAKDOWNS = ("source", "model", "user", "task", "tenant")
HOURS_PER_MONTH = 730  # 8,760 h / 12: what cloud price pages call a month


def report_days(days: int, now: float) -> list[str]:
    """The last `days` UTC days, oldest first, ending today."""
    today = datetime.fromtimestamp(now, UTC).date()
    return [(today - timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _group(by_source: dict[str, ItemTotals], sources: tuple[str, ...]) -> dict[str, Any]:
    from embedsvc.adapters.cost_store import ItemTotals

    summed = ItemTotals()
    for source in sources:
        if source in by_source:
            summed.add(by_source[source])
    return {"tokens": summed.tokens, "usd": summed.usd, "requests": summed.requests}


def indexing_share(by_source: dict[str, ItemTotals]) -> dict[str, Any]:
    """Indexing (note/verse_index, reindex, backfill, repair) against queries (user_query); evaluation apart.

    `share_usd` and `share_tokens` are indexing / (indexing + queries); None when both are zero (a free
    local model costs $0 on both sides, so the token share is the one that says something then).
    """
    known = set(INDEXING_SOURCES) | set(QUERY_SOURCES) | set(EVALUATION_SOURCES)
    other = tuple(sorted(s for s in by_source if s not in known))
    indexing = _group(by_source, INDEXING_SOURCES)
    queries = _group(by_source, QUERY_SOURCES)
    return {
        "indexing": indexing,
        "queries": queries,
        "evaluation": _group(by_source, EVALUATION_SOURCES),
        "other": _group(by_source, other),
        "share_usd": _share(indexing["usd"], indexing["usd"] + queries["usd"]),
        "share_tokens": _share(indexing["tokens"], indexing["tokens"] + queries["tokens"]),
    }


def _ranked(items: dict[str, ItemTotals], top: int) -> list[tuple[str, ItemTotals]]:
    return sorted(items.items(), key=lambda kv: (-kv[1].nano_usd, -kv[1].tokens, kv[0]))[:top]


def _task_entry(task_id: str, totals: ItemTotals) -> dict[str, Any]:
    return {
        "task_id": task_id,
        **totals.as_dict(),
        "sources": sorted(totals.sources),
        "models": sorted(totals.models),
        "first_seen": _iso(totals.first_seen),
        "last_seen": _iso(totals.last_seen),
    }


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds") if epoch is not None else None


def running_reindex(store: CostStore, now: float) -> list[dict[str, Any]]:
    """Tasks of source reindex/backfill that spent within the last 15 minutes, with their spend so far."""
    days = {utc_day(now), utc_day(now - RUNNING_SECONDS)}  # just after midnight, yesterday's partition too
    running: list[dict[str, Any]] = []
    seen: set[str] = set()
    for day in sorted(days):
        for task_id, item in store.day_items(day, "task").items():
            if task_id in seen or not (item.sources & REINDEX_SOURCES):
                continue
            if item.last_seen is None or item.last_seen < now - RUNNING_SECONDS:
                continue
            seen.add(task_id)
            lifetime = store.task(task_id) or item  # all its days, not only today's
            entry = _task_entry(task_id, lifetime)
            entry["seconds_since_seen"] = round(now - (lifetime.last_seen or item.last_seen), 1)
            running.append(entry)
    return sorted(running, key=lambda e: (-e["usd"], -e["tokens"], e["task_id"]))


def build_report(
    store: CostStore, *, days: int = 7, by: str = "source", top: int = 10, now: float | None = None
) -> dict[str, Any]:
    """The `embedsvc costs` answer: breakdown, indexing share, top users and tasks, savings, running reindex."""
    if by not in BREAKDOWNS:
        raise ValueError(f"--by must be one of {', '.join(BREAKDOWNS)}")
    now = time.time() if now is None else now
    window = report_days(days, now)
    per_day = {day: store.day_items(day, "source") for day in window}
    from embedsvc.adapters.cost_store import ItemTotals

    by_source: dict[str, ItemTotals] = {}
    for items in per_day.values():
        for source, item in items.items():
            by_source.setdefault(source, ItemTotals()).add(item)
    total = ItemTotals()
    for item in by_source.values():
        total.add(item)
    breakdown = by_source if by == "source" else store.totals(window, by)
    users = store.totals(window, "user")
    tasks = store.totals(window, "task")
    return {
        "from": window[0],
        "to": window[-1],
        "days": days,
        "by": by,
        "totals": total.as_dict(),
        "breakdown": {value: item.as_dict() for value, item in _ranked(breakdown, len(breakdown))},
        "unattributed": _unattributed(total, breakdown) if by in ("user", "task", "tenant") else None,
        "by_source": {
            source: {"tokens": item.tokens, "usd": item.usd, "requests": item.requests}
            for source, item in sorted(by_source.items())
        },
        "indexing_share": indexing_share(by_source),
        "top_users": [{"user_id": u, **item.as_dict()} for u, item in _ranked(users, top)],
        "top_tasks": [_task_entry(t, item) for t, item in _ranked(tasks, top)],
        "saved_tokens": total.saved_tokens,
        "saved_usd": total.saved_usd,
        "running_reindex": running_reindex(store, now),
        "per_day": {
            day: {source: item.as_dict() for source, item in sorted(items.items())}
            for day, items in per_day.items()
        },
    }


def _unattributed(total: ItemTotals, breakdown: dict[str, ItemTotals]) -> dict[str, Any]:
    """What no user (task, tenant) carries: shared content indexed for nobody, calls without a task."""
    tokens = total.tokens - sum(i.tokens for i in breakdown.values())
    nano = total.nano_usd - sum(i.nano_usd for i in breakdown.values())
    return {"tokens": tokens, "usd": nano / 1e9}


def volume(tokens: float) -> str:
    """A token count people read: 525.6M, 111.69B."""
    return f"{tokens / 1e9:,.2f}B" if tokens >= 1e9 else f"{tokens / 1e6:,.1f}M"


@dataclass(frozen=True)
class BreakEven:
    """Self-hosting one instance against a managed API priced per token, per month."""

    tokens_per_second: float
    instance_usd_per_hour: float
    utilization: float
    price_per_million: float
    model: str

    @property
    def instance_usd_per_month(self) -> float:
        return self.instance_usd_per_hour * HOURS_PER_MONTH

    @property
    def capacity_tokens_per_month(self) -> float:
        return self.tokens_per_second * self.utilization * 3600 * HOURS_PER_MONTH

    @property
    def price_per_token(self) -> float:
        return self.price_per_million / 1_000_000

    @property
    def break_even_tokens_per_month(self) -> float:
        """The volume at which one instance's month costs what the API charges for it (inf for a free API)."""
        return self.instance_usd_per_month / self.price_per_token if self.price_per_token else math.inf

    @property
    def exceeds_capacity(self) -> bool:
        """True when one instance cannot serve its own break-even volume: self-hosting never wins."""
        return self.break_even_tokens_per_month > self.capacity_tokens_per_month

    @property
    def self_hosted_usd_per_million(self) -> float:
        """One instance's cost per 1M tokens when it runs at `utilization` of its measured throughput."""
        capacity = self.capacity_tokens_per_month
        return self.instance_usd_per_month / capacity * 1_000_000 if capacity else math.inf

    def self_hosted_usd(self, tokens_per_month: float) -> float:
        """Instances needed for that volume (at least one), times their month."""
        instances = max(1, math.ceil(tokens_per_month / self.capacity_tokens_per_month))
        return instances * self.instance_usd_per_month

    def managed_usd(self, tokens_per_month: float) -> float:
        return tokens_per_month * self.price_per_token

    def as_dict(self) -> dict[str, Any]:
        finite = math.isfinite(self.break_even_tokens_per_month)
        return {
            "model": self.model,
            "tokens_per_second": self.tokens_per_second,
            "instance_usd_per_hour": self.instance_usd_per_hour,
            "utilization": self.utilization,
            "price_per_million": self.price_per_million,
            "instance_usd_per_month": self.instance_usd_per_month,
            "capacity_tokens_per_month": self.capacity_tokens_per_month,
            "break_even_tokens_per_month": self.break_even_tokens_per_month if finite else None,
            "exceeds_capacity": self.exceeds_capacity,
            "self_hosted_usd_per_million": self.self_hosted_usd_per_million,
            "instances_at_break_even": (
                math.ceil(self.break_even_tokens_per_month / self.capacity_tokens_per_month)
                if finite
                else None
            ),
        }

    def explain(self) -> list[str]:
        """The arithmetic, line by line, and what it means."""
        y, x, u = self.instance_usd_per_hour, self.tokens_per_second, self.utilization
        lines = [
            f"managed API: {self.model} at ${self.price_per_million:g} per 1M tokens",
            f"instance cost per month     = ${y:g}/h x {HOURS_PER_MONTH} h = ${self.instance_usd_per_month:,.2f}",
            f"capacity per month          = {x:,.0f} tokens/s x {u:g} x 3,600 s x {HOURS_PER_MONTH} h"
            f" = {self.capacity_tokens_per_month:,.0f} tokens",
            f"managed cost per token      = ${self.price_per_million:g} / 1,000,000 = ${self.price_per_token:.3g}",
        ]
        if not math.isfinite(self.break_even_tokens_per_month):
            return [*lines, "the managed model is free: self-hosting never breaks even"]
        be = self.break_even_tokens_per_month
        lines.append(
            f"break-even volume           = ${self.instance_usd_per_month:,.2f} / ${self.price_per_token:.3g}"
            f" = {be:,.0f} tokens/month ({volume(be)})"
        )
        lines.append(
            f"self-hosted cost per 1M     = ${self.instance_usd_per_month:,.2f} / {self.capacity_tokens_per_month:,.0f}"
            f" x 1M = ${self.self_hosted_usd_per_million:.4g} (API: ${self.price_per_million:g})"
        )
        if self.exceeds_capacity:
            lines.append(
                f"=> the break-even ({volume(be)} tokens) exceeds what one instance can serve "
                f"({volume(self.capacity_tokens_per_month)}): at this throughput every token costs more "
                f"self-hosted (${self.self_hosted_usd_per_million:.4g}/1M) than from the API, at any volume"
            )
        else:
            lines.append(
                f"=> above {volume(be)} tokens a month ({be / self.capacity_tokens_per_month:.1%} of one "
                f"instance's capacity) self-hosting is cheaper; more instances keep it so "
                f"(each costs ${self.instance_usd_per_month:,.2f} and serves "
                f"{volume(self.capacity_tokens_per_month)} tokens)"
            )
        lines.append("   (instance time only: no engineering, monitoring or idle redundancy counted)")
        return lines
