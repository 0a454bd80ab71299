"""Retrieval metrics with trec_eval's definitions, so numbers compare with published tables.

- Ranking: by score descending, ties broken by document id descending, scores compared at float32
  precision (trec_eval's order and precision; the rank column of a run file is ignored, as
  trec_eval ignores it).
- Relevant = judged grade > 0. Recall@k = |rel ∩ top-k| / |rel|; P@k = |rel ∩ top-k| / k, k even
  when fewer than k results came back; MRR@k = 1 / rank of the first relevant in the top k, else 0;
  nDCG@k: gain = grade (linear), discount 1/log2(rank+1), ideal DCG from all judged-relevant
  documents; Hit@k = 1 if any relevant document is in the top k.
- Averages are over the queries with at least one relevant document. A query with no results scores
  0 (trec_eval's `-c`): a search that returns nothing must not improve the average.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# The metrics the migration gate and the published tables use.
GATE_METRICS: tuple[str, ...] = ("ndcg_at_10", "recall_at_5", "precision_at_5", "mrr_at_10", "hit_at_5")
DEFAULT_METRICS: tuple[str, ...] = (*GATE_METRICS, "recall_at_10")

_METRIC_RE = re.compile(r"^(ndcg|recall|precision|mrr|hit)_at_([1-9][0-9]*)$")

Ranked = Sequence[str]
Judgements = Mapping[str, int]


def parse_metric(name: str) -> tuple[str, int]:
    """Split a metric key like `ndcg_at_10` into ("ndcg", 10)."""
    match = _METRIC_RE.match(name)
    if not match:
        raise ValueError(
            f"unknown metric '{name}': use ndcg|recall|precision|mrr|hit _at_<k>, e.g. ndcg_at_10"
        )
    return match.group(1), int(match.group(2))


def max_cutoff(metrics: Iterable[str]) -> int:
    """The deepest rank any of the metrics looks at."""
    return max((parse_metric(m)[1] for m in metrics), default=0)


def rank(results: Iterable[tuple[str, float]], *, exclude: str | None = None) -> list[str]:
    """Document ids in trec_eval order (score desc, then id desc), without `exclude`."""
    ids: list[str] = []
    scores: list[float] = []
    seen: set[str] = set()
    for doc_id, score in results:
        score = float(score)
        if math.isnan(score):
            raise ValueError(f"score of document '{doc_id}' is NaN")
        if doc_id in seen:
            # trec_eval rejects a run that lists a document twice for one query; so do we.
            raise ValueError(f"document '{doc_id}' appears twice in one ranking")
        seen.add(doc_id)
        if doc_id != exclude:
            ids.append(doc_id)
            scores.append(score)
    # trec_eval keeps scores as C float (TEXT_RESULTS.sim): doubles that differ beyond float32
    # precision tie there, and the tie goes to the larger id. Round the same way to rank the same way
    # (a no-op for Qdrant, whose scores are float32 already).
    with np.errstate(over="ignore"):
        keys = np.asarray(scores, dtype=np.float32).tolist()
    # Python compares str by code point, which is the byte order of UTF-8: the same as strcmp.
    order = sorted(zip(keys, ids, strict=True), reverse=True)
    return [doc_id for _, doc_id in order]


def _relevant(judgements: Judgements) -> set[str]:
    return {doc for doc, grade in judgements.items() if grade > 0}


def recall_at(ranked: Ranked, judgements: Judgements, k: int) -> float:
    """|rel ∩ top-k| / |rel| (0 when nothing is relevant)."""
    rel = _relevant(judgements)
    if not rel:
        return 0.0
    return sum(1 for doc in ranked[:k] if doc in rel) / len(rel)


def precision_at(ranked: Ranked, judgements: Judgements, k: int) -> float:
    """|rel ∩ top-k| / k, dividing by k even when fewer than k results exist."""
    rel = _relevant(judgements)
    return sum(1 for doc in ranked[:k] if doc in rel) / k


def mrr_at(ranked: Ranked, judgements: Judgements, k: int) -> float:
    """1 / rank of the first relevant document within the top k, else 0."""
    rel = _relevant(judgements)
    for position, doc in enumerate(ranked[:k], start=1):
        if doc in rel:
            return 1.0 / position
    return 0.0


def hit_at(ranked: Ranked, judgements: Judgements, k: int) -> float:
    """1 if any relevant document is in the top k, else 0."""
    rel = _relevant(judgements)
    return 1.0 if any(doc in rel for doc in ranked[:k]) else 0.0


def dcg_at(gains: Iterable[float], k: int) -> float:
    """Sum of gain / log2(rank + 1) over the first k gains."""
    total = 0.0
    for position, gain in enumerate(gains, start=1):
        if position > k:
            break
        total += gain / math.log2(position + 1)
    return total


def ndcg_at(ranked: Ranked, judgements: Judgements, k: int) -> float:
    """DCG@k / ideal DCG@k with linear gains = grade; the ideal uses every judged-relevant document."""
    ideal = dcg_at(sorted((g for g in judgements.values() if g > 0), reverse=True), k)
    if ideal == 0.0:
        return 0.0
    gains = [max(judgements.get(doc, 0), 0) for doc in ranked[:k]]
    return dcg_at(gains, k) / ideal


_FUNCTIONS = {"ndcg": ndcg_at, "recall": recall_at, "precision": precision_at, "mrr": mrr_at, "hit": hit_at}


def metric_value(metric: str, ranked: Ranked, judgements: Judgements) -> float:
    """One metric by key (e.g. `recall_at_5`) for one ranked list."""
    kind, k = parse_metric(metric)
    return _FUNCTIONS[kind](ranked, judgements, k)


@dataclass
class Evaluation:
    """Per-query and averaged metrics of one set of results against one set of judgements."""

    per_query: dict[str, dict[str, float]]
    aggregate: dict[str, float]
    # Queries without any relevant document: not averaged (undefined under trec_eval's definitions).
    skipped: list[str] = field(default_factory=list)
    # Known-irrelevant documents found in a query's top `report_k`, as (doc_id, rank).
    irrelevant_hits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    @property
    def queries(self) -> int:
        """Number of queries averaged."""
        return len(self.per_query)


def mean_metrics(per_query: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> dict[str, float]:
    """Average each metric over the given queries (0.0 when there are none)."""
    n = len(per_query)
    return {m: (math.fsum(v[m] for v in per_query.values()) / n if n else 0.0) for m in metrics}


def evaluate_results(
    results: Mapping[str, Iterable[tuple[str, float]]],
    qrels: Mapping[str, Judgements],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    exclude_self: bool = False,
    irrelevant: Mapping[str, Iterable[str]] | None = None,
    report_k: int = 10,
    queries: Iterable[str] | None = None,
) -> Evaluation:
    """Score results {qid: [(doc_id, score)]} against qrels {qid: {doc_id: grade}}.

    `exclude_self` drops the query's own id from its results before cutting at k (a verse is its
    own best match in verse-to-verse search). `queries` defaults to every judged query.
    """
    for m in metrics:
        parse_metric(m)
    per_query: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    hits: dict[str, list[tuple[str, int]]] = {}
    irrelevant = irrelevant or {}
    for qid in list(queries) if queries is not None else list(qrels):
        ranked = rank(results.get(qid, ()), exclude=qid if exclude_self else None)
        bad = set(irrelevant.get(qid, ()))
        if bad:
            found = [(doc, pos) for pos, doc in enumerate(ranked[:report_k], start=1) if doc in bad]
            if found:
                hits[qid] = found
        judgements = qrels.get(qid, {})
        if not any(grade > 0 for grade in judgements.values()):
            skipped.append(qid)
            continue
        per_query[qid] = {m: metric_value(m, ranked, judgements) for m in metrics}
    return Evaluation(
        per_query=per_query,
        aggregate=mean_metrics(per_query, metrics),
        skipped=skipped,
        irrelevant_hits=hits,
    )
