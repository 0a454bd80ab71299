"""`embedsvc eval`: index a corpus, search the ground-truth queries, score, store, compare with the baseline.

`run_cli` wires the service in: on the embedded local stack by default, or with `--aws` on the
environment's AWS and Qdrant configuration. `run_eval` takes the service injected,
`index_corpus(model_key, collection, docs, progress)` and `search(model_key, collection, query_texts,
limit)`, and owns arguments, files and output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from embedsvc.charts.evaluation import render_chart
from embedsvc.services.evaluation.compare import Comparison, compare, gate_record
from embedsvc.services.evaluation.groundtruth import EvalDataError, GroundTruth, load_ground_truth
from embedsvc.services.evaluation.metrics import DEFAULT_METRICS
from embedsvc.services.evaluation.runner import ProgressFn, evaluate
from embedsvc.services.evaluation.runs import Run, open_run_store, write_trec_run

IndexCorpusFn = Callable[[str, str, Mapping[str, str], ProgressFn], Any]
CliSearchFn = Callable[[str, str, list[str], int], list[list[tuple[str, float]]]]

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2

_DESCRIPTION = """\
Measure retrieval quality of one embedding model on a ground truth, with trec_eval's definitions
(so the numbers compare with published tables): nDCG@10, Recall@5, Recall@10, Precision@5, MRR@10
and Hit@5, averaged over the queries that have at least one relevant document.

Steps: load the ground truth -> embed and index the corpus into a collection (skipped without
--corpus: the collection must then exist) -> search every query -> score -> store the run, compare it
with the baseline of its (content type, ground truth) -> optionally write a TREC run file and a chart.

Ground truth, either:
  * BEIR files: --queries queries.jsonl ({"_id","text"}) and --qrels qrels/<split>.tsv
    ("query-id corpus-id score", graded; a header line is allowed), with --corpus corpus.jsonl
    ({"_id","title","text"}; document text = title + " " + text). --queries may also be a BEIR
    dataset directory holding corpus.jsonl, queries.jsonl and qrels/.
  * the project's JSON lines (no --qrels), one query per line:
    {"id": "q1", "query": "...", "relevant_passages": [ids], "irrelevant_passages": [ids]}
    (relevant_passages may also be {id: grade})
    ("id" optional: q1..qN by line). Known-irrelevant passages found in the top 10 are reported.
  * Bible verses as a corpus: --corpus bible/bsb_verses.jsonl ({"id","text",...}).

Where it runs: by default on the embedded local stack (moto for DynamoDB/SQS, Qdrant local mode on
disk under --workdir, the local model), so it needs no AWS account; a second run finds the corpus
already indexed and only searches. With --aws it uses the environment's configuration instead
(AWS credentials and region, QDRANT_URL or QDRANT_PATH, EMBEDSVC_REGISTRY_*, CACHE_TABLE, LEDGER_TABLE).
Documents are indexed through the worker path (IndexQueue messages of 100, priority bulk, source
evaluation) into <content_type>_<model>; queries are embedded by the router and searched in the
collection, exactly as users search.

Progress and warnings go to stderr; results go to stdout."""

_EPILOG = """\
examples:
  # SciFact (BEIR), local model; keep runs in runs/ and compare with the stored baseline
  embedsvc eval --corpus ../shared/data/scifact/corpus.jsonl \\
      --queries ../shared/data/scifact/queries.jsonl \\
      --qrels ../shared/data/scifact/qrels/train.tsv --model minilm --runs-dir runs/

  # the same, for a script: the last line of stdout is one JSON object
  embedsvc eval --queries ../shared/data/scifact --model minilm --format json

  # make this run the baseline that later runs (e.g. a new model) are gated against
  embedsvc eval --queries ../shared/data/scifact --model minilm --runs-dir s3://my-bucket/eval --baseline

  # Bible cross references: each query is a verse, so drop it from its own results
  embedsvc eval --corpus ../shared/data/bible/bsb_verses.jsonl \\
      --queries ../shared/data/bible_eval/xref/queries_bsb.jsonl \\
      --qrels ../shared/data/bible_eval/xref/qrels/dev.tsv --model minilm --exclude-self

  # a JSON-lines ground truth against a collection the service already keeps
  embedsvc eval --queries ground_truth.jsonl --model te3s --collection verses_te3s

  # the same on the deployed service (AWS credentials, QDRANT_URL, registry from the environment)
  embedsvc eval --queries ground_truth.jsonl --model minilm --collection verse_minilm --aws

exit status:
  0  evaluated (and, with a baseline, the gate passed)
  1  the gate failed: a metric dropped by more than --max-drop points with p < --alpha
     (paired randomization test over the per-query values, 10,000 rounds, seed 0)
  2  bad input (ground truth, options, collection name) or a service error; the message names the
     file, line and id where there is one"""


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `eval` command on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="measure retrieval quality (nDCG@10, Recall@5, P@5, MRR@10, Hit@5) on a ground truth",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("ground truth")
    data.add_argument(
        "--queries",
        required=True,
        metavar="PATH",
        help="queries: a BEIR queries.jsonl, a BEIR dataset directory, or a JSON-lines ground truth file "
        "(which carries its own judgements). Required.",
    )
    data.add_argument(
        "--qrels",
        metavar="PATH",
        help="judgements for BEIR-style queries: a TSV 'query-id corpus-id score' (graded; grade > 0 is "
        "relevant) or a qrels/ directory (then see --split). Not used with a JSON-lines ground truth.",
    )
    data.add_argument(
        "--corpus",
        metavar="PATH",
        help="documents to embed and index before searching: BEIR corpus.jsonl or Bible verses jsonl. Every "
        "judged id must be in it. Default: none, the collection is searched as it is.",
    )
    data.add_argument(
        "--split",
        metavar="NAME",
        help="which qrels/<NAME>.tsv to use when --qrels (or the dataset directory) holds several, e.g. test.",
    )
    data.add_argument(
        "--name",
        metavar="NAME",
        help="ground-truth name recorded in the run and used to find its baseline. "
        "Default: from the paths, e.g. scifact/train.",
    )
    data.add_argument(
        "--limit-queries",
        type=_positive_int,
        metavar="N",
        help="evaluate only the first N queries (a quick check; the whole corpus is still indexed). "
        "Cannot be combined with --baseline. Default: all.",
    )

    search = p.add_argument_group("model and search")
    search.add_argument(
        "--model",
        required=True,
        metavar="KEY",
        help="registered model key to embed with, e.g. minilm, te3s. Required.",
    )
    search.add_argument(
        "--collection",
        metavar="NAME",
        help="vector collection (or alias) to index into and search. With --corpus it must be named "
        "<content_type>_<model>, the only collections the worker writes (content type: [a-z][a-z0-9_]*, "
        "at most 63 characters). Default: eval_<ground truth>_<model>, e.g. eval_scifact_train_minilm. "
        "The baseline scope is the collection name without its _<model> suffix.",
    )
    search.add_argument(
        "--aws",
        action="store_true",
        help="run on the environment's AWS and Qdrant configuration (AWS credentials and region, QDRANT_URL "
        "or QDRANT_PATH, EMBEDSVC_REGISTRY_*, CACHE_TABLE, LEDGER_TABLE) instead of the embedded local "
        "stack. Default: off, the local stack under --workdir.",
    )
    search.add_argument(
        "--workdir",
        metavar="DIR",
        help="local state: the local stack's Qdrant files (so a second run finds the corpus indexed), its "
        "cost log, and the default --runs-dir. Default: .local/eval in the repository.",
    )
    search.add_argument(
        "--exclude-self",
        action="store_true",
        help="drop each query's own id from its results before cutting at k (for verse-to-verse cross "
        "references, where a verse is its own best match). Default: off.",
    )
    search.add_argument(
        "--depth",
        type=_positive_int,
        default=100,
        metavar="K",
        help="results fetched per query and kept in the run file (at least 10). Default: 100.",
    )

    out = p.add_argument_group("output and storage")
    out.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="table: a readable table; json: the last stdout line is one JSON object with ndcg_at_10, "
        "recall_at_5, recall_at_10, precision_at_5, mrr_at_10, hit_at_5, queries, model, collection, "
        "run_id and, with a baseline, comparison. Default: table.",
    )
    out.add_argument(
        "--run-file",
        metavar="PATH",
        help="also write the results as a TREC run file (qid Q0 docid rank score tag).",
    )
    out.add_argument(
        "--runs-dir",
        metavar="DIR",
        help="store the run (JSON + TREC file) in this directory or s3://bucket/prefix, and compare it with "
        "the baseline stored there for the same content type and ground truth. Default: <workdir>/runs, "
        "i.e. .local/eval/runs.",
    )
    out.add_argument(
        "--baseline",
        action="store_true",
        help="after comparing, make this run the baseline for its content type and ground truth "
        "(kept in --runs-dir). The exit status still reports the comparison with the previous baseline.",
    )
    out.add_argument(
        "--chart",
        metavar="PATH",
        help="write a PNG bar chart of the metrics (this run next to its baseline).",
    )
    gate = p.add_argument_group("gate")
    gate.add_argument(
        "--max-drop",
        type=float,
        default=3.0,
        metavar="POINTS",
        help="the gate fails a metric that drops by more than POINTS (metric x 100) against the baseline, "
        "if the drop is also significant (see --alpha). Default: 3.0.",
    )
    gate.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        metavar="P",
        help="significance level a drop must reach under the paired randomization test to fail the gate. "
        "Default: 0.05.",
    )
    p.set_defaults(command="eval", func=run_cli)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def default_collection(ground_truth: str, model_key: str) -> str:
    """`eval_<ground truth>_<model>`, with the ground-truth name folded to [a-z0-9_]."""
    slug = re.sub(r"[^a-z0-9]+", "_", ground_truth.lower()).strip("_") or "gt"
    return f"eval_{slug}_{model_key}"


@contextlib.contextmanager
def _progress(label: str, unit: str, err: TextIO) -> Iterator[ProgressFn]:
    """A ProgressFn drawing a tqdm bar on `err`, closed however the step ends.

    On a terminal the bar redraws; elsewhere (logs, CI) it is redrawn at most every 10 s, so logs stay short.
    """
    try:
        from tqdm import tqdm  # in the `local` extra only: without it, a run shows no bar
    except ImportError:
        yield lambda done, total: None
        return
    isatty = getattr(err, "isatty", None)
    tty = bool(callable(isatty) and isatty())
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        # Made on the first report, so that a step failing before any progress leaves no empty bar.
        if not bars:
            bars.append(tqdm(total=total, desc=label, unit=unit, file=err, mininterval=0.1 if tty else 10.0))
        bar = bars[0]
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def run_eval(
    args: argparse.Namespace,
    *,
    index_corpus: IndexCorpusFn,
    search: CliSearchFn,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    default_runs_dir: str | None = None,
) -> int:
    """Run `embedsvc eval` with injected indexing and search; returns the exit status.

    Without --runs-dir the run is stored in `default_runs_dir` (not stored when that is None too).
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    if not args.runs_dir and default_runs_dir:
        args.runs_dir = default_runs_dir

    def info(message: str) -> None:
        print(message, file=err, flush=True)

    if args.baseline and not args.runs_dir:
        info("error: --baseline needs --runs-dir (where the baseline is kept)")
        return EXIT_BAD_INPUT
    if args.baseline and args.limit_queries:
        info("error: --baseline with --limit-queries would gate later runs on a subset; drop one of them")
        return EXIT_BAD_INPUT
    if args.depth < 10:
        info("error: --depth must be at least 10 (nDCG@10 and MRR@10 look that deep)")
        return EXIT_BAD_INPUT
    try:
        gt = load_ground_truth(
            args.queries, qrels=args.qrels, corpus=args.corpus, split=args.split, name=args.name
        )
        store = open_run_store(args.runs_dir) if args.runs_dir else None
    except (EvalDataError, ValueError) as exc:
        info(f"error: {getattr(exc, 'message', exc)}")
        return EXIT_BAD_INPUT
    for warning in gt.warnings:
        info(f"warning: {warning}")
    if args.limit_queries:
        gt = gt.head(args.limit_queries)
    collection = args.collection or default_collection(gt.name, args.model)
    _hint_exclude_self(gt, args.exclude_self, info)
    info(
        f"ground truth {gt.name}: {len(gt.queries)} queries, {len(gt.evaluable_queries)} with relevant documents"
    )

    if gt.corpus is not None:
        info(f"indexing {len(gt.corpus)} documents into {collection} with {args.model}")
        with _progress("indexed", "doc", err) as progress:
            index_corpus(args.model, collection, gt.corpus, progress)
    else:
        info(f"no --corpus: searching {collection} as it is")

    def bound_search(texts: list[str], limit: int) -> list[list[tuple[str, float]]]:
        return search(args.model, collection, texts, limit)

    with _progress("searched", "query", err) as progress:
        run = evaluate(
            gt,
            search=bound_search,
            k_search=args.depth,
            exclude_self=args.exclude_self,
            model_key=args.model,
            collection=collection,
            metrics=DEFAULT_METRICS,
            progress=progress,
        )

    baseline: Run | None = None
    comparison: Comparison | None = None
    if store is not None:
        baseline = store.baseline(run.baseline_key)
        if baseline is not None:
            comparison = compare(baseline, run, max_drop_points=args.max_drop, alpha=args.alpha)
            run.params["gate"] = gate_record(baseline, comparison)  # the stored run says if it failed
        else:
            info(f"no baseline yet for {run.baseline_key[0]} / {run.baseline_key[1]}")
        store.save(run)
        info(f"run {run.run_id} stored in {store}")
        if args.baseline:
            store.set_baseline(run.baseline_key, run.run_id)
            info(f"run {run.run_id} is now the baseline for {run.baseline_key[0]} / {run.baseline_key[1]}")
    if args.run_file:
        write_trec_run(run.results, args.run_file, tag=run.model_key)
        info(f"TREC run file written to {args.run_file}")
    if args.chart:
        if baseline is not None:
            render_chart(
                [baseline, run], args.chart, labels=[f"{baseline.model_key} (baseline)", run.model_key]
            )
        else:
            render_chart([run], args.chart)
        info(f"chart written to {args.chart}")

    if args.format == "json":
        print(json.dumps(_summary(run, comparison), ensure_ascii=False), file=out, flush=True)
    else:
        print(_table(run, gt, comparison), file=out, flush=True)
    return EXIT_GATE_FAILED if comparison is not None and not comparison.passed else EXIT_OK


def _hint_exclude_self(gt: GroundTruth, exclude_self: bool, info: Callable[[str], None]) -> None:
    if exclude_self or not gt.corpus or not gt.queries:
        return
    if all(qid in gt.corpus for qid in gt.queries):
        info(
            "hint: every query id is also a document id (verse-to-verse?); --exclude-self drops the query itself"
        )


def _summary(run: Run, comparison: Comparison | None) -> dict[str, Any]:
    summary: dict[str, Any] = {m: run.aggregate[m] for m in run.aggregate}
    summary.update(
        {
            "queries": run.queries,
            "queries_without_relevant": len(run.skipped),
            "model": run.model_key,
            "collection": run.collection,
            "ground_truth": run.ground_truth,
            "run_id": run.run_id,
            "exclude_self": bool(run.params.get("exclude_self")),
            "queries_with_irrelevant_in_top_10": len(run.irrelevant_hits),
        }
    )
    if comparison is not None:
        summary["passed"] = comparison.passed
        summary["comparison"] = comparison.to_dict()
    return summary


def _table(run: Run, gt: GroundTruth, comparison: Comparison | None) -> str:
    lines = [
        f"ground truth {run.ground_truth} | model {run.model_key} | collection {run.collection}",
        f"run {run.run_id}",
        f"{run.queries} queries with relevant documents averaged"
        + (f" ({len(run.skipped)} without any are not)" if run.skipped else ""),
        "",
        f"{'metric':<16}{'value':>8}",
    ]
    lines.extend(f"{m:<16}{run.aggregate[m]:>8.4f}" for m in run.aggregate)
    if gt.irrelevant:
        lines.append("")
        lines.append(f"queries with known-irrelevant passages in their top 10: {len(run.irrelevant_hits)}")
        for qid, hits in list(run.irrelevant_hits.items())[:10]:
            shown = ", ".join(f"{doc} at rank {r}" for doc, r in hits)
            lines.append(f"  {qid} ({gt.queries[qid][:50]}): {shown}")
        if len(run.irrelevant_hits) > 10:
            lines.append(f"  ... {len(run.irrelevant_hits) - 10} more in the run file")
    if comparison is not None:
        lines.append("")
        lines.append(comparison.format_table())
    return "\n".join(lines)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_workdir() -> Path:
    """Where `embedsvc eval` keeps its local state by default: .local/eval in the repository."""
    from embedsvc.local.stack import ROOT

    return ROOT / ".local" / "eval"


def run_cli(args: argparse.Namespace) -> int:
    """`embedsvc eval`: on the embedded local stack (default) or the environment's AWS (`--aws`)."""
    # Counting tokens, transformers warns about every abstract longer than the model window; the
    # model truncates them itself (as the published numbers assume), so the warning only misleads.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    workdir = Path(args.workdir) if getattr(args, "workdir", None) else default_workdir()
    if getattr(args, "aws", False):
        _stderr("using the environment's AWS and Qdrant configuration (--aws)")
        return _run_cli(args, workdir, aws=True)
    from embedsvc.local.stack import LocalStack

    _stderr(f"starting the embedded local stack in {workdir} (Qdrant on disk in {workdir / 'qdrant'})")
    with LocalStack(workdir, serve_api=False, content_store=False):  # the corpus is indexed from files
        return _run_cli(args, workdir, aws=False)


def _run_cli(args: argparse.Namespace, workdir: Path, *, aws: bool) -> int:
    from embedsvc import container
    from embedsvc.observability import CostRecorder
    from embedsvc.services.evaluation.corpus import IndexReport, index_corpus, indexable_content_type
    from embedsvc.services.evaluation.retrieval import evaluation_search
    from embedsvc.services.search import CollectionNotFound

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
        indexable_content_type(args.collection, args.model)  # refuse a bad name before loading anything
    task_id = f"eval-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"

    def index(model_key: str, collection: str, docs: Mapping[str, str], progress: ProgressFn) -> IndexReport:
        return index_corpus(model_key, collection, docs, progress, task_id=task_id)

    def find(model_key: str, collection: str, texts: list[str], limit: int) -> list[list[tuple[str, float]]]:
        try:
            return evaluation_search(model_key, collection, texts, limit, task_id=task_id)
        except CollectionNotFound as exc:
            # The service cannot know the fix; the CLI can (its own --corpus option).
            raise CollectionNotFound(
                f"{exc.message}; index a corpus into it first (embedsvc eval --corpus ...)", param=exc.param
            ) from None

    try:
        return run_eval(args, index_corpus=index, search=find, default_runs_dir=str(workdir / "runs"))
    finally:
        flush = getattr(container.cache(), "flush", None)
        if callable(flush):
            try:
                flush()
            except Exception as exc:  # a cache write lost is a future miss, not a failed evaluation
                _stderr(f"warning: embedding cache writes not flushed: {exc!r}")
