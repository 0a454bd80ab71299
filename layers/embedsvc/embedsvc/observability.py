"""Cost attribution: every provider call emits tokens and dollars as CloudWatch EMF.

Dimensions are low-cardinality only (`source`, `model`); the user, tenant and task ride along as
EMF properties, searchable with Logs Insights without multiplying metric costs.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider


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


def print_emf(blob: dict) -> None:
    """In Lambda, a JSON line on stdout is how EMF reaches CloudWatch."""
    print(json.dumps(blob, separators=(",", ":")), flush=True)


class CostRecorder:
    def __init__(self, namespace: str = "EmbeddingService", sink: Callable[[dict], None] = print_emf):
        self.namespace = namespace
        self.sink = sink  # where EMF blobs go: stdout in Lambda, a file in the local stack, a list in tests
        self._totals: dict[tuple[str, str], CostTotals] = defaultdict(CostTotals)
        self._lock = threading.Lock()

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
        emf = AmazonCloudWatchEMFProvider(namespace=self.namespace)
        emf.service = None  # type: ignore[assignment]  # no implicit "service" dimension: dimensions stay (source, model)
        emf.add_dimension("source", context.source)
        emf.add_dimension("model", model)
        emf.add_metric("Tokens", MetricUnit.Count, tokens)
        emf.add_metric("CostUSD", MetricUnit.NoUnit, cost)
        emf.add_metric("ProviderRequests", MetricUnit.Count, requests)
        for key, value in (
            ("user_id", context.user_id),
            ("tenant_id", context.tenant_id),
            ("task_id", context.task_id),
            ("provider", provider),
        ):
            if value:
                emf.add_metadata(key, value)
        self.sink(dict(emf.serialize_metric_set()))
        with self._lock:
            totals = self._totals[(context.source, model)]
            totals.requests += requests
            totals.tokens += tokens
            totals.cost_usd += cost
        return cost

    def totals(self) -> dict[tuple[str, str], CostTotals]:
        """What this process has spent, by (source, model): for the CLI, the demo and benchmarks."""
        with self._lock:
            return {key: CostTotals(t.requests, t.tokens, t.cost_usd) for key, t in self._totals.items()}


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
