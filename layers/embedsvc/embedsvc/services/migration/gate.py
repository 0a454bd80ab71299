"""The migration's evaluation gate: the active collection and the candidate, on one ground truth.

Both are searched through the search service (as users search: same embedding path, cache and
ledger, bulk lane, cost source `evaluation`), scored, stored in the run store, and compared with the
gate the evaluation already has (services/evaluation/compare.py): the candidate passes when no gated
metric drops by more than `max_metric_drop` points with a paired randomization test saying p < alpha.

Ground-truth documents that are not in the content store are dropped first (see
`GroundTruth.restricted_to`): neither collection can find them, so they would only lower both alike.

The gate runs while users keep writing (dual-writes reach both collections). Searching the whole
ground truth on one collection and then on the other would let a delete made in between hit only
the second run: on 108 verses, three deleted verses cost the candidate 4 points of Recall@5 and the
gate refused a model that ranks like the old one. So each batch of queries is searched on both
collections back to back, and the documents that changed while the gate searched (compared by
version, before and after) are left out of both runs' results and judgements: the two runs are
scored on the same content, the content that stood still.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedsvc.adapters.qdrant import collection_name

if TYPE_CHECKING:
    from collections.abc import Iterable

    from embedsvc.adapters.content_store import ContentStore
    from embedsvc.services.evaluation.compare import Comparison
    from embedsvc.services.evaluation.groundtruth import GroundTruth
    from embedsvc.services.evaluation.runs import Run, RunStore
    from embedsvc.services.search import SearchService

K_SEARCH = 100
# Queries per search call; both collections are searched for one batch before the next batch starts.
BATCH_SIZE = 32

Ranking = list[tuple[str, float]]


@dataclass
class GateResult:
    passed: bool
    old: Run
    new: Run
    comparison: Comparison
    changed_during_gate: int = 0  # documents written while the gate searched, left out of both runs

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "old_model": self.old.model_key,
            "new_model": self.new.model_key,
            "old_metrics": dict(self.old.aggregate),
            "new_metrics": dict(self.new.aggregate),
            "regressions": self.comparison.regressions,
            "queries": self.comparison.queries,
            "old_run_id": self.old.run_id,
            "new_run_id": self.new.run_id,
            "changed_during_gate": self.changed_during_gate,
            "notes": list(self.comparison.notes),
        }


class MigrationGate:
    def __init__(self, search: SearchService, store: ContentStore, runs: RunStore):
        self.search = search
        self.store = store
        self.runs = runs

    def evaluate(
        self,
        ground_truth: GroundTruth,
        content_type: str,
        old_model: str,
        new_model: str,
        *,
        max_metric_drop: float,
        alpha: float,
        task_id: str,
    ) -> GateResult:
        from embedsvc.services.evaluation.compare import compare, gate_record
        from embedsvc.services.evaluation.groundtruth import EvalDataError
        from embedsvc.services.evaluation.runner import evaluate

        before = self._live_versions(content_type)
        candidates = self._evaluable(ground_truth, before.keys(), content_type)
        models = (old_model, new_model)
        recorded = self._search_interleaved(candidates, content_type, models, task_id)
        after = self._live_versions(content_type)
        stable = {doc for doc, version in before.items() if after.get(doc) == version}
        changed = (before.keys() | after.keys()) - stable
        restricted = candidates.restricted_to(stable)
        if not restricted.evaluable_queries:
            raise EvalDataError(
                f"every relevant {content_type} document of {ground_truth.name} changed while the gate "
                "searched: nothing is left to compare; run the gate again when writes are quieter"
            )
        runs: list[Run] = []
        for model in models:

            def replay(texts: list[str], limit: int, _answers: dict[str, Ranking] = recorded[model]) -> list:
                return [[hit for hit in _answers[text] if hit[0] not in changed][:limit] for text in texts]

            run = evaluate(
                restricted,
                search=replay,
                k_search=K_SEARCH,
                model_key=model,
                collection=collection_name(content_type, model),
            )
            run.params["changed_during_gate"] = len(changed)
            runs.append(run)
        old, new = runs
        comparison = compare(old, new, max_drop_points=max_metric_drop, alpha=alpha)
        new.params["gate"] = gate_record(old, comparison)
        for run in runs:
            self.runs.save(run)
        return GateResult(comparison.passed, old, new, comparison, changed_during_gate=len(changed))

    def _live_versions(self, content_type: str) -> dict[str, int]:
        return {row.id: row.version for row in self.store.iter_point_states(content_type) if not row.deleted}

    @staticmethod
    def _evaluable(ground_truth: GroundTruth, live: Iterable[str], content_type: str) -> GroundTruth:
        from embedsvc.services.evaluation.groundtruth import EvalDataError

        restricted = ground_truth.restricted_to(set(live))
        if not restricted.evaluable_queries:
            raise EvalDataError(
                f"ground truth {ground_truth.name} has no query whose relevant documents are in the "
                f"{content_type} content: the gate cannot compare anything"
            )
        return restricted

    def _search_interleaved(
        self, ground_truth: GroundTruth, content_type: str, models: tuple[str, str], task_id: str
    ) -> dict[str, dict[str, Ranking]]:
        """Per model, each query text's ranking; one batch on both collections before the next batch."""
        from embedsvc.services.evaluation.retrieval import evaluation_search

        texts = list(dict.fromkeys(ground_truth.queries.values()))
        recorded: dict[str, dict[str, Ranking]] = {model: {} for model in models}
        for start in range(0, len(texts), BATCH_SIZE):
            batch = texts[start : start + BATCH_SIZE]
            for model in models:
                answers = evaluation_search(
                    model,
                    collection_name(content_type, model),
                    batch,
                    K_SEARCH,
                    task_id=task_id,
                    service=self.search,
                )
                recorded[model].update(zip(batch, answers, strict=True))
        return recorded
