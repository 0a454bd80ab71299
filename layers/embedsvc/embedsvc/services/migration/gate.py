"""The migration's evaluation gate: the active collection and the candidate, on one ground truth.

Both are searched through the search service (as users search: same embedding path, cache and
ledger, bulk lane, cost source `evaluation`), scored, stored in the run store, and compared with the
gate the evaluation already has (services/evaluation/compare.py): the candidate passes when no gated
metric drops by more than `max_metric_drop` points with a paired randomization test saying p < alpha.

Ground-truth documents that are not in the content store are dropped first (see
`GroundTruth.restricted_to`): neither collection can find them, so they would only lower both alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedsvc.adapters.qdrant import collection_name

if TYPE_CHECKING:
    from embedsvc.adapters.content_store import ContentStore
    from embedsvc.services.evaluation.compare import Comparison
    from embedsvc.services.evaluation.groundtruth import GroundTruth
    from embedsvc.services.evaluation.runs import Run, RunStore
    from embedsvc.services.search import SearchService


@dataclass
class GateResult:
    passed: bool
    old: Run
    new: Run
    comparison: Comparison

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
        from embedsvc.services.evaluation.retrieval import evaluation_search
        from embedsvc.services.evaluation.runner import evaluate

        live = {row.id for row in self.store.iter_point_states(content_type) if not row.deleted}
        restricted = ground_truth.restricted_to(live)
        if not restricted.evaluable_queries:
            raise EvalDataError(
                f"ground truth {ground_truth.name} has no query whose relevant documents are in the "
                f"{content_type} content: the gate cannot compare anything"
            )
        runs: list[Run] = []
        for model in (old_model, new_model):
            collection = collection_name(content_type, model)

            def bound(texts: list[str], limit: int, _m: str = model, _c: str = collection) -> list:
                return evaluation_search(_m, _c, texts, limit, task_id=task_id, service=self.search)

            run = evaluate(restricted, search=bound, k_search=100, model_key=model, collection=collection)
            runs.append(run)
        old, new = runs
        comparison = compare(old, new, max_drop_points=max_metric_drop, alpha=alpha)
        new.params["gate"] = gate_record(old, comparison)
        for run in runs:
            self.runs.save(run)
        return GateResult(comparison.passed, old, new, comparison)
