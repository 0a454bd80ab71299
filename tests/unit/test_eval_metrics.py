"""trec_eval metric definitions against hand-computed tables."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedsvc.services.evaluation.metrics import (
    DEFAULT_METRICS,
    GATE_METRICS,
    evaluate_results,
    hit_at,
    max_cutoff,
    metric_value,
    mrr_at,
    ndcg_at,
    parse_metric,
    precision_at,
    rank,
    recall_at,
)

L2 = math.log2

# One query, binary judgements: relevant a, c, x (x never retrieved). Ranking: a b c d e f.
RANKED = ["a", "b", "c", "d", "e", "f"]
BINARY = {"a": 1, "c": 1, "x": 1, "b": 0}


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("recall_at_1", 1 / 3),
        ("recall_at_2", 1 / 3),
        ("recall_at_5", 2 / 3),
        ("recall_at_10", 2 / 3),
        ("precision_at_1", 1.0),
        ("precision_at_5", 2 / 5),
        ("precision_at_10", 2 / 10),  # divides by k although only 6 results exist
        ("mrr_at_10", 1.0),
        ("hit_at_1", 1.0),
        ("hit_at_5", 1.0),
        # DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal: three relevant at ranks 1-3.
        ("ndcg_at_10", 1.5 / (1 + 1 / L2(3) + 1 / L2(4))),
        ("ndcg_at_2", 1.0 / (1 + 1 / L2(3))),
    ],
)
def test_binary_table(metric: str, expected: float) -> None:
    assert metric_value(metric, RANKED, BINARY) == pytest.approx(expected, abs=1e-15)


# Graded judgements (linear gain = grade): ideal order 3, 2, 1.
GRADED = {"g3": 3, "g2": 2, "g1": 1, "n0": 0}


@pytest.mark.parametrize(
    ("ranked", "k", "expected"),
    [
        (["g3", "g2", "g1"], 10, 1.0),
        (["g1", "g2", "g3"], 10, (1 + 2 / L2(3) + 3 / L2(4)) / (3 + 2 / L2(3) + 1 / L2(4))),
        (["n0", "g3"], 10, (3 / L2(3)) / (3 + 2 / L2(3) + 1 / L2(4))),
        # at k=1 the ideal is only the grade-3 document
        (["g2", "g3"], 1, 2 / 3),
        (["zz", "n0"], 10, 0.0),
        ([], 10, 0.0),
    ],
)
def test_graded_ndcg_table(ranked: list[str], k: int, expected: float) -> None:
    assert ndcg_at(ranked, GRADED, k) == pytest.approx(expected, abs=1e-15)


def test_ideal_dcg_uses_all_judged_relevant_even_unretrieved() -> None:
    # one of 12 relevant documents retrieved at rank 1: the ideal fills all 10 ranks
    judgements = {f"d{i}": 1 for i in range(12)}
    ideal = sum(1 / L2(r + 1) for r in range(1, 11))
    assert ndcg_at(["d0"], judgements, 10) == pytest.approx(1 / ideal)


def test_mrr_counts_only_within_cutoff() -> None:
    ranked = [f"n{i}" for i in range(10)] + ["a"]
    assert mrr_at(ranked, {"a": 1}, 10) == 0.0
    assert mrr_at(ranked, {"a": 1}, 11) == pytest.approx(1 / 11)
    assert mrr_at(["n", "n2", "a"], {"a": 1}, 10) == pytest.approx(1 / 3)


def test_recall_is_not_hit() -> None:
    judgements = {"a": 1, "b": 1, "c": 1, "d": 1}
    assert recall_at(["a", "z"], judgements, 5) == 0.25
    assert hit_at(["a", "z"], judgements, 5) == 1.0


def test_fewer_results_than_k() -> None:
    assert precision_at(["a"], {"a": 1}, 5) == 0.2
    assert recall_at(["a"], {"a": 1, "b": 1}, 5) == 0.5
    assert precision_at([], {"a": 1}, 5) == 0.0


def test_negative_grade_is_not_relevant_and_has_no_gain() -> None:
    judgements = {"a": -1, "b": 2}
    assert recall_at(["a"], judgements, 5) == 0.0
    assert ndcg_at(["a", "b"], judgements, 10) == pytest.approx((2 / L2(3)) / 2)


# --- ranking order -------------------------------------------------------------------------------


def test_rank_sorts_by_score_then_doc_id_descending() -> None:
    results = [("a", 0.5), ("c", 0.5), ("b", 0.5), ("z", 0.1), ("top", 0.9)]
    assert rank(results) == ["top", "c", "b", "a", "z"]


def test_rank_ignores_input_order() -> None:
    assert rank([("b", 1.0), ("a", 2.0)]) == rank([("a", 2.0), ("b", 1.0)]) == ["a", "b"]


def test_rank_compares_scores_at_float32_precision_like_trec_eval() -> None:
    # 0.5 + 1e-9 and 0.5 are one float32: trec_eval ties them and the larger id wins
    assert rank([("a", 0.5 + 1e-9), ("b", 0.5)]) == ["b", "a"]
    assert rank([("a", 0.5 + 1e-6), ("b", 0.5)]) == ["a", "b"]


def test_rank_is_bytewise_on_ids() -> None:
    # strcmp order: "B" < "a" < "é" (UTF-8 bytes), so descending is é, a, B
    assert rank([("a", 1.0), ("B", 1.0), ("é", 1.0)]) == ["é", "a", "B"]


def test_ties_change_metrics_as_trec_eval_does() -> None:
    # relevant "a" ties with "b" at the top: "b" ranks first, so MRR is 1/2
    assert metric_value("mrr_at_10", rank([("a", 1.0), ("b", 1.0)]), {"a": 1}) == 0.5


def test_rank_excludes_self_before_cutting() -> None:
    assert rank([("q", 0.99), ("a", 0.5), ("b", 0.4)], exclude="q") == ["a", "b"]


def test_rank_rejects_duplicates_and_nan() -> None:
    with pytest.raises(ValueError, match="twice"):
        rank([("a", 1.0), ("a", 0.5)])
    with pytest.raises(ValueError, match="NaN"):
        rank([("a", float("nan"))])


# --- whole result sets ---------------------------------------------------------------------------


def test_evaluate_results_averages_only_queries_with_relevant_documents() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    results = {"q1": [("a", 0.9)], "q2": [("x", 0.9), ("b", 0.8)], "q3": [("c", 0.9)]}
    ev = evaluate_results(results, qrels, metrics=("mrr_at_10", "recall_at_5"))
    assert ev.skipped == ["q3"]
    assert ev.queries == 2
    assert ev.per_query["q1"] == {"mrr_at_10": 1.0, "recall_at_5": 1.0}
    assert ev.per_query["q2"]["mrr_at_10"] == 0.5
    assert ev.aggregate == {"mrr_at_10": 0.75, "recall_at_5": 1.0}


def test_query_without_results_scores_zero() -> None:
    ev = evaluate_results({"q1": [("a", 1.0)]}, {"q1": {"a": 1}, "q2": {"b": 1}}, metrics=("hit_at_5",))
    assert ev.per_query["q2"] == {"hit_at_5": 0.0}
    assert ev.aggregate["hit_at_5"] == 0.5


def test_exclude_self_drops_the_query_id_before_cutting() -> None:
    # verse-to-verse: the query verse is its own best match and would fill rank 1
    qrels = {"Gen.1.1": {"John.1.1": 1}}
    results = {
        "Gen.1.1": [("Gen.1.1", 1.0)] + [(f"x{i}", 0.9 - i / 100) for i in range(4)] + [("John.1.1", 0.1)]
    }
    kept = evaluate_results(results, qrels, metrics=("recall_at_5", "mrr_at_10"))
    dropped = evaluate_results(results, qrels, metrics=("recall_at_5", "mrr_at_10"), exclude_self=True)
    assert kept.per_query["Gen.1.1"] == {"recall_at_5": 0.0, "mrr_at_10": 1 / 6}
    assert dropped.per_query["Gen.1.1"] == {"recall_at_5": 1.0, "mrr_at_10": 1 / 5}


def test_irrelevant_passages_in_top_k_are_reported_per_query() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    results = {
        "q1": [("bad", 0.9), ("a", 0.8)],
        "q2": [("b", 0.9)] + [(f"n{i}", 0.5 - i / 100) for i in range(12)],
    }
    irrelevant = {"q1": {"bad"}, "q2": {"n11"}}  # n11 is at rank 13: not reported
    ev = evaluate_results(results, qrels, irrelevant=irrelevant, metrics=("hit_at_5",))
    assert ev.irrelevant_hits == {"q1": [("bad", 1)]}


def test_metric_names() -> None:
    assert parse_metric("ndcg_at_10") == ("ndcg", 10)
    assert max_cutoff(DEFAULT_METRICS) == 10
    assert set(GATE_METRICS) <= set(DEFAULT_METRICS)
    for bad in ("ndcg@10", "map_at_10", "recall_at_0"):
        with pytest.raises(ValueError, match="unknown metric"):
            parse_metric(bad)


# --- properties ----------------------------------------------------------------------------------

doc_ids = st.sampled_from([f"d{i}" for i in range(15)])
judgement_sets = st.dictionaries(doc_ids, st.integers(min_value=-1, max_value=4), max_size=10)
result_lists = st.lists(
    st.tuples(doc_ids, st.floats(min_value=-1, max_value=1, allow_nan=False)),
    max_size=15,
    unique_by=lambda t: t[0],
)


@settings(max_examples=200, deadline=None)
@given(results=result_lists, judgements=judgement_sets, k=st.integers(min_value=1, max_value=20))
def test_every_metric_is_between_0_and_1(results, judgements, k) -> None:
    ranked = rank(results)
    for kind in ("ndcg", "recall", "precision", "mrr", "hit"):
        value = metric_value(f"{kind}_at_{k}", ranked, judgements)
        assert 0.0 <= value <= 1.0 + 1e-12


@settings(max_examples=200, deadline=None)
@given(results=result_lists, judgements=judgement_sets)
def test_recall_hit_and_mrr_are_monotone_in_k(results, judgements) -> None:
    ranked = rank(results)
    for kind in ("recall", "hit", "mrr"):
        values = [metric_value(f"{kind}_at_{k}", ranked, judgements) for k in range(1, 17)]
        assert values == sorted(values)


@settings(max_examples=100, deadline=None)
@given(results=result_lists, judgements=judgement_sets)
def test_hit_bounds_recall_and_perfect_ranking_scores_one(results, judgements) -> None:
    ranked = rank(results)
    assert recall_at(ranked, judgements, 5) <= hit_at(ranked, judgements, 5)
    ideal = sorted((d for d, g in judgements.items() if g > 0), key=lambda d: -judgements[d])
    if ideal:
        assert ndcg_at(ideal, judgements, 10) == pytest.approx(1.0)
        assert mrr_at(ideal, judgements, 10) == 1.0
