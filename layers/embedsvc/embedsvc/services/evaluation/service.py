"""Evaluation wired to the service: documents go in through the worker path, queries go through the router.

- `index_corpus` turns a corpus into IndexQueue messages (batches of 100, priority bulk, source
  `evaluation`) and runs them through the worker's `Indexer.process`, retrying what it says to retry;
  only documents the collection lacks (or holds with other text) are sent.
- `search` embeds query texts with the embedding service and searches the collection in Qdrant, as
  users search.
- `run_cli` is `embedsvc eval`: on the embedded local stack by default, or with `--aws` on the
  environment's AWS and Qdrant configuration.
- `evaluate_collection` / `evaluate_request` are the EvaluationFunction's job: score a collection (or
  the content type's alias) on a ground truth, store the run, compare it with the baseline, publish
  the metrics to CloudWatch.

Errors are `EmbedServiceError`s whose class names the migration state machine can match:
`InvalidEvaluationRequest`, `CollectionNotFound`, `EvalDataError` (the ground truth), `IndexingFailed`
(a document the worker refused) and `IndexingIncomplete` (transient failures that outlived the retries).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from embedsvc.errors import EmbedServiceError, InvalidRequest, TransientError
from embedsvc.services.evaluation.groundtruth import EvalDataError, GroundTruth, load_ground_truth
from embedsvc.services.evaluation.runner import ProgressFn

if TYPE_CHECKING:
    import argparse

    from embedsvc.adapters.qdrant import VectorStore
    from embedsvc.services.evaluation.compare import Comparison
    from embedsvc.services.evaluation.runs import Run, RunStore
    from embedsvc.services.indexing import BatchOutcome

CONTENT_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
SOURCE = "evaluation"
INDEX_BATCH = 100  # the IndexQueue event source's batch size
INDEX_ATTEMPTS = 5  # tries per batch before transient failures are given up on
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
_PAYLOAD_PAGE = 1000

InfoFn = Callable[[str], None]


class InvalidEvaluationRequest(InvalidRequest):
    """The evaluation request cannot be run as given (payload, collection name, model)."""

    code = "invalid_evaluation_request"


class CollectionNotFound(InvalidRequest):
    """The collection (or alias) to search does not exist."""

    status = 404
    code = "collection_not_found"


class IndexingFailed(EmbedServiceError):
    """The worker refused documents of the corpus (dead-lettered): retrying cannot help."""

    code = "evaluation_indexing_failed"


class IndexingIncomplete(TransientError):
    """Documents kept failing transiently (provider, Qdrant) after every retry; running again resumes."""

    code = "evaluation_indexing_incomplete"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- names ---------------------------------------------------------------------------------------


def content_type_for(collection: str, model_key: str) -> str:
    """The content type whose `{content_type}_{model_key}` collection this is, or InvalidEvaluationRequest.

    The worker writes only such collections, so a corpus can be indexed only into one of them.
    """
    suffix = f"_{model_key}"
    content_type = collection[: -len(suffix)] if collection.endswith(suffix) else ""
    if not content_type or not CONTENT_TYPE.match(content_type):
        raise InvalidEvaluationRequest(
            f"cannot index into collection '{collection}': the worker writes collections named "
            f"<content_type>_{model_key}, where the content type matches {CONTENT_TYPE.pattern} "
            f"(e.g. scifact_{model_key}); rename --collection",
            param="collection",
        )
    return content_type


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def alias_target(store: VectorStore, alias: str) -> str | None:
    """The collection a Qdrant alias points at, or None when there is no such alias."""
    answer = store._call("get_aliases", store.client.get_aliases)
    for description in answer.aliases:
        if description.alias_name == alias:
            return str(description.collection_name)
    return None


def _vector_size(store: VectorStore, collection: str) -> int | None:
    """The vector size of a collection (None when Qdrant does not say, e.g. named vectors)."""
    try:
        info = store._call("get_collection", store.client.get_collection, collection)
        size = getattr(info.config.params.vectors, "size", None)
    except Exception:  # only used for a clearer error message; the search itself will tell
        return None
    return int(size) if size is not None else None


# --- indexing through the worker path ------------------------------------------------------------


@dataclass
class IndexReport:
    """What `index_corpus` did."""

    collection: str
    documents: int
    already_indexed: int
    indexed: int = 0
    unchanged: int = 0
    extra_points: int = 0  # points in the collection that are not in the corpus (they compete in search)
    retried: int = 0
    seconds: float = 0.0


def _message(content_type: str, doc_id: str, text: str, model_key: str, task_id: str) -> str:
    return json.dumps(
        {
            "schema_version": 1,
            "content_type": content_type,
            "id": doc_id,
            "text": text,
            "source": SOURCE,
            "task_id": task_id,
            "priority": "bulk",
            "models": [model_key],
        },
        ensure_ascii=False,
    )


def _evaluation_indexer() -> Any:
    """The worker's Indexer on the container's components, with a dead-letter that keeps reasons here.

    Evaluation documents that the worker refuses are the evaluator's input errors: they are reported
    to the caller, not sent to the service's DLQ (where a redrive would index them for real).
    """
    from embedsvc import container
    from embedsvc.services.indexing import Indexer

    return Indexer(
        container.settings(),
        container.embedding_service(),
        container.vector_store(),
        dead_letter=lambda items: [],
    )


def missing_documents(
    store: VectorStore, collection: str, content_type: str, docs: Mapping[str, str]
) -> tuple[list[str], int]:
    """Corpus ids the collection lacks or holds with another text, and how many corpus ids it holds."""
    from embedsvc.adapters.qdrant import point_id
    from embedsvc.services.indexing import content_hash

    if not store.exists(collection):
        return list(docs), 0
    ids = list(docs)
    stored: dict[str, dict[str, Any]] = {}
    for chunk in _chunks([point_id(content_type, d) for d in ids], _PAYLOAD_PAGE):
        stored.update(store.payloads(collection, chunk))
    todo: list[str] = []
    present = 0
    for doc_id in ids:
        payload = stored.get(point_id(content_type, doc_id))
        if payload is not None:
            present += 1
        if payload is None or payload.get("content_hash") != content_hash(docs[doc_id]):
            todo.append(doc_id)
    return todo, present


def index_corpus(
    model_key: str,
    collection: str,
    docs: Mapping[str, str],
    progress: ProgressFn | None = None,
    *,
    indexer: Any = None,
    store: VectorStore | None = None,
    info: InfoFn = _stderr,
    attempts: int = INDEX_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
    task_id: str | None = None,
) -> IndexReport:
    """Index the documents the collection lacks through the worker path; returns what was done.

    Documents are sent as IndexQueue messages (batches of 100, priority bulk, source `evaluation`)
    to `Indexer.process`; messages it asks to retry are retried with exponential backoff up to
    `attempts` times per batch. A dead-lettered message raises IndexingFailed; messages still failing
    after the retries raise IndexingIncomplete (what was indexed stays: a new run resumes).
    """
    from embedsvc import container
    from embedsvc.services.indexing import Incoming

    started = time.perf_counter()
    spec = container.settings().registry.model(model_key)
    if spec.key != model_key:
        raise InvalidEvaluationRequest(f"use the model key '{spec.key}', not its name", param="model")
    content_type = content_type_for(collection, model_key)
    store = store if store is not None else container.vector_store()
    if store.exists(collection):
        size = _vector_size(store, collection)
        if size is not None and size != spec.dimensions:
            raise InvalidEvaluationRequest(
                f"collection '{collection}' holds {size}-dimensional vectors; model '{model_key}' "
                f"makes {spec.dimensions}",
                param="collection",
            )
    todo, present = missing_documents(store, collection, content_type, docs)
    count = store.count(collection) if store.exists(collection) else 0
    report = IndexReport(
        collection=collection,
        documents=len(docs),
        already_indexed=len(docs) - len(todo),
        extra_points=max(0, count - present),
    )
    if report.extra_points:
        info(
            f"warning: {collection} holds {report.extra_points} points that are not in the corpus; "
            "they take part in the search"
        )
    if not todo:
        info(f"{collection} already holds all {len(docs)} documents: nothing to index")
        report.seconds = time.perf_counter() - started
        return report
    if report.already_indexed:
        info(f"{collection} holds {report.already_indexed} of them; indexing the other {len(todo)}")
    indexer = indexer if indexer is not None else _evaluation_indexer()
    task_id = task_id or f"eval-{collection}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    done = 0
    if progress is not None:
        progress(0, len(todo))
    for number, chunk in enumerate(_chunks(todo, INDEX_BATCH)):
        pending = {
            f"eval-{number}-{i}": _message(content_type, doc_id, docs[doc_id], model_key, task_id)
            for i, doc_id in enumerate(chunk)
        }
        ids = {f"eval-{number}-{i}": doc_id for i, doc_id in enumerate(chunk)}
        for attempt in range(1, attempts + 1):
            batch = [Incoming(message_id, body) for message_id, body in pending.items()]
            outcome = indexer.process(batch)
            _raise_dead_lettered(outcome, ids, collection)
            report.indexed += outcome.indexed
            report.unchanged += outcome.unchanged
            retry = set(outcome.retry)
            pending = {m: b for m, b in pending.items() if m in retry}
            if not pending:
                break
            report.retried += len(pending)
            if attempt < attempts:
                delay = min(RETRY_BASE_SECONDS * 2 ** (attempt - 1), RETRY_MAX_SECONDS)
                info(f"{len(pending)} documents failed transiently; retrying in {delay:g}s")
                sleep(delay)
        if pending:
            failing = ", ".join(sorted(ids[m] for m in pending)[:5])
            raise IndexingIncomplete(
                f"{len(pending)} documents of {collection} still failed after {attempts} attempts "
                f"(e.g. {failing}; the worker's log says why); {done + len(chunk) - len(pending)} of "
                f"{len(todo)} were indexed this run: run again to resume"
            )
        done += len(chunk)
        if progress is not None:
            progress(done, len(todo))
    report.seconds = time.perf_counter() - started
    info(
        f"indexed {report.indexed} documents into {collection} in {report.seconds:.1f}s"
        + (f" ({report.unchanged} unchanged)" if report.unchanged else "")
    )
    return report


def _raise_dead_lettered(outcome: BatchOutcome, ids: Mapping[str, str], collection: str) -> None:
    if not outcome.dead_lettered:
        return
    first_id, reason = next(iter(outcome.dead_lettered.items()))
    more = len(outcome.dead_lettered) - 1
    raise IndexingFailed(
        f"the worker refused document '{ids.get(first_id, first_id)}' for {collection}: {reason}"
        + (f" ({more} more refused)" if more else "")
    )


# --- searching as users search --------------------------------------------------------------------


def search(
    model_key: str,
    collection: str,
    query_texts: list[str],
    limit: int,
    *,
    store: VectorStore | None = None,
    task_id: str | None = None,
) -> list[list[tuple[str, float]]]:
    """Embed the queries with the service (realtime lane, truncated) and search the collection."""
    from embedsvc import container
    from embedsvc.observability import CallContext
    from embedsvc.services.ratelimit import Lane

    if not query_texts:
        return []
    store = store if store is not None else container.vector_store()
    if not store.exists(collection) and alias_target(store, collection) is None:
        raise CollectionNotFound(
            f"collection or alias '{collection}' does not exist; index a corpus into it first "
            "(embedsvc eval --corpus ...)",
            param="collection",
        )
    result = container.embedding_service().embed(
        query_texts,
        model_key,
        context=CallContext(source=SOURCE, task_id=task_id),
        lane=Lane.BULK,  # scheduled and gate runs must not mark users active and squeeze bulk work
        truncate=True,
    )
    return [
        [(hit.id, hit.score) for hit in store.search(collection, vector, limit=limit)]
        for vector in result.vectors
    ]


# --- the CLI ---------------------------------------------------------------------------------------


def default_workdir() -> Path:
    from embedsvc.local.stack import ROOT

    return ROOT / ".local" / "eval"


def run_cli(args: argparse.Namespace) -> int:
    """`embedsvc eval`: on the embedded local stack (default) or the environment's AWS (`--aws`)."""
    import os

    # Counting tokens, transformers warns about every abstract longer than the model window; the
    # model truncates them itself (as the published numbers assume), so the warning only misleads.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    workdir = Path(args.workdir) if getattr(args, "workdir", None) else default_workdir()
    if getattr(args, "aws", False):
        _stderr("using the environment's AWS and Qdrant configuration (--aws)")
        return _run_cli(args, workdir, aws=True)
    from embedsvc.local.stack import LocalStack

    _stderr(f"starting the embedded local stack in {workdir} (Qdrant on disk in {workdir / 'qdrant'})")
    with LocalStack(workdir, serve_api=False):
        return _run_cli(args, workdir, aws=False)


def _run_cli(args: argparse.Namespace, workdir: Path, *, aws: bool) -> int:
    from embedsvc import container
    from embedsvc.observability import CostRecorder
    from embedsvc.services.evaluation.cli import run_eval

    settings = container.settings()
    args.model = settings.registry.model(args.model).key  # a model name works too; runs record the key
    if aws:
        if not settings.qdrant_url and not settings.qdrant_path:
            _stderr("warning: neither QDRANT_URL nor QDRANT_PATH is set: Qdrant runs in memory for this run")
        # EMF on stdout reaches CloudWatch only from Lambda; here it would bury the results.
        workdir.mkdir(parents=True, exist_ok=True)
        emf_log = workdir / "emf.jsonl"

        def to_file(blob: dict) -> None:
            with emf_log.open("a") as fh:
                fh.write(json.dumps(blob) + "\n")

        container.put("costs", CostRecorder(namespace=settings.metrics_namespace, sink=to_file))
    if args.corpus and args.collection:
        content_type_for(args.collection, args.model)  # refuse a bad name before loading anything
    task_id = f"eval-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"

    def index(model_key: str, collection: str, docs: Mapping[str, str], progress: ProgressFn) -> IndexReport:
        return index_corpus(model_key, collection, docs, progress, task_id=task_id)

    def find(model_key: str, collection: str, texts: list[str], limit: int) -> list[list[tuple[str, float]]]:
        return search(model_key, collection, texts, limit, task_id=task_id)

    try:
        return run_eval(args, index_corpus=index, search=find, default_runs_dir=str(workdir / "runs"))
    finally:
        flush = getattr(container.cache(), "flush", None)
        if callable(flush):
            try:
                flush()
            except Exception as exc:  # a cache write lost is a future miss, not a failed evaluation
                _stderr(f"warning: embedding cache writes not flushed: {exc!r}")


# --- the EvaluationFunction -----------------------------------------------------------------------


class EvaluationRequest(BaseModel):
    """The EvaluationFunction payload (EventBridge Scheduler, the migration state machine, on demand).

    Ground truth: `ground_truth` (the project's JSON lines, or BEIR queries with `qrels`), or BEIR
    `queries` + `qrels`; each an `s3://bucket/key` URI (a local path works for the local stack).
    Target: `collection` if given (the content type's alias or `{content_type}_{model}`), else
    `{content_type}_{model}` when `model` is given, else the alias `{content_type}` (its model is the
    one the alias points at), else the content type's active model's collection.
    """

    model_config = ConfigDict(extra="forbid")

    content_type: str = Field(pattern=CONTENT_TYPE.pattern)
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
    store: VectorStore | None = None,
) -> tuple[str, str, str]:
    """(model key, collection or alias to search, collection behind it) for a content type.

    See EvaluationRequest for the rules. A named collection must belong to the content type, so that
    runs, baselines and CloudWatch dimensions all speak of the same content type.
    """
    from embedsvc import container

    settings = container.settings()
    store = store if store is not None else container.vector_store()
    model_key = settings.registry.model(model).key if model else None
    if (
        collection is not None
        and collection != content_type
        and not collection.startswith(f"{content_type}_")
    ):
        raise InvalidEvaluationRequest(
            f"collection '{collection}' does not belong to content type '{content_type}': name its alias "
            f"'{content_type}' or a collection '{content_type}_<model>'",
            param="collection",
        )
    if collection is None:
        if model_key is not None:
            collection = f"{content_type}_{model_key}"
        elif alias_target(store, content_type) is not None:
            collection = content_type
        else:
            collection = f"{content_type}_{settings.models_for(content_type)[0]}"
    target = alias_target(store, collection) or collection
    if not store.exists(target):
        raise CollectionNotFound(
            f"collection '{collection}' for content type '{content_type}' does not exist", param="collection"
        )
    prefix = f"{content_type}_"
    target_model = target[len(prefix) :] if target.startswith(prefix) else None
    if target_model not in settings.registry.models:
        target_model = None
    if model_key is None:
        if target_model is None:
            raise InvalidEvaluationRequest(
                f"cannot tell which model made '{target}': name the model in the payload", param="model"
            )
        model_key = target_model
    if collection not in (content_type, f"{content_type}_{model_key}"):
        raise InvalidEvaluationRequest(
            f"collection '{collection}' is neither the alias '{content_type}' nor '{content_type}_{model_key}' "
            f"of content type '{content_type}' and model '{model_key}'",
            param="collection",
        )
    if target_model is not None and target_model != model_key:
        raise InvalidEvaluationRequest(
            f"'{collection}' points at {target}, made by '{target_model}', not '{model_key}'", param="model"
        )
    size = _vector_size(store, target)
    dimensions = settings.registry.models[model_key].dimensions
    if size is not None and size != dimensions:
        raise InvalidEvaluationRequest(
            f"collection '{target}' holds {size}-dimensional vectors; model '{model_key}' makes {dimensions}",
            param="model",
        )
    return model_key, collection, target


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
    from embedsvc.services.evaluation.runner import evaluate

    if not ground_truth.evaluable_queries:
        raise EvalDataError(f"ground truth {ground_truth.name} has no query with a relevant document")
    model_key, searched, target = resolve_target(content_type, model=model, collection=collection)
    task_id = f"eval-{content_type}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"

    def bound(texts: list[str], limit: int) -> list[list[tuple[str, float]]]:
        return search(model_key, searched, texts, limit, task_id=task_id)

    run = evaluate(
        ground_truth,
        search=bound,
        k_search=depth,
        exclude_self=exclude_self,
        model_key=model_key,
        collection=searched,
        progress=progress,
    )
    run.params["resolved_collection"] = target
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
        collection=searched,
        resolved_collection=target,
        comparison=comparison,
        baseline_run_id=baseline.run_id if baseline else None,
        baseline_set=baseline_set,
        stored_at=str(store),
        metric_data=metric_data,
    )


def _fetch(uri: str, into: Path, s3: Any) -> Path:
    """A local copy of `s3://bucket/key` under `into` (keeping the key's path), or the local path itself."""
    if not uri.startswith("s3://"):
        return Path(uri)
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise InvalidEvaluationRequest(
            f"'{uri}' is not an s3://bucket/key URI of a file", param="ground_truth"
        )
    path = into / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        s3.download_file(bucket, key, str(path))
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"):
            raise EvalDataError(f"cannot read the ground truth {uri}: {code}") from None
        raise
    return path


def load_request_ground_truth(request: EvaluationRequest, *, s3: Any = None) -> GroundTruth:
    """The request's ground truth, downloaded from S3 when it lives there."""
    if s3 is None:
        from embedsvc.adapters.aws import client

        s3 = client("s3")
    with tempfile.TemporaryDirectory(prefix="embedsvc-eval-") as tmp:
        root = Path(tmp)
        if request.ground_truth is not None:
            queries = _fetch(request.ground_truth, root, s3)
        else:
            assert request.queries is not None
            queries = _fetch(request.queries, root, s3)
        qrels = _fetch(request.qrels, root, s3) if request.qrels is not None else None
        return load_ground_truth(queries, qrels=qrels, name=request.name)


def runs_location(bucket: str | None = None) -> str:
    """Where the EvaluationFunction keeps runs and baselines: `s3://$EVAL_BUCKET/`."""
    import os

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


__all__ = [
    "CollectionNotFound",
    "EvaluationOutcome",
    "EvaluationRequest",
    "IndexReport",
    "IndexingFailed",
    "IndexingIncomplete",
    "InvalidEvaluationRequest",
    "content_type_for",
    "evaluate_collection",
    "evaluate_request",
    "index_corpus",
    "resolve_target",
    "run_cli",
    "search",
]
