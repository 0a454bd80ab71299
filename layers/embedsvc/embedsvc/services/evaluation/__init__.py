"""Retrieval-quality evaluation: ground truth, trec_eval metrics, runs, baselines and the migration gate.

`corpus` indexes a corpus through the worker path, `retrieval` searches through the search service,
and `job` is the EvaluationFunction's job; they reach the service only when called. The `embedsvc eval`
command lives in `embedsvc.cli.eval` and the chart in `embedsvc.charts.evaluation`.
"""

from embedsvc.services.evaluation.compare import (
    Comparison,
    MetricComparison,
    compare,
    paired_randomization_test,
    publish_to_cloudwatch,
)
from embedsvc.services.evaluation.groundtruth import (
    EvalDataError,
    GroundTruth,
    load_beir,
    load_bible_eval,
    load_corpus,
    load_ground_truth,
    load_jsonl_ground_truth,
)
from embedsvc.services.evaluation.metrics import DEFAULT_METRICS, GATE_METRICS, evaluate_results
from embedsvc.services.evaluation.runner import evaluate
from embedsvc.services.evaluation.runs import (
    LocalRunStore,
    Run,
    RunNotFound,
    RunStore,
    S3RunStore,
    open_run_store,
    read_trec_run,
    write_trec_run,
)

__all__ = [
    "DEFAULT_METRICS",
    "GATE_METRICS",
    "Comparison",
    "EvalDataError",
    "GroundTruth",
    "LocalRunStore",
    "MetricComparison",
    "Run",
    "RunNotFound",
    "RunStore",
    "S3RunStore",
    "compare",
    "evaluate",
    "evaluate_results",
    "load_beir",
    "load_bible_eval",
    "load_corpus",
    "load_ground_truth",
    "load_jsonl_ground_truth",
    "open_run_store",
    "paired_randomization_test",
    "publish_to_cloudwatch",
    "read_trec_run",
    "write_trec_run",
]
