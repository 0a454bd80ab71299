"""The EvaluationFunction's job: score a collection on a ground truth, store the run, gate it, publish.

`evaluate_request` loads the request's ground truth (from S3), searches the collection (or the content
type's alias) through the search service, stores the run next to its baseline, compares the two (the
migration gate) and publishes the metrics to CloudWatch.

Errors are `EmbedServiceError`s whose class names the migration state machine can match:
`InvalidEvaluationRequest`, `CollectionNotFound`, `EvalDataError` (the ground truth), `UnknownModel`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from embedsvc.models.names import CONTENT_TYPE_PATTERN
from embedsvc.services.evaluation.errors import InvalidEvaluationRequest
from embedsvc.services.evaluation.groundtruth import EvalDataError, GroundTruth, load_ground_truth
from embedsvc.services.evaluation.runner import ProgressFn

if TYPE_CHECKING:
    from embedsvc.services.evaluation.compare import Comparison
    from embedsvc.services.evaluation.runs import Run, RunStore
    from embedsvc.services.search import SearchService, SearchTarget


class EvaluationRequest(BaseModel):
    """The EvaluationFunction payload (EventBridge Scheduler, the migration state machine, on demand).

    Ground truth: `ground_truth` (the project's JSON lines, or BEIR queries with `qrels`), or BEIR
    `queries` + `qrels`; each an `s3://bucket/key` URI (a local path works for the local stack).
    Target: `collection` if given (the content type's alias or `{content_type}_{model}`), else
    `{content_type}_{model}` when `model` is given, else the alias `{content_type}` (its model is the
    one the alias points at), else the content type's active model's collection.
    """

    model_config = ConfigDict(extra="forbid")

    content_type: str = Field(pattern=CONTENT_TYPE_PATTERN)
    ground_truth: str | None = Field(default=None, min_length=1)
    queries: str | None = Field(default=None, min_length=1)
    qrels: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, min_length=1, description="ground-truth name (baseline scope)")
    model: str | None = None
    collection: str | None = None
    exclude_self: bool = False
    depth: int = Field(default=100, ge=10, le=1000)
    # None: this run becomes the baseline only if there is none yet; True: always; False: never.
    set_baseline: bool | None = None
    max_drop_points: float = Field(default=3.0, ge=0)
    alpha: float = Field(default=0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_ground_truth(self) -> EvaluationRequest:
        if self.ground_truth is not None and self.queries is not None:
            raise ValueError("give either ground_truth or queries + qrels, not both")
        if self.ground_truth is None and self.queries is None:
            raise ValueError("a ground truth is required: ground_truth, or queries + qrels")
        if self.queries is not None and self.qrels is None:
            raise ValueError("queries need qrels")
        return self

    @classmethod
    def parse(cls, payload: Any) -> EvaluationRequest:
        """Validate a payload, or InvalidEvaluationRequest naming every problem."""
        if not isinstance(payload, Mapping):
            raise InvalidEvaluationRequest(
                f"the payload must be a JSON object, not {type(payload).__name__}", param="payload"
            )
        try:
            return cls.model_validate(dict(payload))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise InvalidEvaluationRequest(
                f"invalid evaluation payload: {problems}", param="payload"
            ) from None


@dataclass
class EvaluationOutcome:
    """One evaluation of a collection: the run, where it is stored, and the gate's verdict."""

    run: Run
    content_type: str
    collection: str  # what was searched (a collection or the alias)
    resolved_collection: str  # the collection behind it
    comparison: Comparison | None
    baseline_run_id: str | None
    baseline_set: bool
    stored_at: str
    metric_data: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """False when the gate failed against the baseline (True without a baseline)."""
        return self.comparison is None or self.comparison.passed

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready answer (what the Lambda returns)."""
        run = self.run
        return {
            "passed": self.passed,
            "content_type": self.content_type,
            "model": run.model_key,
            "collection": self.collection,
            "resolved_collection": self.resolved_collection,
            "ground_truth": run.ground_truth,
            "run_id": run.run_id,
            "run": f"{self.stored_at}runs/{run.run_id}.json",
            "trec_run": f"{self.stored_at}runs/{run.run_id}.trec",
            "queries": run.queries,
            "queries_without_relevant": len(run.skipped),
            "metrics": dict(run.aggregate),
            "baseline_run_id": self.baseline_run_id,
            "baseline_set": self.baseline_set,
            "regressions": self.comparison.regressions if self.comparison else [],
            "comparison": self.comparison.to_dict() if self.comparison else None,
        }


def resolve_target(
    content_type: str,
    *,
    model: str | None = None,
    collection: str | None = None,
    service: SearchService | None = None,
) -> SearchTarget:
    """What to evaluate for a content type (see EvaluationRequest for the rules), from the search service."""
    from embedsvc import container
    from embedsvc.services.search import InvalidSearchTarget

    service = service if service is not None else container.search_service()
    try:
        return service.resolve(content_type, model=model, collection=collection)
    except InvalidSearchTarget as exc:
        # The migration state machine catches the evaluation's own error name, whatever the cause.
        raise InvalidEvaluationRequest(exc.message, param=exc.param) from None


def evaluate_collection(
    ground_truth: GroundTruth,
    *,
    content_type: str,
    store: RunStore,
    model: str | None = None,
    collection: str | None = None,
    exclude_self: bool = False,
    depth: int = 100,
    set_baseline: bool | None = None,
    max_drop_points: float = 3.0,
    alpha: float = 0.05,
    cloudwatch: Any = None,
    namespace: str | None = None,
    progress: ProgressFn | None = None,
) -> EvaluationOutcome:
    """Score a collection on a ground truth through the service; store, compare, publish.

    The run is stored (JSON + TREC file) in `store` and compared with the baseline of its (content
    type, ground truth); with `set_baseline` None it becomes the baseline only when there is none.
    With a `cloudwatch` client the metrics go to CloudWatch (dimensions ContentType, Model) with
    EvaluationRegression = 1 when the gate failed, else 0.
    """
    from embedsvc import container
    from embedsvc.services.evaluation.compare import compare, gate_record, publish_to_cloudwatch
    from embedsvc.services.evaluation.retrieval import evaluation_search
    from embedsvc.services.evaluation.runner import evaluate

    if not ground_truth.evaluable_queries:
        raise EvalDataError(f"ground truth {ground_truth.name} has no query with a relevant document")
    target = resolve_target(content_type, model=model, collection=collection)
    task_id = f"eval-{content_type}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"

    def bound(texts: list[str], limit: int) -> list[list[tuple[str, float]]]:
        return evaluation_search(target.model_key, target.collection, texts, limit, task_id=task_id)

    run = evaluate(
        ground_truth,
        search=bound,
        k_search=depth,
        exclude_self=exclude_self,
        model_key=target.model_key,
        collection=target.collection,
        progress=progress,
    )
    run.params["resolved_collection"] = target.resolved
    baseline = store.baseline(run.baseline_key)
    comparison = compare(baseline, run, max_drop_points=max_drop_points, alpha=alpha) if baseline else None
    if baseline is not None and comparison is not None:
        run.params["gate"] = gate_record(baseline, comparison)  # the stored run says if it failed
    store.save(run)
    baseline_set = bool(set_baseline) or (set_baseline is None and baseline is None)
    if baseline_set:
        store.set_baseline(run.baseline_key, run.run_id)
    metric_data: list[dict[str, Any]] = []
    if cloudwatch is not None:
        metric_data = publish_to_cloudwatch(
            cloudwatch,
            run,
            comparison,
            content_type=content_type,
            namespace=namespace or container.settings().metrics_namespace,
        )
    return EvaluationOutcome(
        run=run,
        content_type=content_type,
        collection=target.collection,
        resolved_collection=target.resolved,
        comparison=comparison,
        baseline_run_id=baseline.run_id if baseline else None,
        baseline_set=baseline_set,
        stored_at=str(store),
        metric_data=metric_data,
    )


def _local_copy(uri: str, into: Path, s3: Any) -> Path:
    """A local copy of an `s3://bucket/key` ground-truth file under `into`, or the local path itself."""
    from embedsvc.adapters.s3 import ObjectUnreadable, download

    if not uri.startswith("s3://"):
        return Path(uri)
    try:
        return download(s3, uri, into)
    except ValueError as exc:
        raise InvalidEvaluationRequest(str(exc), param="ground_truth") from None
    except ObjectUnreadable as exc:
        raise EvalDataError(f"cannot read the ground truth {uri}: {exc.code}") from None


def load_request_ground_truth(request: EvaluationRequest, *, s3: Any = None) -> GroundTruth:
    """The request's ground truth, downloaded from S3 when it lives there."""
    if s3 is None:
        from embedsvc.adapters.aws import client

        s3 = client("s3")
    with tempfile.TemporaryDirectory(prefix="embedsvc-eval-") as tmp:
        root = Path(tmp)
        if request.ground_truth is not None:
            queries = _local_copy(request.ground_truth, root, s3)
        else:
            assert request.queries is not None
            queries = _local_copy(request.queries, root, s3)
        qrels = _local_copy(request.qrels, root, s3) if request.qrels is not None else None
        return load_ground_truth(queries, qrels=qrels, name=request.name)


def runs_location(bucket: str | None = None) -> str:
    """Where the EvaluationFunction keeps runs and baselines: `s3://$EVAL_BUCKET/`."""
    bucket = bucket or os.environ.get("EVAL_BUCKET")
    if not bucket:
        from embedsvc.errors import ConfigError

        raise ConfigError("EVAL_BUCKET is not set: nowhere to store evaluation runs")
    return f"s3://{bucket}/"


def evaluate_request(
    request: EvaluationRequest, *, s3: Any = None, cloudwatch: Any = None, runs: str | None = None
) -> EvaluationOutcome:
    """The EvaluationFunction's job: load the ground truth, evaluate, store, compare and publish."""
    from embedsvc.adapters.aws import client
    from embedsvc.services.evaluation.runs import open_run_store

    s3 = s3 if s3 is not None else client("s3")
    cloudwatch = cloudwatch if cloudwatch is not None else client("cloudwatch")
    ground_truth = load_request_ground_truth(request, s3=s3)
    store = open_run_store(runs or runs_location(), s3_client=s3)
    return evaluate_collection(
        ground_truth,
        content_type=request.content_type,
        store=store,
        model=request.model,
        collection=request.collection,
        exclude_self=request.exclude_self,
        depth=request.depth,
        set_baseline=request.set_baseline,
        max_drop_points=request.max_drop_points,
        alpha=request.alpha,
        cloudwatch=cloudwatch,
    )
