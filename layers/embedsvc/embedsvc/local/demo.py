"""`make demo`: the service's main job on the embedded defaults, end to end.

1. embeds Bible verses through the API with the official `openai` SDK (progress shown);
2. embeds them again: every vector now comes from the cache, at no provider cost;
3. commits them to the content store (Postgres) with `POST /v1/documents/verse:import`, which queues
   their indexing: IndexQueue -> worker (reads each row by id) -> Qdrant (local mode, on disk);
4. runs a few semantic queries through `POST /v1/search`;
5. writes private notes with `PUT /v1/documents/note/{id}` and shows another tenant cannot find them;
6. breaks the index on purpose (vectors dropped, orphans added, a verse corrected in Postgres directly,
   saves while Qdrant is down), runs the audit and the repair, and shows every gap close;
7. evaluates retrieval on the OpenBible topical ground truth (when the evaluation package is present);
8. prints tokens and cost by source.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedsvc.local import demo_content
from embedsvc.local.stack import ROOT, LocalStack

DATA = ROOT.parent / "shared" / "data"
DEFAULT_BOOKS = ("Ruth", "Jonah", "John", "Rom", "Phil", "Jas", "1John", "Ps")
QUERIES = (
    "God's faithfulness even when we are unfaithful",
    "do not be anxious about anything",
    "love your neighbour as yourself",
    "faith without works is dead",
    "the Lord is my shepherd",
)
BATCH = 256


def load_verses(path: Path, books: tuple[str, ...] | None) -> list[dict]:
    """Verses with text (this translation leaves a few empty), optionally only some books (OSIS names)."""
    verses = []
    with path.open() as fh:
        for line in fh:
            verse = json.loads(line)
            if verse["text"].strip() and (books is None or verse["osis_book"] in books):
                verses.append(verse)
    return verses


def progress_bar(total: int, label: str) -> Any:
    """A tqdm bar on stderr; off a terminal it is redrawn at most every 10 s, so logs stay short."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"  {label}",
        unit="verse",
        file=sys.stderr,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def embed_through_api(client, verses: list[dict], model: str, label: str) -> tuple[int, int]:
    """Embed every verse via POST /v1/embeddings; returns (tokens, cache hits)."""
    tokens, hits = 0, 0
    with progress_bar(len(verses), label) as bar:
        for chunk in batches(verses, BATCH):
            raw = client.embeddings.with_raw_response.create(
                model=model,
                input=[v["text"] for v in chunk],
                extra_headers={"X-Cost-Source": "verse_index", "X-Task-Id": "demo"},
            )
            response = raw.parse()
            tokens += response.usage.prompt_tokens
            hits += int(raw.headers.get("x-cache-hits", 0))
            bar.update(len(chunk))
    return tokens, hits


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="embedsvc demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--all", action="store_true", help="embed all 31,102 verses (default: a few books)")
    parser.add_argument(
        "--books", default=",".join(DEFAULT_BOOKS), help="OSIS book names (default: %(default)s)"
    )
    parser.add_argument(
        "--verses", type=Path, default=DATA / "bible" / "bsb_verses.jsonl", help="verses JSONL"
    )
    parser.add_argument(
        "--model", default="all-MiniLM-L6-v2", help="model name or key (default: %(default)s)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / ".local" / "demo", help="local state (default: %(default)s)"
    )
    parser.add_argument("--skip-eval", action="store_true", help="skip the retrieval evaluation step")
    args = parser.parse_args(argv)

    from openai import OpenAI

    if not args.verses.exists():
        print(
            f"error: verses file not found: {args.verses} (expected ../shared/data beside the repository)",
            file=sys.stderr,
        )
        return 2
    books = None if args.all else tuple(b.strip() for b in args.books.split(",") if b.strip())
    verses = load_verses(args.verses, books)
    if not verses:
        print(f"error: no verses for books {books}", file=sys.stderr)
        return 2
    print(
        f"Embedding service demo: {len(verses):,} verses ({'all books' if books is None else ', '.join(books)})"
    )
    shutil.rmtree(args.workdir, ignore_errors=True)  # a fresh run every time: cold cache, empty collection
    with LocalStack(args.workdir, run_poller=False) as stack:
        client = OpenAI(base_url=stack.api_url, api_key=stack.api_key)
        print(f"\n1. API at {stack.api_url} (official openai SDK, default settings)")
        t0 = time.perf_counter()
        tokens, hits = embed_through_api(client, verses, args.model, "first pass ")
        first = time.perf_counter() - t0
        print(f"   {len(verses):,} vectors, {tokens:,} tokens, {hits} cache hits, {first:.1f}s")
        print("\n2. The same verses again: every vector comes from the cache")
        t0 = time.perf_counter()
        _, hits = embed_through_api(client, verses, args.model, "second pass")
        print(
            f"   {hits:,}/{len(verses):,} cache hits, {time.perf_counter() - t0:.1f}s (first pass {first:.1f}s)"
        )

        print(
            f"\n3. Content store (Postgres: {stack.database.kind}) -> IndexQueue -> EmbedWorkerFunction -> Qdrant"
        )
        index_through_queue(stack, verses)

        print("\n4. Semantic search: POST /v1/search (the query embedded through the router and cache)")
        search_examples(stack)

        print("\n5. Private notes: write-through, visible to their owner only")
        demo_content.private_notes(stack)

        print("\n6. Consistency: break the index on purpose, then audit and repair")
        healed = demo_content.break_and_heal(stack, verses, random.Random(11))

        if not args.skip_eval:
            print("\n7. Retrieval quality on OpenBible topics (weak, crowd-made ground truth)")
            evaluate_topics(verses)

        print("\n8. What it cost: the daily cost roll-up (DynamoDB), as `embedsvc costs` reads it")
        print_costs(args.workdir)
    return 0 if healed["gaps_after"] == 0 else 1


def index_through_queue(stack: LocalStack, verses: list[dict]) -> None:
    from embedsvc import container

    poller = stack.make_poller()
    sys.stderr.write(
        f"  worker batch size {poller.batch_size}, batching window {poller.window}s (from template.yaml)\n"
    )
    started = time.perf_counter()
    with progress_bar(len(verses), "indexing   ") as bar:
        totals = demo_content.import_verses(stack, verses, bar)
    store = container.vector_store()
    collection = "verse_" + container.model_config().get("verse").active
    print(
        f"   {totals['committed']:,} verses committed, {totals['queued']:,} index requests queued; "
        f"{store.count(collection):,} points in {collection}, {totals['worker_batches']} worker batches, "
        f"{time.perf_counter() - started:.1f}s"
    )


def search_examples(stack: LocalStack) -> None:
    with demo_content.api_client(stack) as api:
        for query in QUERIES:
            answer = api.post(
                "/search", json={"query": query, "content_type": "verse", "top_k": 3, "include": ["text"]}
            )
            answer.raise_for_status()
            print(f'   "{query}"')
            for hit in answer.json()["data"]:
                text = hit.get("text", "")
                print(
                    f"     {hit['score']:.3f}  {hit['id']:<12} {text[:90]}{'...' if len(text) > 90 else ''}"
                )


def evaluate_topics(verses: list[dict]) -> None:
    try:
        from embedsvc.local.demo_eval import evaluate_bible_topics
    except ImportError:
        print("   (evaluation package not available)")
        return
    evaluate_bible_topics(DATA / "bible_eval" / "topics", {v["id"] for v in verses})


def print_costs(workdir: Path) -> None:
    """Flush this process's costs to the roll-up, print the report, draw the chart, and save the table.

    moto keeps the table in memory, so it dies with this process: its items are saved to
    costs-table.jsonl, which `embedsvc costs` loads into its own moto (the same queries as on AWS).
    """
    from embedsvc import container
    from embedsvc.charts.costs import render_spend_chart
    from embedsvc.cli.costs import SNAPSHOT_NAME, default_workdir, format_report
    from embedsvc.services.costs import build_report

    flushed = container.costs().flush()  # what ran outside a handler (the demo's direct saves)
    store = container.cost_store()
    report = build_report(store, days=2)  # today and yesterday: a run may cross midnight UTC
    chart = render_spend_chart(report["per_day"], workdir / "costs.png")
    saved = store.export_items(workdir / SNAPSHOT_NAME)
    print("   " + format_report(report).replace("\n", "\n   "))
    if flushed.dropped:
        print(f"   warning: {flushed.dropped} roll-up items could not be written")
    print(f"   chart: {chart}")
    same = "" if workdir.resolve() == default_workdir().resolve() else f" --workdir {workdir}"
    print(f"   roll-up saved ({saved} items) to {workdir / SNAPSHOT_NAME}")
    print(f"   read it again, as on AWS: embedsvc costs{same} --format json")
