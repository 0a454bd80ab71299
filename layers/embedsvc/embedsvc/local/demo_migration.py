"""`make demo-migration`: a model migration under load, and the evaluation gate refusing a weaker model.

1. starts the local stack with the migration state machines (the real ASL file on moto's executor, its
   Wait states fast-forwarded) and imports the verses of a few books through the API, indexed by the
   queue worker with `minilm`;
2. starts the worker, a searcher that POSTs /v1/search throughout (any non-200 is an error) and a writer
   that keeps updating and deleting random verses through the API while the migration runs;
3. migrates `verse` from minilm to minilm-int8 through MIGRATION_STATE_MACHINE_ARN, printing each phase,
   the backfill's progress, both evaluations, the backfill's tokens and cost, and the active model;
4. stops the writer, lets the queue drain, and checks that every write landed in the collection the alias
   `verse` points at (a live point at the row's version and hash, or no live point for a delete);
5. tries a migration to the weak minilm-m2v and shows the gate refuse it: the alias does not move and the
   candidate's collection is dropped;
6. ends with one JSON line; the exit status is 0 only when no search failed, no write was lost, the
   first migration succeeded and the second was refused.

One local stand-in is tuned while it runs (not part of the service): moto's SQS loses its O(queue depth)
work per message (`fast_moto_sqs`). Qdrant's local mode, which is not thread-safe, runs one call at a time
in the adapter itself (adapters/qdrant.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedsvc.cli.migrate import TERMINAL
from embedsvc.local import demo_content
from embedsvc.local.demo import DATA, load_verses, progress_bar
from embedsvc.local.stack import ROOT, LocalStack

CONTENT_TYPE = "verse"
SOURCE_MODEL = "minilm"
TARGET_MODEL = "minilm-int8"
WEAK_MODEL = "minilm-m2v"
DEFAULT_BOOKS = ("Ps", "Prov", "John")
QUICK_BOOKS = ("Jas",)  # 108 verses, 660 topical queries with a relevant verse in it: the gate still decides
TOPICS = DATA / "bible_eval" / "topics"
# Real seconds per ASL Wait second, and the longest real wait: the 48 h window passes in a few seconds.
WAIT_SCALE = 0.25
MAX_WAIT_SECONDS = 1.0


def check_interval_seconds(rows: int) -> int:
    """How often (ASL seconds) the workflow audits the new collection: about a 100th of the rows.

    A check audits the whole new collection, so checks far faster than the queue drains only cost CPU
    the worker needs; during the wait phase the real wait is that times WAIT_SCALE, not capped at
    MAX_WAIT_SECONDS (see `follow`).
    """
    return max(4, min(40, rows // 100))


@dataclass
class Tally:
    """What the background threads count, shared with the main thread (which phase it is, too)."""

    phase: str = "before the migration"
    lock: threading.Lock = field(default_factory=threading.Lock)
    searches: dict[str, int] = field(default_factory=dict)
    search_errors: dict[str, int] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)

    def count_search(self, error: str | None) -> None:
        with self.lock:
            self.searches[self.phase] = self.searches.get(self.phase, 0) + 1
            if error is not None:
                self.search_errors[self.phase] = self.search_errors.get(self.phase, 0) + 1
                if len(self.error_messages) < 20:
                    self.error_messages.append(f"[{self.phase}] {error}")


class Searcher(threading.Thread):
    """POST /v1/search with topical queries until stopped; every non-200 or exception is an error."""

    def __init__(self, stack: LocalStack, queries: list[str], tally: Tally, *, pause: float = 0.05):
        super().__init__(name="demo-searcher", daemon=True)
        self.stack, self.queries, self.tally, self.pause = stack, queries, tally, pause
        self.stopped = threading.Event()

    def run(self) -> None:
        rng = random.Random(7)
        with demo_content.api_client(self.stack) as api:
            while not self.stopped.is_set():
                query = rng.choice(self.queries)
                error: str | None = None
                try:
                    answer = api.post(
                        "/search", json={"query": query, "content_type": CONTENT_TYPE, "top_k": 5}
                    )
                    if answer.status_code != 200:
                        error = f"{answer.status_code} {answer.text[:300]}"
                    elif not isinstance(answer.json().get("data"), list):
                        error = f"200 without data: {answer.text[:300]}"
                except Exception as exc:  # a dropped connection is a failed search too
                    error = f"{type(exc).__name__}: {exc}"
                self.tally.count_search(error)
                self.stopped.wait(self.pause)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)


@dataclass
class Intent:
    """What the writer last made of a verse: its text, or deleted; `failed` when the API refused the write."""

    text: str | None
    failed: str | None = None

    @property
    def deleted(self) -> bool:
        return self.text is None


class Writer(threading.Thread):
    """PUT changed texts and DELETE random verses through the API, remembering each verse's final state."""

    def __init__(self, stack: LocalStack, verses: list[dict], *, seed: int = 5, pause: float = 0.05):
        super().__init__(name="demo-writer", daemon=True)
        self.stack, self.verses, self.pause = stack, verses, pause
        self.rng = random.Random(seed)
        self.intended: dict[str, Intent] = {}
        self.puts = 0
        self.deletes = 0
        self.errors: list[str] = []
        self.stopped = threading.Event()

    @property
    def writes(self) -> int:
        return self.puts + self.deletes

    def run(self) -> None:
        with demo_content.api_client(self.stack) as api:
            while not self.stopped.is_set():
                self.write_once(api)
                self.stopped.wait(self.pause)

    def write_once(self, api: Any) -> None:
        touched = list(self.intended)
        # Now and then the same verse again: an update after a delete brings it back, a delete after an update.
        if touched and self.rng.random() < 0.25:
            verse_id = self.rng.choice(touched)
            verse = next(v for v in self.verses if v["id"] == verse_id)
        else:
            verse = self.rng.choice(self.verses)
            verse_id = verse["id"]
        current = self.intended.get(verse_id)
        delete = not (current and current.deleted) and self.rng.random() < 0.3
        try:
            if delete:
                answer = api.delete(f"/documents/{CONTENT_TYPE}/{verse_id}")
                intent = Intent(None)
            else:
                text = f"{verse['text']} [edit {self.writes + 1}]"
                body = demo_content.verse_document({**verse, "text": text})
                answer = api.put(
                    f"/documents/{CONTENT_TYPE}/{verse_id}",
                    json={"text": body["text"], "metadata": body["metadata"]},
                )
                intent = Intent(text)
            if answer.status_code >= 300:
                intent.failed = (
                    f"{answer.request.method} {verse_id}: {answer.status_code} {answer.text[:200]}"
                )
        except Exception as exc:
            intent.failed = f"{'DELETE' if delete else 'PUT'} {verse_id}: {type(exc).__name__}: {exc}"
        if intent.failed:
            self.errors.append(intent.failed)
        elif delete:
            self.deletes += 1
        else:
            self.puts += 1
        self.intended[verse_id] = intent

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=60)


@contextmanager
def fast_moto_sqs() -> Iterator[None]:
    """moto's SQS without its quadratic bookkeeping, while the demo runs (same semantics, same answers).

    moto 5's SQS reads the clock through two datetime conversions per call, and on every message it
    sends (ContentBasedDeduplication) or receives (MessageRetentionPeriod) it builds the queue's whole
    attribute dict, whose three approximate counts walk every message in the queue: O(depth) per message.
    A backfill enqueues the whole content type at once, so that is O(n^2): 2,000 messages took 51 s to send
    and 218 s to receive here, 3 s each with this. The clock becomes `time.time()` (the same UTC epoch
    seconds) and the retention check reads the one attribute it needs.
    """
    import moto.sqs.models as sqs_models
    from moto.core import utils as moto_utils

    def unix_time(dt: Any = None) -> float:
        return time.time() if dt is None else moto_utils.unix_time(dt)

    def unix_time_millis(dt: Any = None) -> float:
        return time.time() * 1000.0 if dt is None else moto_utils.unix_time_millis(dt)

    def retained(self: Any, queue_name: str, message: Any) -> bool:
        retention = int(self.get_queue(queue_name).message_retention_period)
        return bool(retention + message.sent_timestamp / 1000 > time.time())

    backend = sqs_models.SQSBackend
    saved = (
        sqs_models.unix_time,
        sqs_models.unix_time_millis,
        backend.__dict__["is_message_valid_based_on_retention_period"],
    )
    sqs_models.unix_time, sqs_models.unix_time_millis = unix_time, unix_time_millis  # type: ignore[assignment]
    backend.is_message_valid_based_on_retention_period = retained  # type: ignore[method-assign]
    try:
        yield
    finally:
        sqs_models.unix_time, sqs_models.unix_time_millis = saved[0], saved[1]
        backend.is_message_valid_based_on_retention_period = saved[2]  # type: ignore[method-assign]


def load_queries(path: Path) -> list[str]:
    with path.open() as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


@dataclass(frozen=True)
class GateTruth:
    """The gate's ground truth: the topics' queries and a qrels file (all of it, or a sample of queries)."""

    queries: Path
    qrels: Path
    name: str
    evaluable: int  # judged queries with a relevant verse among those loaded
    used: int


def gate_ground_truth(workdir: Path, verse_ids: set[str], limit: int, *, seed: int = 3) -> GateTruth:
    """The OpenBible topics, cut to `limit` queries that have a relevant verse loaded (0: every query).

    Qdrant's local mode checks the search filter (`deleted`) point by point in Python, so each gate query
    costs O(points): 2,158 queries on 4,254 verses, twice, take many minutes here. A seeded sample keeps the
    gate's decision (the paired test has ample power at a few hundred queries) and the demo short.
    """
    qrels = TOPICS / "qrels" / "dev.tsv"
    with qrels.open() as fh:
        header, *lines = fh.read().splitlines()
    by_query: dict[str, list[str]] = {}
    relevant: set[str] = set()
    for line in lines:
        qid, corpus_id, *_ = line.split("\t")
        by_query.setdefault(qid, []).append(line)
        if corpus_id in verse_ids:
            relevant.add(qid)
    evaluable = sorted(relevant)
    if limit <= 0 or limit >= len(evaluable):
        return GateTruth(TOPICS / "queries.jsonl", qrels, "topics/dev", len(evaluable), len(evaluable))
    chosen = sorted(random.Random(seed).sample(evaluable, limit))
    sample = workdir / "gate-ground-truth" / "dev.tsv"
    sample.parent.mkdir(parents=True, exist_ok=True)
    sample.write_text("\n".join([header, *(line for qid in chosen for line in by_query[qid])]) + "\n")
    return GateTruth(TOPICS / "queries.jsonl", sample, f"topics/dev-sample-{limit}", len(evaluable), limit)


def migration_payload(target_model: str, check_interval: int, truth: GateTruth) -> dict[str, Any]:
    return {
        "content_type": CONTENT_TYPE,
        "target_model": target_model,
        "ground_truth": str(truth.queries),
        "qrels": str(truth.qrels),
        "ground_truth_name": truth.name,
        "rollback_window_seconds": 172800,
        "window_poll_seconds": 43200,
        "check_interval_seconds": check_interval,
        "max_metric_drop": 3.0,
        "requested_by": "demo-migration",
    }


def follow(
    stack: LocalStack, execution: str, tally: Tally, timeout: float, *, label: str = ""
) -> tuple[Any, dict[str, Any]]:
    """Print each phase as the record enters it, and the backfill's progress, until the execution ends."""
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.cli.migrate import progress_bar as backfill_bar

    sfn = client("stepfunctions")
    records = container.migration_records()
    started = time.monotonic()
    seen: list[str] = []
    shown: dict[str, tuple[Any, ...]] = {}

    def say(line: str) -> None:
        print(f"   {time.monotonic() - started:6.1f}s  {line}", flush=True)

    def show_backfill(record: dict[str, Any]) -> None:
        backfill = record.get("backfill") or {}
        progress = (backfill.get("queued"), backfill.get("total"), backfill.get("done"))
        if backfill and progress != shown.get("backfill"):
            shown["backfill"] = progress
            queued, total = int(backfill.get("queued", 0)), int(backfill.get("total", 0))
            done = " done" if backfill.get("done") else ""
            say(f"backfill queued {backfill_bar(min(queued, total), total)}{done}")

    def show_check(record: dict[str, Any]) -> None:
        check = record.get("last_check") or {}
        point = (check.get("checks"), check.get("points"), check.get("missing"), check.get("stale"))
        if check and point != shown.get("check"):
            shown["check"] = point
            say(
                f"new collection: {check.get('points'):,} points, {check.get('missing'):,} missing, "
                f"{check.get('stale')} stale (check {check.get('checks')})"
            )

    while True:
        status = sfn.describe_execution(executionArn=execution)["status"]
        record = records.latest(CONTENT_TYPE) or {}
        if record.get("execution") != execution:
            record = {}  # the previous migration's record until Begin creates this one
        for phase in (record.get("phases") or [])[len(seen) :]:
            # What a phase left in the record is shown before the phases that came after it.
            if phase not in ("begin", "shadow", "backfill"):
                show_backfill(record)
            if phase not in ("begin", "shadow", "backfill", "wait"):
                show_check(record)
            seen.append(phase)
            tally.phase = f"{label}{phase}"
            # The wait phase polls at its own pace; every other Wait (settling, the 48 h window) is capped.
            stack.sfn.max_wait_seconds = None if phase == "wait" else MAX_WAIT_SECONDS
            say(f"phase: {phase}")
        show_backfill(record)
        show_check(record)
        if status in TERMINAL:
            break
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{execution} still {status} after {timeout:.0f} s")
        time.sleep(0.5)
    stack.sfn.max_wait_seconds = MAX_WAIT_SECONDS
    result = stack.sfn.wait(execution, timeout=30)
    final = records.latest(CONTENT_TYPE) or {}
    say(
        f"execution {result.status}{f': {result.error}' if result.error else ''} "
        f"({len(result.states_entered)} states entered)"
    )
    return result, final


def print_gate(record: dict[str, Any]) -> None:
    gate = record.get("gate") or {}
    if not gate:
        print("   (no evaluation recorded)")
        return
    old, new = gate.get("old_metrics") or {}, gate.get("new_metrics") or {}
    regressions = set(gate.get("regressions") or [])
    print(
        f"   evaluation on {gate.get('queries'):,} topical queries (OpenBible, restricted to the verses loaded): "
        f"gate {'passed' if gate.get('passed') else 'FAILED'}"
    )
    if gate.get("changed_during_gate"):
        print(
            f"   {gate['changed_during_gate']} verses written while the gate searched: left out of both runs"
        )
    print(
        f"     {'metric':<16}{gate.get('old_model', 'old'):>12}{gate.get('new_model', 'new'):>12}{'delta':>9}"
    )
    for metric in old:
        delta = 100 * (new.get(metric, 0.0) - old[metric])
        mark = "  regressed" if metric in regressions else ""
        print(f"     {metric:<16}{old[metric]:>12.4f}{new.get(metric, 0.0):>12.4f}{delta:>+8.1f}p{mark}")


def wait_for_queue(timeout: float = 300) -> dict[str, int]:
    """Until IndexQueue holds nothing, in flight included (the background worker drains it)."""
    from embedsvc.adapters.aws import client

    sqs = client("sqs")
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    deadline = time.monotonic() + timeout
    empty_rounds = 0
    while True:
        attributes = sqs.get_queue_attributes(QueueUrl=os.environ["INDEX_QUEUE_URL"], AttributeNames=names)
        depth = sum(int(attributes["Attributes"].get(name, 0)) for name in names)
        empty_rounds = empty_rounds + 1 if depth == 0 else 0
        if empty_rounds >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    dlq = sqs.get_queue_attributes(QueueUrl=os.environ["INDEX_DLQ_URL"], AttributeNames=names[:1])
    return {"queued": depth, "dead_lettered": int(dlq["Attributes"].get(names[0], 0))}


def lost_writes(intended: dict[str, Intent]) -> tuple[int, list[str]]:
    """Writes not as intended in the collection the alias points at (and a write the API refused)."""
    from embedsvc import container
    from embedsvc.adapters.content_store import content_hash, content_point_id

    vectors, store = container.vector_store(), container.content_store()
    collection = vectors.alias_target(CONTENT_TYPE) or f"{CONTENT_TYPE}_{TARGET_MODEL}"
    pids = {verse_id: content_point_id(CONTENT_TYPE, verse_id, None) for verse_id in intended}
    rows = store.rows_by_point(CONTENT_TYPE, list(pids.values()))
    payloads = vectors.payloads(collection, list(pids.values())) if vectors.exists(collection) else {}
    lost: list[str] = []
    for verse_id, intent in sorted(intended.items()):
        row, payload = rows.get(pids[verse_id]), payloads.get(pids[verse_id])
        if intent.failed:
            lost.append(f"{verse_id}: the API refused the write ({intent.failed})")
        elif row is None:
            lost.append(f"{verse_id}: no row in the content store")
        elif intent.deleted:
            if not row.deleted:
                lost.append(f"{verse_id}: deleted, but the row is live (version {row.version})")
            elif payload is not None and not payload.get("deleted"):
                lost.append(f"{verse_id}: deleted, but {collection} still has a live point")
        elif row.deleted or row.content_hash != content_hash(intent.text or ""):
            lost.append(f"{verse_id}: the row does not hold the last text written")
        elif payload is None or payload.get("deleted"):
            lost.append(f"{verse_id}: updated, but {collection} has no live point")
        elif (
            payload.get("content_hash") != row.content_hash or int(payload.get("version") or 0) != row.version
        ):
            lost.append(
                f"{verse_id}: {collection} has version {payload.get('version')}, the row {row.version}"
            )
    return len(lost), lost


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="embedsvc demo-migration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--books", default=",".join(DEFAULT_BOOKS), help="OSIS book names (default: %(default)s)"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"one short book ({', '.join(QUICK_BOOKS)}) instead of --books"
    )
    parser.add_argument(
        "--verses", type=Path, default=DATA / "bible" / "bsb_verses.jsonl", help="verses JSONL"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / ".local" / "demo-migration",
        help="local state, wiped first (default: %(default)s)",
    )
    parser.add_argument(
        "--gate-queries",
        type=int,
        default=500,
        help="topical queries the gate evaluates, sampled from those with a relevant verse loaded "
        "(0: all of them; default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds each migration may take (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    for needed in (args.verses, TOPICS / "queries.jsonl", TOPICS / "qrels" / "dev.tsv"):
        if not needed.exists():
            print(
                f"error: {needed} not found (expected ../shared/data beside the repository)", file=sys.stderr
            )
            return 2
    books = QUICK_BOOKS if args.quick else tuple(b.strip() for b in args.books.split(",") if b.strip())
    verses = load_verses(args.verses, books)
    if not verses:
        print(f"error: no verses for books {books}", file=sys.stderr)
        return 2
    queries = load_queries(TOPICS / "queries.jsonl")
    started = time.monotonic()
    print(
        f"Model migration demo: {len(verses):,} verses ({', '.join(books)}), {SOURCE_MODEL} -> {TARGET_MODEL}"
    )
    shutil.rmtree(args.workdir, ignore_errors=True)
    truth = gate_ground_truth(args.workdir, {v["id"] for v in verses}, args.gate_queries)
    print(
        f"Gate ground truth: OpenBible topics, {truth.used:,} of the {truth.evaluable:,} judged queries with a "
        f"relevant verse loaded ({truth.qrels})"
    )
    with (
        fast_moto_sqs(),
        LocalStack(
            args.workdir,
            step_functions=True,
            wait_scale=WAIT_SCALE,
            extra_env={"CONTENT_MODELS": json.dumps({CONTENT_TYPE: [SOURCE_MODEL]})},
        ) as stack,
    ):
        stack.sfn.max_wait_seconds = MAX_WAIT_SECONDS
        summary = _run_on(stack, verses, queries, truth, args.timeout)
    print(f"\nDone in {time.monotonic() - started:.0f}s.", flush=True)
    report, ok = summary
    print(json.dumps(report), flush=True)
    return 0 if ok else 1


def _run_on(
    stack: LocalStack, verses: list[dict], queries: list[str], truth: GateTruth, timeout: float
) -> tuple[dict[str, Any], bool]:
    from embedsvc import container

    vectors = container.vector_store()
    print(
        f"\n1. Import through POST /v1/documents/verse:import; the queue worker indexes with {SOURCE_MODEL}"
    )
    t0 = time.perf_counter()
    with progress_bar(len(verses), "indexing") as bar:
        totals = demo_content.import_verses(stack, verses, bar)
    print(
        f"   {totals['committed']:,} verses committed, {vectors.count(f'{CONTENT_TYPE}_{SOURCE_MODEL}'):,} points "
        f"in {CONTENT_TYPE}_{SOURCE_MODEL} (alias {CONTENT_TYPE} -> {vectors.alias_target(CONTENT_TYPE)}), "
        f"{time.perf_counter() - t0:.1f}s"
    )

    print("\n2. Background load: the queue worker, a searcher (POST /v1/search) and a writer (PUT, DELETE)")
    poller = stack.make_poller().start()
    tally = Tally()
    searcher = Searcher(stack, queries, tally)
    searcher.start()
    writer = Writer(stack, verses)
    try:
        print(
            f"\n3. Migration {CONTENT_TYPE}: {SOURCE_MODEL} -> {TARGET_MODEL} "
            f"(statemachines/migration.asl.json on moto; Wait states at x{WAIT_SCALE}, at most {MAX_WAIT_SECONDS:.0f}s)"
        )
        writer.start()
        execution = stack.sfn.start(
            os.environ["MIGRATION_STATE_MACHINE_ARN"],
            migration_payload(TARGET_MODEL, check_interval_seconds(len(verses)), truth),
        )
        result, record = follow(stack, execution, tally, timeout)
        writer.stop()
        tally.phase = "between the migrations"
        print_gate(record)
        models = container.model_config().get(CONTENT_TYPE, fresh=True)
        alias = vectors.alias_target(CONTENT_TYPE)
        old_gone = not vectors.exists(f"{CONTENT_TYPE}_{SOURCE_MODEL}")
        print(
            f"   backfill: {record.get('backfill_tokens', 0):,} tokens, ${record.get('backfill_cost_usd', 0.0):.6f} "
            f"(source reindex, task {record.get('migration_id')})"
        )
        print(
            f"   active model {models.active} (record: {record.get('active_model')}), alias {CONTENT_TYPE} -> {alias}, "
            f"{CONTENT_TYPE}_{SOURCE_MODEL} {'dropped' if old_gone else 'STILL THERE'}; "
            f"took {record.get('duration_seconds', 0):.0f}s"
        )

        print(f"\n4. Writes during the migration: {writer.puts} updates, {writer.deletes} deletes")
        queue = wait_for_queue()
        lost, why = lost_writes(writer.intended)
        print(
            f"   queue drained ({queue['queued']} left, {queue['dead_lettered']} dead-lettered); "
            f"{len(writer.intended)} verses touched, {lost} not as written in {alias}"
        )
        for line in why[:10]:
            print(f"     {line}")

        print(f"\n5. A migration to the weak {WEAK_MODEL}: the evaluation gate must refuse it")
        # moto's interpreter logs the Fail state as an error; here it is the expected ending.
        asl_log = logging.getLogger("moto.stepfunctions.parser.asl.component.eval_component")
        asl_level = asl_log.level
        asl_log.setLevel(logging.CRITICAL)
        try:
            weak = stack.sfn.start(
                os.environ["MIGRATION_STATE_MACHINE_ARN"],
                migration_payload(WEAK_MODEL, check_interval_seconds(len(verses)), truth),
            )
            refused_result, refused_record = follow(stack, weak, tally, timeout, label=f"{WEAK_MODEL} ")
        finally:
            asl_log.setLevel(asl_level)
        tally.phase = "after the refusal"
        print_gate(refused_record)
        weak_alias = vectors.alias_target(CONTENT_TYPE)
        weak_models = container.model_config().get(CONTENT_TYPE, fresh=True)
        weak_dropped = not vectors.exists(f"{CONTENT_TYPE}_{WEAK_MODEL}")
        print(
            f"   execution {refused_result.status} ({refused_result.error}), record {refused_record.get('status')}; "
            f"alias {CONTENT_TYPE} -> {weak_alias}; {CONTENT_TYPE}_{WEAK_MODEL} "
            f"{'dropped' if weak_dropped else 'STILL THERE'}; config active {weak_models.active}, "
            f"shadow {weak_models.shadow}"
        )
    finally:
        searcher.stop()
        writer.stop()
        poller.stop()

    searches = sum(tally.searches.values())
    search_errors = sum(tally.search_errors.values())
    print(f"\n6. Searches throughout: {searches:,}, {search_errors} errors")
    for phase, count in tally.searches.items():
        print(f"     {phase:<26}{count:>7,} searches{tally.search_errors.get(phase, 0):>5} errors")
    for message in tally.error_messages[:10]:
        print(f"     {message}")

    gate = record.get("gate") or {}
    refused_gate = refused_record.get("gate") or {}
    alias_moved = weak_alias != alias
    refused = (
        refused_result.status == "FAILED"
        and refused_result.error == "EvaluationGateFailed"
        and refused_record.get("status") == "refused"
        and refused_gate.get("passed") is False
        and not alias_moved
        and weak_dropped
        and weak_models.shadow is None
    )
    migrated = (
        result.status == "SUCCEEDED"
        and record.get("status") == "completed"
        and alias == f"{CONTENT_TYPE}_{TARGET_MODEL}"
        and models.active == TARGET_MODEL
        and old_gone
    )
    report = {
        "phases": record.get("phases") or [],
        "active_model": models.active,
        "old_metrics": gate.get("old_metrics") or {},
        "new_metrics": gate.get("new_metrics") or {},
        "search_errors": search_errors,
        "searches": searches,
        "writes_during_migration": writer.writes,
        "writes_lost": lost,
        "backfill_tokens": record.get("backfill_tokens"),
        "backfill_cost_usd": record.get("backfill_cost_usd"),
        "refused_migration": {
            "target_model": WEAK_MODEL,
            "gate": "passed" if refused_gate.get("passed") else "failed",
            "alias_moved": alias_moved,
        },
    }
    if not migrated:
        print(
            f"   the migration to {TARGET_MODEL} did not complete: {result.status} {result.error} {result.cause}"
        )
    if not refused:
        print(f"   the migration to {WEAK_MODEL} was not refused as it should be")
    return report, migrated and refused and search_errors == 0 and lost == 0
