"""Evaluate a search function on a ground truth and record a Run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from embedsvc.services.evaluation.groundtruth import GroundTruth
from embedsvc.services.evaluation.metrics import DEFAULT_METRICS, evaluate_results, max_cutoff, rank
from embedsvc.services.evaluation.runs import Run, make_run

# search(query_texts, limit) -> per query, its (doc_id, score) list, best first.
SearchFn = Callable[[list[str], int], list[list[tuple[str, float]]]]
# progress(done, total)
ProgressFn = Callable[[int, int], None]


def evaluate(
    ground_truth: GroundTruth,
    *,
    search: SearchFn,
    k_search: int = 100,
    exclude_self: bool = False,
    model_key: str,
    collection: str,
    name: str | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 64,
    progress: ProgressFn | None = None,
    created_at: datetime | None = None,
) -> Run:
    """Search every query (in batches), score the results with trec_eval definitions, and return the Run.

    With `exclude_self`, one extra result is asked for so that k_search remain after the query's own
    id is dropped. `name` is the ground-truth name recorded in the run (default: ground_truth.name).
    """
    if k_search < max_cutoff(metrics):
        raise ValueError(
            f"k_search={k_search} is shallower than the metrics' deepest cutoff {max_cutoff(metrics)}"
        )
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    qids = list(ground_truth.queries)
    limit = k_search + 1 if exclude_self else k_search
    results: dict[str, list[tuple[str, float]]] = {}
    for start in range(0, len(qids), batch_size):
        batch = qids[start : start + batch_size]
        answers = search([ground_truth.queries[q] for q in batch], limit)
        if len(answers) != len(batch):
            raise RuntimeError(f"search returned {len(answers)} result lists for {len(batch)} queries")
        for qid, answer in zip(batch, answers, strict=True):
            scores = {str(doc_id): float(score) for doc_id, score in answer}
            if len(scores) != len(answer):
                raise RuntimeError(f"search returned a document twice for query '{qid}'")
            order = rank(scores.items(), exclude=qid if exclude_self else None)[:k_search]
            results[qid] = [(doc_id, scores[doc_id]) for doc_id in order]
        if progress is not None:
            progress(min(start + batch_size, len(qids)), len(qids))
    # Self already dropped above; the stored results are exactly what was scored (and what trec_eval sees).
    scored = evaluate_results(
        results,
        ground_truth.qrels,
        metrics=metrics,
        irrelevant=ground_truth.irrelevant,
        queries=qids,
    )
    return make_run(
        model_key=model_key,
        collection=collection,
        ground_truth=name or ground_truth.name,
        results=results,
        per_query=scored.per_query,
        aggregate=scored.aggregate,
        params={"exclude_self": exclude_self, "k_search": k_search, "metrics": list(metrics)},
        irrelevant_hits=scored.irrelevant_hits,
        skipped=scored.skipped,
        created_at=created_at,
    )
