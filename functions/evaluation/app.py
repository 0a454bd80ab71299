"""EvaluationFunction: score a collection on a ground truth, store the run in S3, flag regressions.

Invoked weekly by EventBridge Scheduler, by the migration state machine (the evaluation gate) and on
demand, with a payload like events/evaluation/weekly.json:
    {"content_type": "verse", "ground_truth": "s3://bucket/ground-truth/verse.jsonl"}
and optionally "model", "collection", "queries" + "qrels" (BEIR, instead of "ground_truth"), "name",
"exclude_self", "depth", "set_baseline", "max_drop_points", "alpha" (see EvaluationRequest).

Answer: {"passed": bool, "run_id", "metrics", "comparison", ...}. A failed gate is an answer, not an
error: {"passed": false, "regressions": [...]} and EvaluationRegression = 1 in CloudWatch. Failures
raise errors whose names a state machine can match: InvalidEvaluationRequest, EvalDataError,
CollectionNotFound, UnknownModel, ConfigError (permanent) and VectorStoreUnavailable,
AllProvidersFailed, ServiceOverloaded (transient: worth a Retry).
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc.observability import bind_correlation, correlation_from_event, flush_costs
from embedsvc.services.evaluation.job import EvaluationRequest, evaluate_request

logger = Logger()
tracer = Tracer()


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)  # no payloads in traces
@flush_costs  # the run's costs reach the roll-up before Lambda freezes the process
def lambda_handler(event: Any, context: LambdaContext) -> dict:
    # The migration's execution name when the state machine runs the gate, else one id per run.
    bind_correlation(correlation_from_event(event, prefix="eval"), logger=logger, tracer=tracer)
    request = EvaluationRequest.parse(event)
    outcome = evaluate_request(request)
    answer = outcome.to_dict()
    logger.info(
        "evaluation finished",
        extra={
            "passed": answer["passed"],
            "content_type": answer["content_type"],
            "model": answer["model"],
            "collection": answer["resolved_collection"],
            "run_id": answer["run_id"],
            "queries": answer["queries"],
            "metrics": answer["metrics"],
            "regressions": answer["regressions"],
        },
    )
    if not answer["passed"]:
        logger.warning(
            "evaluation regressed against the baseline", extra={"regressions": answer["regressions"]}
        )
    return answer
