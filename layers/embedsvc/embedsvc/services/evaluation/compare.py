"""Run against baseline: the evaluation gate of a migration, and its CloudWatch metrics.

A metric regresses when it drops by more than `max_drop_points` (metric x 100) AND a paired
randomization test over the per-query values says the drop is unlikely to be noise (p < alpha).
Both conditions are required on purpose:
- the threshold alone would fail a migration on a handful of queries that happened to move (a
  20-point drop on 5 queries is one or two queries changing their first hit; with 5 queries the
  smallest two-sided p a sign-flip test can reach is 2/32 = 0.0625, so such a gate cannot fail at
  alpha = 0.05 — by design: a ground truth that small cannot tell a model change from noise, and the
  comparison reports the drop as `dropped_not_significant` for a person to look at);
- significance alone would fail on a real but negligible drop (0.5 points over 5,000 queries).
The test is two-sided (it does not presume which run is better) and is not corrected for the five
metrics being tested together: they are strongly correlated, and a gate should rather err towards
stopping a migration than letting a regression through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedsvc.services.evaluation.metrics import GATE_METRICS
from embedsvc.services.evaluation.runs import Run

NAMESPACE = "EmbeddingService"
REGRESSION_METRIC = "EvaluationRegression"
DEFAULT_ROUNDS = 10_000
# Bounds the sign matrix of one vectorised batch (rows x queries) to about 16 MB of float64.
_BATCH_CELLS = 2_000_000


def paired_randomization_test(
    old: Sequence[float] | np.ndarray,
    new: Sequence[float] | np.ndarray,
    *,
    rounds: int = DEFAULT_ROUNDS,
    seed: int = 0,
) -> float:
    """Two-sided p-value of the mean paired difference under random sign flips (exact when 2**n <= rounds)."""
    a = np.asarray(old, dtype=np.float64)
    b = np.asarray(new, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("old and new must be 1-D and of the same length")
    diff = b - a
    n = diff.size
    if n == 0:
        return 1.0
    observed = abs(float(diff.sum()))
    # Sums that equal the observed one up to float noise count as "as extreme" (identity flip included).
    tol = 1e-9 * max(1.0, float(np.abs(diff).sum()))
    if observed <= tol:
        return 1.0
    if n < 63 and 2**n <= rounds:
        # Few queries: enumerate every sign assignment; the exact p beats a noisy estimate of it.
        codes = np.arange(2**n, dtype=np.int64)[:, None]
        signs = ((codes >> np.arange(n, dtype=np.int64)) & 1) * 2 - 1
        sums = np.abs(signs.astype(np.float64) @ diff)
        return float(np.count_nonzero(sums >= observed - tol)) / 2**n
    rng = np.random.default_rng(seed)
    batch = max(1, _BATCH_CELLS // n)
    extreme = 0
    done = 0
    while done < rounds:
        size = min(batch, rounds - done)
        signs = np.where(rng.random((size, n)) < 0.5, -1.0, 1.0)
        extreme += int(np.count_nonzero(np.abs(signs @ diff) >= observed - tol))
        done += size
    # +1/+1: the observed assignment is one of the permutations (keeps p > 0, a valid test).
    return (extreme + 1) / (rounds + 1)


@dataclass(frozen=True)
class MetricComparison:
    """One metric, old vs new, on the queries both runs share."""

    metric: str
    old: float
    new: float
    delta_points: float
    p_value: float
    regressed: bool
    dropped: bool  # dropped by more than the allowed points (significant or not)
    alpha: float = 0.05

    @property
    def status(self) -> str:
        """`regressed`, `dropped_not_significant`, `improved` (significant gain) or `ok`."""
        if self.regressed:
            return "regressed"
        if self.dropped:
            return "dropped_not_significant"
        if self.delta_points > 0 and self.p_value < self.alpha:
            return "improved"
        return "ok"


@dataclass
class Comparison:
    """The gate's verdict on a new run against an old (baseline) run."""

    old_run_id: str
    new_run_id: str
    old_model: str
    new_model: str
    ground_truth: str
    queries: int
    metrics: dict[str, MetricComparison]
    max_drop_points: float
    alpha: float
    rounds: int
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        """Metrics that regressed."""
        return [m for m, c in self.metrics.items() if c.regressed]

    @property
    def passed(self) -> bool:
        """False if any metric regressed."""
        return not self.regressions

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "passed": self.passed,
            "regressions": self.regressions,
            "old_run_id": self.old_run_id,
            "new_run_id": self.new_run_id,
            "old_model": self.old_model,
            "new_model": self.new_model,
            "ground_truth": self.ground_truth,
            "queries": self.queries,
            "max_drop_points": self.max_drop_points,
            "alpha": self.alpha,
            "rounds": self.rounds,
            "seed": self.seed,
            "notes": self.notes,
            "metrics": {
                m: {
                    "old": c.old,
                    "new": c.new,
                    "delta_points": c.delta_points,
                    "p_value": c.p_value,
                    "status": c.status,
                }
                for m, c in self.metrics.items()
            },
        }

    def format_table(self) -> str:
        """A plain-text table for terminals and logs."""
        lines = [
            f"baseline {self.old_run_id} ({self.old_model}) -> {self.new_run_id} ({self.new_model})",
            f"{self.queries} shared queries; a metric fails when it drops > {self.max_drop_points:g} points "
            f"with p < {self.alpha:g} (paired randomization test)",
            f"{'metric':<16}{'baseline':>10}{'new':>10}{'delta pts':>11}{'p':>9}  status",
        ]
        for m, c in self.metrics.items():
            lines.append(
                f"{m:<16}{c.old:>10.4f}{c.new:>10.4f}{c.delta_points:>+11.2f}{c.p_value:>9.4f}  {c.status}"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append("gate: PASSED" if self.passed else f"gate: FAILED ({', '.join(self.regressions)})")
        return "\n".join(lines)


def compare(
    old_run: Run,
    new_run: Run,
    *,
    max_drop_points: float = 3.0,
    alpha: float = 0.05,
    seed: int = 0,
    rounds: int = DEFAULT_ROUNDS,
    metrics: Sequence[str] = GATE_METRICS,
) -> Comparison:
    """Compare a new run with the old (baseline) one on their shared queries; see the module doc."""
    shared = sorted(set(old_run.per_query) & set(new_run.per_query))
    if not shared:
        raise ValueError(
            f"runs {old_run.run_id} and {new_run.run_id} share no evaluated query: are they on the same ground truth?"
        )
    notes: list[str] = []
    if old_run.ground_truth != new_run.ground_truth:
        notes.append(f"ground truths differ: {old_run.ground_truth} vs {new_run.ground_truth}")
    if bool(old_run.params.get("exclude_self")) != bool(new_run.params.get("exclude_self")):
        notes.append("exclude_self differs between the runs: the numbers are not comparable")
    if len(shared) < max(old_run.queries, new_run.queries):
        notes.append(
            f"compared on {len(shared)} shared queries (baseline has {old_run.queries}, new run {new_run.queries})"
        )
    out: dict[str, MetricComparison] = {}
    for m in metrics:
        for run in (old_run, new_run):
            if any(m not in run.per_query[q] for q in shared):
                raise ValueError(f"run {run.run_id} has no per-query '{m}'")
        a = np.array([old_run.per_query[q][m] for q in shared], dtype=np.float64)
        b = np.array([new_run.per_query[q][m] for q in shared], dtype=np.float64)
        old_mean = math.fsum(a) / len(a)
        new_mean = math.fsum(b) / len(b)
        delta = (new_mean - old_mean) * 100.0
        p = paired_randomization_test(a, b, rounds=rounds, seed=seed)
        dropped = delta < -max_drop_points
        out[m] = MetricComparison(
            metric=m,
            old=old_mean,
            new=new_mean,
            delta_points=delta,
            p_value=p,
            regressed=dropped and p < alpha,
            dropped=dropped,
            alpha=alpha,
        )
    comparison = Comparison(
        old_run_id=old_run.run_id,
        new_run_id=new_run.run_id,
        old_model=old_run.model_key,
        new_model=new_run.model_key,
        ground_truth=new_run.ground_truth,
        queries=len(shared),
        metrics=out,
        max_drop_points=max_drop_points,
        alpha=alpha,
        rounds=rounds,
        seed=seed,
        notes=notes,
    )
    small = [m for m, c in out.items() if c.dropped and not c.regressed]
    if small:
        comparison.notes.append(
            f"{', '.join(small)} dropped by more than {max_drop_points:g} points, but not significantly "
            f"on {len(shared)} queries: look before trusting either run"
        )
    return comparison


def cloudwatch_metric_data(
    run: Run,
    comparison: Comparison | None = None,
    *,
    content_type: str | None = None,
    metrics: Sequence[str] = GATE_METRICS,
) -> list[dict[str, Any]]:
    """The MetricData entries `publish_to_cloudwatch` sends (values are fractions in [0, 1])."""
    scope = content_type or run.content_type
    data: list[dict[str, Any]] = [
        {
            "MetricName": m,
            "Dimensions": [
                {"Name": "ContentType", "Value": scope},
                {"Name": "Model", "Value": run.model_key},
            ],
            "Value": float(run.aggregate[m]),
            "Unit": "None",
        }
        for m in metrics
        if m in run.aggregate
    ]
    # Sent on every evaluation, 0 without a baseline: an alarm on it can then treat missing data
    # as "the weekly evaluation did not run" instead of as "fine".
    regressed = comparison is not None and not comparison.passed
    data.append(
        {
            "MetricName": REGRESSION_METRIC,
            "Dimensions": [{"Name": "ContentType", "Value": scope}],
            "Value": 1.0 if regressed else 0.0,
            "Unit": "Count",
        }
    )
    return data


def publish_to_cloudwatch(
    cloudwatch: Any,
    run: Run,
    comparison: Comparison | None = None,
    *,
    content_type: str | None = None,
    namespace: str = NAMESPACE,
    metrics: Sequence[str] = GATE_METRICS,
) -> list[dict[str, Any]]:
    """Put the run's metrics (dims ContentType, Model) and EvaluationRegression (dim ContentType)."""
    if comparison is not None and comparison.new_run_id != run.run_id:
        raise ValueError(f"the comparison is about run {comparison.new_run_id}, not {run.run_id}")
    data = cloudwatch_metric_data(run, comparison, content_type=content_type, metrics=metrics)
    # 20 per call is the oldest PutMetricData limit; staying under it works on every endpoint (and moto).
    for start in range(0, len(data), 20):
        cloudwatch.put_metric_data(Namespace=namespace, MetricData=data[start : start + 20])
    return data


def gate_record(baseline: Run, comparison: Comparison) -> dict:
    """What a stored run keeps of its gate: passed or failed, against which baseline, and why."""
    return {
        "passed": comparison.passed,
        "baseline_run_id": baseline.run_id,
        "regressions": comparison.regressions,
    }
