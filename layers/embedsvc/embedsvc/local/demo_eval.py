"""The demo's evaluation step: OpenBible topical queries against the verses the demo indexed.

The demo indexes a few books, so only the topics whose judged verses lie in those books can be
answered; judgements are restricted to the indexed verses and topics left with none are dropped
(the numbers measure ranking within the indexed books, not recall over the whole Bible).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Set
from pathlib import Path
from typing import TextIO

from embedsvc.services.evaluation.groundtruth import GroundTruth, load_beir
from embedsvc.services.evaluation.runs import Run

CONTENT_TYPE = "verse"


def restrict_to_indexed(gt: GroundTruth, indexed_ids: Set[str]) -> GroundTruth:
    """The ground truth with judgements outside `indexed_ids` removed (see `GroundTruth.restricted_to`)."""
    return gt.restricted_to(indexed_ids)


def _demo_workdir() -> Path:
    # Inside the demo's LocalStack, Qdrant lives in <workdir>/qdrant.
    qdrant_path = os.environ.get("QDRANT_PATH")
    if qdrant_path:
        return Path(qdrant_path).parent
    from embedsvc.local.stack import ROOT

    return ROOT / ".local" / "demo"


def evaluate_bible_topics(
    topics_dir: Path | str,
    indexed_ids: Set[str],
    *,
    workdir: Path | str | None = None,
    model_key: str | None = None,
    collection: str | None = None,
    out: TextIO | None = None,
) -> Run | None:
    """Evaluate the indexed verses on `bible_eval/topics`; print a table, write a chart; return the run.

    Runs inside the demo's local stack: queries are embedded through the service and searched in
    `verse_<active model>`, as users search. The run is stored in <workdir>/eval-runs and the chart
    written to <workdir>/eval_topics.png.
    """
    from embedsvc import container
    from embedsvc.charts.evaluation import render_chart
    from embedsvc.services.evaluation.retrieval import evaluation_search
    from embedsvc.services.evaluation.runner import evaluate
    from embedsvc.services.evaluation.runs import LocalRunStore

    out = out or sys.stdout
    topics_dir = Path(topics_dir)
    queries, qrels = topics_dir / "queries.jsonl", topics_dir / "qrels" / "dev.tsv"
    if not queries.is_file() or not qrels.is_file():
        print(f"   (no topical ground truth at {topics_dir}: skipped)", file=out)
        return None
    full = load_beir(queries, qrels, name="bible-topics/dev")
    gt = restrict_to_indexed(full, indexed_ids)
    judged = sum(1 for docs in full.qrels.values() for g in docs.values() if g > 0)
    kept = sum(1 for docs in gt.qrels.values() for g in docs.values() if g > 0)
    print(
        f"   {len(gt.queries):,} of {len(full.queries):,} topics have relevant verses among the "
        f"{len(indexed_ids):,} indexed ({kept:,} of {judged:,} judgements kept)",
        file=out,
    )
    if not gt.queries:
        print("   nothing to evaluate: index more books (embedsvc demo --all)", file=out)
        return None
    model_key = model_key or container.model_config().get(CONTENT_TYPE).active
    collection = collection or f"{CONTENT_TYPE}_{model_key}"

    def find(texts: list[str], limit: int) -> list[list[tuple[str, float]]]:
        return evaluation_search(model_key, collection, texts, limit, task_id="demo-eval")

    run = evaluate(gt, search=find, k_search=100, model_key=model_key, collection=collection)
    workdir = Path(workdir) if workdir is not None else _demo_workdir()
    store = LocalRunStore(workdir / "eval-runs")
    store.save(run)
    print(f"   {'metric':<16}{'value':>8}", file=out)
    for metric, value in run.aggregate.items():
        print(f"   {metric.replace('_at_', '@'):<16}{value:>8.4f}", file=out)
    shown: set[str] = set()
    for qid in sorted(run.per_query, key=lambda q: (-run.per_query[q]["ndcg_at_10"], q)):
        top = run.results[qid][0][0] if run.results[qid] else "-"
        if top in shown:
            continue  # "beard" and "beards" find the same verse: show different ones
        shown.add(top)
        if len(shown) > 3:
            break
        print(
            f'   e.g. "{gt.queries[qid]}": nDCG@10 {run.per_query[qid]["ndcg_at_10"]:.2f}, top hit {top}',
            file=out,
        )
    chart = render_chart(
        [run],
        workdir / "eval_topics.png",
        title=f"OpenBible topics on {len(indexed_ids):,} indexed verses ({run.queries:,} queries, {model_key})",
    )
    print(f"   chart: {chart}", file=out)
    print(f"   run {run.run_id} stored in {store}", file=out)
    return run
