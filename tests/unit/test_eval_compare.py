"""The evaluation gate: deltas in points, the paired randomization test, and CloudWatch publishing."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import boto3
import numpy as np
import pytest
from moto import mock_aws

from embedsvc.services.evaluation.compare import (
    REGRESSION_METRIC,
    cloudwatch_metric_data,
    compare,
    paired_randomization_test,
    publish_to_cloudwatch,
)
from embedsvc.services.evaluation.metrics import GATE_METRICS
from embedsvc.services.evaluation.runs import Run


def make_run(values: dict[str, np.ndarray], *, model: str = "minilm", run_id: str = "") -> Run:
    """A run whose per-query value of metric m for query i is values[m][i]."""
    n = len(next(iter(values.values())))
    per_query = {f"q{i}": {m: float(v[i]) for m, v in values.items()} for i in range(n)}
    aggregate = {m: float(np.mean(v)) for m, v in values.items()}
    return Run(
        model_key=model,
        collection=f"scifact_{model}",
        ground_truth="scifact/train",
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        results={},
        per_query=per_query,
        aggregate=aggregate,
        run_id=run_id,
    )


def baseline_values(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.uniform(0.2, 0.9, n) for m in GATE_METRICS}


def shifted(
    values: dict[str, np.ndarray], mean_drop: float, noise: float, seed: int = 2
) -> dict[str, np.ndarray]:
    """Per-query values moved by -mean_drop on average, with per-query noise (queries move differently)."""
    rng = np.random.default_rng(seed)
    out = {}
    for m, v in values.items():
        delta = rng.normal(0.0, noise, v.size)
        delta += -mean_drop - delta.mean()  # exactly mean_drop on average, so the test is about the gate
        out[m] = v + delta
    return out


def test_five_point_drop_on_300_queries_fails_the_gate() -> None:
    old_values = baseline_values(300)
    old = make_run(old_values, run_id="old")
    new = make_run(shifted(old_values, 0.05, 0.2), model="te3s", run_id="new")
    result = compare(old, new)
    assert not result.passed
    assert result.regressions == list(GATE_METRICS)
    for c in result.metrics.values():
        assert c.delta_points == pytest.approx(-5.0)
        assert c.p_value < 0.01
        assert c.status == "regressed"
    assert "gate: FAILED" in result.format_table()


def test_one_point_wobble_passes_even_when_significant() -> None:
    old_values = baseline_values(300)
    old = make_run(old_values, run_id="old")
    # almost no noise: a 1-point drop that is highly significant but within the allowed 3 points
    new = make_run(shifted(old_values, 0.01, 0.01), run_id="new")
    result = compare(old, new)
    assert result.passed
    for c in result.metrics.values():
        assert c.delta_points == pytest.approx(-1.0)
        assert c.p_value < 0.001
        assert c.status == "ok"


def test_big_drop_on_a_handful_of_queries_without_significance_passes() -> None:
    # Chosen behaviour (see compare.py): 5 queries cannot tell a model change from noise. With 5
    # queries the smallest two-sided sign-flip p is 2/32 = 0.0625 > 0.05, so the gate passes and
    # the drop is flagged for a person instead.
    old = make_run({m: np.array([1.0, 1.0, 0.5, 1.0, 0.8]) for m in GATE_METRICS}, run_id="old")
    new = make_run({m: np.array([0.0, 1.0, 0.2, 0.5, 0.3]) for m in GATE_METRICS}, run_id="new")
    result = compare(old, new)
    assert result.passed
    for c in result.metrics.values():
        assert c.delta_points == pytest.approx(-46.0)
        assert c.p_value == pytest.approx(2 / 16)  # exact: 4 non-zero differences -> 2 of 16 as extreme
        assert c.status == "dropped_not_significant"
    assert any("not significantly" in note for note in result.notes)


def test_improvement_passes_and_is_labelled() -> None:
    old_values = baseline_values(200)
    result = compare(make_run(old_values), make_run(shifted(old_values, -0.06, 0.1)))
    assert result.passed
    assert {c.status for c in result.metrics.values()} == {"improved"}


def test_threshold_and_alpha_are_parameters() -> None:
    old_values = baseline_values(300)
    old, new = make_run(old_values), make_run(shifted(old_values, 0.02, 0.05))
    assert compare(old, new).passed
    assert not compare(old, new, max_drop_points=1.0).passed
    assert compare(old, new, max_drop_points=1.0, alpha=1e-12).passed


def test_comparison_uses_only_shared_queries() -> None:
    old_values = baseline_values(50)
    old = make_run(old_values)
    new = make_run({m: v[:40] for m, v in old_values.items()})
    result = compare(old, new)
    assert result.queries == 40
    assert all(c.delta_points == 0.0 and c.p_value == 1.0 for c in result.metrics.values())
    assert any("40 shared queries" in note for note in result.notes)


def test_no_shared_queries_is_an_error() -> None:
    old = make_run(baseline_values(3))
    new = make_run(baseline_values(3))
    new.per_query = {f"other{i}": v for i, v in enumerate(new.per_query.values())}
    with pytest.raises(ValueError, match="share no evaluated query"):
        compare(old, new)


def test_comparison_to_dict_is_json_ready() -> None:
    old_values = baseline_values(30)
    d = compare(make_run(old_values, run_id="a"), make_run(old_values, run_id="b")).to_dict()
    assert d["passed"] is True and d["old_run_id"] == "a" and d["new_run_id"] == "b"
    assert set(d["metrics"]) == set(GATE_METRICS)
    assert set(d["metrics"]["ndcg_at_10"]) == {"old", "new", "delta_points", "p_value", "status"}


# --- the test itself -----------------------------------------------------------------------------


def brute_force_p(diff: np.ndarray) -> float:
    observed = abs(diff.sum())
    signs = itertools.product((-1.0, 1.0), repeat=diff.size)
    extreme = sum(1 for s in signs if abs(np.dot(s, diff)) >= observed - 1e-12)
    return extreme / 2**diff.size


def test_exact_test_for_small_n_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    for n in (1, 3, 7, 10):
        a, b = rng.uniform(size=n), rng.uniform(size=n)
        assert paired_randomization_test(a, b) == pytest.approx(brute_force_p(b - a))
    assert paired_randomization_test([0, 0, 0], [1, 1, 1]) == pytest.approx(0.25)


def test_sampled_test_is_close_to_exact_and_seeded() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.uniform(size=15), rng.uniform(size=15) + 0.15  # 2**15 > 10,000 rounds: sampled
    exact = brute_force_p(b - a)
    p = paired_randomization_test(a, b, seed=3)
    assert p == pytest.approx(exact, abs=0.015)
    assert paired_randomization_test(a, b, seed=3) == p
    assert paired_randomization_test(a, b, seed=4) != p


def test_p_value_edge_cases() -> None:
    assert paired_randomization_test([], []) == 1.0
    assert paired_randomization_test([0.3, 0.5], [0.3, 0.5]) == 1.0
    with pytest.raises(ValueError):
        paired_randomization_test([1.0], [1.0, 2.0])


def test_large_run_is_fast_enough() -> None:
    # 3,000 queries (the Bible topics size) x 10,000 rounds, vectorised in batches
    rng = np.random.default_rng(0)
    a = rng.uniform(size=3000)
    p = paired_randomization_test(a, a - 0.001 + rng.normal(0, 0.1, 3000))
    assert 0.0 < p <= 1.0


# --- CloudWatch ----------------------------------------------------------------------------------


def test_cloudwatch_metric_data_shape() -> None:
    old_values = baseline_values(300)
    old = make_run(old_values, run_id="old")
    new = make_run(shifted(old_values, 0.05, 0.2), model="te3s", run_id="new")
    data = cloudwatch_metric_data(new, compare(old, new))
    by_name = {d["MetricName"]: d for d in data}
    assert set(by_name) == {*GATE_METRICS, REGRESSION_METRIC}
    assert by_name["ndcg_at_10"]["Dimensions"] == [
        {"Name": "ContentType", "Value": "scifact"},
        {"Name": "Model", "Value": "te3s"},
    ]
    assert by_name[REGRESSION_METRIC] == {
        "MetricName": REGRESSION_METRIC,
        "Dimensions": [{"Name": "ContentType", "Value": "scifact"}],
        "Value": 1.0,
        "Unit": "Count",
    }
    assert cloudwatch_metric_data(new)[-1]["Value"] == 0.0  # no baseline: published as 0


@mock_aws
def test_publish_to_cloudwatch_under_moto() -> None:
    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")
    old_values = baseline_values(300)
    old = make_run(old_values, run_id="old")
    new = make_run(shifted(old_values, 0.05, 0.2), model="te3s", run_id="new")
    publish_to_cloudwatch(cloudwatch, new, compare(old, new), content_type="verses")
    metrics = cloudwatch.list_metrics(Namespace="EmbeddingService")["Metrics"]
    names = {m["MetricName"] for m in metrics}
    assert names == {*GATE_METRICS, REGRESSION_METRIC}
    regression = next(m for m in metrics if m["MetricName"] == REGRESSION_METRIC)
    assert regression["Dimensions"] == [{"Name": "ContentType", "Value": "verses"}]


def test_publish_refuses_a_comparison_about_another_run() -> None:
    old_values = baseline_values(10)
    comparison = compare(make_run(old_values, run_id="a"), make_run(old_values, run_id="b"))

    class Recorder:
        def put_metric_data(self, **kwargs: object) -> None:
            raise AssertionError("must not publish")

    with pytest.raises(ValueError, match="not c"):
        publish_to_cloudwatch(Recorder(), make_run(old_values, run_id="c"), comparison)
