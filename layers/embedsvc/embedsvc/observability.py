"""Cost attribution and correlation: every provider call emits tokens and dollars as CloudWatch EMF, and
adds them to a daily roll-up (DynamoDB, `adapters/cost_store.py`) that answers "who spent what".

EMF dimensions are low-cardinality only: each blob carries two dimension sets, (source, model) and
(source), so dashboards and alarms get per-source totals without a SEARCH over models; the user, tenant,
task and correlation id ride along as EMF properties. The roll-up holds what metrics cannot (users and
tasks): deltas are buffered in the process and flushed aggregated at the end of each Lambda invocation
(`flush_costs`), when the buffer grows big, and when the container is reset (the local stack's exit).

Correlation ids: the API's request id (or the caller's X-Correlation-Id) is bound to the logger and to a
context variable; IndexQueue messages produced under it carry it, and the worker logs each record under
its message's id. Scheduled jobs and state machine tasks get one from `correlation_from_event`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Protocol, TypeVar

from aws_lambda_powertools import Logger

logger = Logger(child=True)

# The cost metrics' names, as the code emits them (the dashboard and alarms must name exactly these).
COST_METRIC_NAMES = ("Tokens", "CostUSD", "ProviderRequests", "SavedTokens", "SavedUSD")
# Every cost blob is published under both: per (source, model), and per source (the alarms' metric).
COST_DIMENSION_SETS = (("source", "model"), ("source",))
# The roll-up's dimensions: one item per UTC day and value of each (`source#model` is the pair).
ROLLUP_DIMENSIONS = ("source", "model", "tenant", "user", "task", "source#model")
NANO_PER_USD = 1_000_000_000
# Enough distinct roll-up items that a flush is worth doing before the invocation ends (a big batch).
DEFAULT_MAX_BUFFERED_ITEMS = 500


@dataclass(frozen=True)
class CallContext:
    """Who pays for a call: the cost center and the principal or job behind it."""

    source: str = "user_query"
    user_id: str | None = None
    tenant_id: str | None = None
    task_id: str | None = None


@dataclass
class CostTotals:
    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    saved_tokens: int = 0
    saved_usd: float = 0.0


def nano_usd(tokens: int, price_per_million: float) -> int:
    """The cost of `tokens` in integer nano-dollars, exact for prices with up to 3 decimals per 1M tokens.

    Not micro-dollars: one 15-token text-embedding-3-small query costs 0.3 micro-dollars, which an
    integer micro-dollar counter would round to nothing on every call.
    """
    exact = Decimal(str(price_per_million)) * tokens * 1000
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def utc_day(epoch_seconds: float) -> str:
    """The roll-up's day partition: YYYY-MM-DD in UTC."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class RollupKey:
    """One roll-up item: a UTC day (None: the task's lifetime item), a dimension and its value."""

    day: str | None
    dimension: str
    value: str


@dataclass
class RollupDelta:
    """What to ADD to one roll-up item."""

    tokens: int = 0
    nano_usd: int = 0
    requests: int = 0
    saved_tokens: int = 0
    saved_nano_usd: int = 0
    first_seen: float | None = None  # tasks only: when this process first and last saw the task
    last_seen: float | None = None
    sources: set[str] = field(default_factory=set)  # tasks only
    models: set[str] = field(default_factory=set)  # tasks only

    def add(self, other: RollupDelta) -> None:
        self.tokens += other.tokens
        self.nano_usd += other.nano_usd
        self.requests += other.requests
        self.saved_tokens += other.saved_tokens
        self.saved_nano_usd += other.saved_nano_usd
        if other.first_seen is not None:
            self.first_seen = (
                other.first_seen if self.first_seen is None else min(self.first_seen, other.first_seen)
            )
        if other.last_seen is not None:
            self.last_seen = (
                other.last_seen if self.last_seen is None else max(self.last_seen, other.last_seen)
            )
        self.sources |= other.sources
        self.models |= other.models


class RollupStore(Protocol):
    def apply(self, deltas: Mapping[RollupKey, RollupDelta]) -> list[RollupKey]:
        """Write the deltas; returns the keys that were not written (never raises)."""
        ...


@dataclass
class FlushOutcome:
    items: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    dropped_nano_usd: int = 0


def print_emf(blob: dict) -> None:
    """In Lambda, a JSON line on stdout is how EMF reaches CloudWatch."""
    print(json.dumps(blob, separators=(",", ":")), flush=True)


def rollup_keys(day: str, context: CallContext, model: str) -> list[RollupKey]:
    """The roll-up items one call adds to: the context's attributed dimensions on that day."""
    keys = [
        RollupKey(day, "source", context.source),
        RollupKey(day, "model", model),
        RollupKey(day, "source#model", f"{context.source}#{model}"),
    ]
    for dimension, value in (
        ("tenant", context.tenant_id),
        ("user", context.user_id),
        ("task", context.task_id),
    ):
        if value:
            keys.append(RollupKey(day, dimension, value))
    if context.task_id:
        keys.append(RollupKey(None, "task", context.task_id))  # its lifetime total: task_totals()
    return keys


class CostRecorder:
    """Emits each call's cost as EMF and buffers it for the roll-up (`store`; None: EMF only)."""

    def __init__(
        self,
        namespace: str = "EmbeddingService",
        sink: Callable[[dict], None] = print_emf,
        store: RollupStore | Callable[[], RollupStore] | None = None,
        *,
        max_buffered: int = DEFAULT_MAX_BUFFERED_ITEMS,
        clock: Callable[[], float] = time.time,
    ):
        self.namespace = namespace
        self.sink = sink  # where EMF blobs go: stdout in Lambda, a file in the local stack, a list in tests
        # The roll-up, or a getter building it on the first flush (nothing connects until then).
        self._store = store
        self.max_buffered = max_buffered
        self.clock = clock
        self._totals: dict[tuple[str, str], CostTotals] = defaultdict(CostTotals)
        self._buffer: dict[RollupKey, RollupDelta] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def record(
        self,
        *,
        model: str,
        provider: str,
        tokens: int,
        price_per_million: float,
        context: CallContext,
        requests: int = 1,
    ) -> float:
        """Emit one provider call's tokens and cost (or one owner's share of it); returns the cost in dollars."""
        cost = tokens * price_per_million / 1_000_000
        self._emit(
            context,
            model,
            {"Tokens": (tokens, "Count"), "CostUSD": (cost, "None"), "ProviderRequests": (requests, "Count")},
            provider=provider,
        )
        with self._lock:
            totals = self._totals[(context.source, model)]
            totals.requests += requests
            totals.tokens += tokens
            totals.cost_usd += cost
        self._buffer_delta(
            context,
            model,
            RollupDelta(tokens=tokens, nano_usd=nano_usd(tokens, price_per_million), requests=requests),
        )
        return cost

    def record_saved(
        self, *, model: str, tokens: int, price_per_million: float, context: CallContext
    ) -> float:
        """Emit tokens that were not sent to a provider (cache hits, unchanged content); returns the dollars."""
        if tokens <= 0:
            return 0.0
        saved = tokens * price_per_million / 1_000_000
        self._emit(context, model, {"SavedTokens": (tokens, "Count"), "SavedUSD": (saved, "None")})
        with self._lock:
            totals = self._totals[(context.source, model)]
            totals.saved_tokens += tokens
            totals.saved_usd += saved
        self._buffer_delta(
            context,
            model,
            RollupDelta(saved_tokens=tokens, saved_nano_usd=nano_usd(tokens, price_per_million)),
        )
        return saved

    def _emit(
        self,
        context: CallContext,
        model: str,
        metrics: dict[str, tuple[float, str]],
        *,
        provider: str | None = None,
    ) -> None:
        # Written by hand, not through Powertools' provider: it publishes one dimension set per blob.
        blob: dict[str, Any] = {
            "_aws": {
                "Timestamp": int(self.clock() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": self.namespace,
                        "Dimensions": [list(d) for d in COST_DIMENSION_SETS],
                        "Metrics": [{"Name": name, "Unit": unit} for name, (_, unit) in metrics.items()],
                    }
                ],
            },
            "source": context.source,
            "model": model,
        }
        for key, value in (
            ("user_id", context.user_id),
            ("tenant_id", context.tenant_id),
            ("task_id", context.task_id),
            ("provider", provider),
            ("correlation_id", current_correlation_id()),
        ):
            if value:
                blob[key] = value
        for name, (amount, _) in metrics.items():
            blob[name] = [float(amount)]
        with contextlib.suppress(Exception):  # a metric must never fail the call it describes
            self.sink(blob)

    def _buffer_delta(self, context: CallContext, model: str, delta: RollupDelta) -> None:
        if self._store is None:
            return
        now = self.clock()
        big = False
        with self._lock:
            for key in rollup_keys(utc_day(now), context, model):
                item = self._buffer.get(key)
                if item is None:
                    item = self._buffer[key] = RollupDelta()
                item.add(delta)
                if key.dimension == "task":
                    item.add(
                        RollupDelta(first_seen=now, last_seen=now, sources={context.source}, models={model})
                    )
            big = len(self._buffer) >= self.max_buffered
        if big:
            self.flush()

    def pending(self) -> int:
        """Roll-up items waiting for the next flush."""
        with self._lock:
            return len(self._buffer)

    def flush(self) -> FlushOutcome:
        """Write the buffered deltas to the roll-up; never raises (a lost delta is logged with its amount).

        The buffer is taken before writing, so concurrent records go to the next flush, and nothing is
        ever written twice from this process.
        """
        with self._flush_lock:
            with self._lock:
                deltas, self._buffer = self._buffer, {}
            outcome = FlushOutcome(items=len(deltas))
            if not deltas:
                return outcome
            try:
                store = self._resolve_store()
                failed = store.apply(deltas)
            except Exception as exc:  # the store could not even be built: everything is dropped
                logger.warning("cost roll-up unavailable", extra={"error": type(exc).__name__})
                failed = list(deltas)
            if failed:
                lost = [deltas[key] for key in failed if key.day is not None and key.dimension == "source"]
                outcome.dropped = len(failed)
                outcome.dropped_tokens = sum(d.tokens for d in lost)
                outcome.dropped_nano_usd = sum(d.nano_usd for d in lost)
                # EMF still has these (CostUSD by source is exact); the roll-up is short by this much.
                logger.warning(
                    "cost roll-up items not written",
                    extra={
                        "dropped_items": outcome.dropped,
                        "items": outcome.items,
                        "dropped_tokens": outcome.dropped_tokens,
                        "dropped_nano_usd": outcome.dropped_nano_usd,
                    },
                )
            return outcome

    def _resolve_store(self) -> RollupStore:
        store = self._store
        if store is None:
            raise RuntimeError("no roll-up store")
        if not hasattr(store, "apply"):
            store = self._store = store()  # type: ignore[operator]
        return store  # type: ignore[return-value]

    def close(self) -> None:
        """Flush what is left (the container calls this on reset: the local stack's and the CLI's exit)."""
        self.flush()

    def totals(self) -> dict[tuple[str, str], CostTotals]:
        """What this process has spent and saved, by (source, model): for the CLI, the demo and benchmarks."""
        with self._lock:
            return {
                key: CostTotals(t.requests, t.tokens, t.cost_usd, t.saved_tokens, t.saved_usd)
                for key, t in self._totals.items()
            }


Handler = TypeVar("Handler", bound=Callable[..., Any])


def flush_costs(handler: Handler) -> Handler:
    """Decorate a Lambda handler: its costs reach the roll-up before the invocation ends (Lambda freezes the
    process once it is done). A failed flush is logged, never raised: the request's answer stands.

    Where the post-response extension runs (the API: `embedsvc.post_response`), the handler only reports
    the request done and the extension writes the roll-up after the answer has left; elsewhere the
    handler writes it before returning."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        finally:
            with contextlib.suppress(Exception):
                _after_invocation(kwargs.get("context", args[1] if len(args) > 1 else None))

    return wrapper  # type: ignore[return-value]


def _after_invocation(lambda_context: Any) -> None:
    from embedsvc import container, post_response

    flusher = post_response.current()
    request_id = getattr(lambda_context, "aws_request_id", None)
    if flusher is not None and request_id:
        flusher.request_done(str(request_id))
        return
    container.costs().flush()


# ---- correlation ids ----

MAX_CORRELATION_ID = 128
_SAFE_ID = re.compile(r"[A-Za-z0-9._:/=+@-]+")
_correlation: ContextVar[str | None] = ContextVar("embedsvc_correlation_id", default=None)


def clean_correlation_id(value: object) -> str | None:
    """A correlation id fit for logs and messages: printable id characters only, at most 128; else None."""
    if not isinstance(value, str):
        return None
    value = value.strip()[:MAX_CORRELATION_ID]
    return value if value and _SAFE_ID.fullmatch(value) else None


def new_correlation_id(prefix: str = "run") -> str:
    """A fresh id for a run nobody else named (a scheduled repair, an audit)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def current_correlation_id() -> str | None:
    """The correlation id bound in this context (thread or task), if any."""
    return _correlation.get()


def bind_correlation(correlation_id: str | None, *, logger: Any = None, tracer: Any = None) -> str | None:
    """Make `correlation_id` this context's: for new queue messages, cost records, log lines and the trace."""
    _correlation.set(correlation_id)
    if logger is not None:
        logger.set_correlation_id(correlation_id)
    if tracer is not None and correlation_id:
        with contextlib.suppress(Exception):  # an annotation outside a segment must not fail the handler
            tracer.put_annotation(key="correlation_id", value=correlation_id)
    return correlation_id


def correlation_from_api_event(event: Mapping[str, Any]) -> str:
    """The caller's X-Correlation-Id when usable, else API Gateway's request id (else a new id)."""
    headers = event.get("headers") or {}
    for name, value in headers.items():
        if name.lower() == "x-correlation-id" and (usable := clean_correlation_id(value)):
            return usable
    request_id = (event.get("requestContext") or {}).get("requestId")
    return clean_correlation_id(request_id) or new_correlation_id("req")


def correlation_from_event(event: Any, *, prefix: str = "run") -> str:
    """The correlation id of a state machine task or scheduled run.

    A state machine passes its execution name (`"correlation_id.$": "$$.Execution.Name"`, or the context
    object's `Execution`); a scheduled run has none, and gets a generated one per run.
    """
    if isinstance(event, Mapping):
        candidates: list[object] = [event.get("correlation_id"), event.get("execution_name")]
        for key in ("Execution", "execution"):
            execution = event.get(key)
            if isinstance(execution, Mapping):
                candidates += [execution.get("Name"), execution.get("name")]
            elif isinstance(execution, str):
                # An execution ARN: its last segment is the execution's name.
                candidates.append(execution.rsplit(":", 1)[-1])
        for candidate in candidates:
            if usable := clean_correlation_id(candidate):
                return usable
    return new_correlation_id(prefix)


def correlation_from_message_body(body: str | None) -> str | None:
    """The `correlation_id` of an IndexQueue message body, if it has a usable one."""
    if not body:
        return None
    try:
        raw = json.loads(body)
    except ValueError:
        return None
    return clean_correlation_id(raw.get("correlation_id")) if isinstance(raw, dict) else None


class OpsMetrics:
    """Operational counters as CloudWatch EMF (ledger errors, fallback grants, dead letters), one record each.

    Written by hand rather than through Powertools: these carry only the dimensions named here (an alarm
    matches a metric by its exact dimension set), and are rare enough that one record per event is cheap.
    """

    def __init__(self, namespace: str = "EmbeddingService", sink: Callable[[dict], None] = print_emf):
        self.namespace = namespace
        self.sink = sink

    def count(self, name: str, value: float = 1, **dimensions: str) -> None:
        """Emit `value` of the Count metric `name` with exactly these dimensions."""
        blob: dict = {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": self.namespace,
                        "Dimensions": [sorted(dimensions)],
                        "Metrics": [{"Name": name, "Unit": "Count"}],
                    }
                ],
            },
            name: value,
            **dimensions,
        }
        with contextlib.suppress(Exception):  # a metric must never fail the call it describes
            self.sink(blob)
