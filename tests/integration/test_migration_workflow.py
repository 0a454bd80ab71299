"""The model migration workflow end to end: the real ASL file on moto's executor, our handlers, real models.

Every test starts a local stack (moto, Postgres, Qdrant local mode, the API), indexes ~400 verses (the
relevant verses of 40 OpenBible topics) with a source model through the API and the queue worker, and
runs statemachines/migration.asl.json. Models: minilm-m2v (static, clearly weaker, fast) and
minilm-int8 (ONNX): m2v -> int8 passes the gate, int8 -> m2v is refused.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TOPICS = DATA / "bible_eval" / "topics"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not TOPICS.is_dir(), reason="needs ../shared/data"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Any]:
    """~400 verses judged relevant to 40 topics, and a qrels file of those topics only."""
    from embedsvc.services.evaluation.groundtruth import load_beir

    topics = load_beir(TOPICS / "queries.jsonl", TOPICS / "qrels" / "dev.tsv", name="topics")
    chosen = sorted(topics.qrels, key=lambda q: (-len(topics.relevant(q)), q))[:40]
    wanted = {doc for q in chosen for doc in topics.relevant(q)}
    verses = []
    with (DATA / "bible" / "bsb_verses.jsonl").open() as fh:
        for line in fh:
            verse = json.loads(line)
            if verse["id"] in wanted:
                verses.append(verse)
    verses = verses[:400]
    qrels = tmp_path_factory.mktemp("gt") / "qrels.tsv"
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [f"{q}\t{d}\t{g}" for q in chosen for d, g in topics.qrels[q].items()]
    qrels.write_text("\n".join(lines) + "\n")
    return {"verses": verses, "queries": str(TOPICS / "queries.jsonl"), "qrels": str(qrels)}


class _Bar:
    def __init__(self, total: int):
        self.total, self.n = total, 0

    def update(self, k: int) -> None:
        self.n += k


@contextmanager
def migration_stack(tmp_path: Path, corpus: dict, source: str, *, wait_scale: float = 0.0) -> Iterator[Any]:
    """A local stack with the corpus indexed by `source`, the worker polling in the background."""
    from embedsvc.local.demo_content import import_verses
    from embedsvc.local.stack import LocalStack

    with LocalStack(
        workdir=tmp_path,
        step_functions=True,
        wait_scale=wait_scale,
        qdrant_in_memory=True,
        extra_env={"CONTENT_MODELS": json.dumps({"verse": [source]})},
    ) as stack:
        import_verses(stack, corpus["verses"], _Bar(len(corpus["verses"])))
        poller = stack.make_poller().start()
        try:
            yield stack
        finally:
            poller.stop()


def _payload(corpus: dict, target: str, **extra: Any) -> dict[str, Any]:
    return {
        "content_type": "verse",
        "target_model": target,
        "ground_truth": corpus["queries"],
        "qrels": corpus["qrels"],
        "check_interval_seconds": 2,
        **extra,
    }


def _record() -> dict[str, Any]:
    from embedsvc import container

    return container.migration_records().latest("verse") or {}


def _wait_for(predicate, timeout: float = 300, what: str = "a condition", stack=None, execution=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if execution is not None:
            status = stack.sfn._client("stepfunctions").describe_execution(executionArn=execution)
            if status["status"] != "RUNNING":
                raise AssertionError(
                    f"execution ended before {what}: {status.get('error')} {status.get('cause')}"
                )
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _drain_queue() -> None:
    """Until IndexQueue holds nothing, visible or in flight (the worker polls meanwhile)."""
    from embedsvc.local.demo_migration import wait_for_queue

    assert wait_for_queue(timeout=120)["queued"] == 0, "IndexQueue did not drain"


class Searcher(threading.Thread):
    """Searches through the API throughout; every non-200 is an error, noted with the phase it hit."""

    def __init__(self, stack: Any):
        super().__init__(daemon=True)
        self.stack, self.stop, self.searches, self.errors = stack, threading.Event(), 0, []

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        with httpx.Client(base_url=self.stack.api_url, headers=headers, timeout=60) as api:
            while not self.stop.is_set():
                phase = _record().get("phase")
                try:
                    answer = api.post("/search", json={"query": "the mercy of God", "content_type": "verse"})
                    if answer.status_code != 200 or not answer.json()["data"]:
                        self.errors.append((phase, answer.status_code, answer.text[:200]))
                except Exception as exc:  # a dropped connection is an error too
                    self.errors.append((phase, type(exc).__name__, str(exc)[:200]))
                self.searches += 1


class Writer(threading.Thread):
    """Updates and deletes verses through the API until stopped; remembers what each should be."""

    def __init__(self, stack: Any, verses: list[dict]):
        super().__init__(daemon=True)
        self.stack, self.verses, self.stop = stack, verses, threading.Event()
        self.intended: dict[str, str | None] = {}  # id -> text, None when deleted
        self.writes, self.errors = 0, []

    def run(self) -> None:
        rng = random.Random(7)
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        with httpx.Client(base_url=self.stack.api_url, headers=headers, timeout=60) as api:
            while not self.stop.is_set():
                verse = rng.choice(self.verses[50:])  # the first 50 stay, so searches always find something
                if rng.random() < 0.3:
                    answer = api.delete(f"/documents/verse/{verse['id']}")
                    intended = None
                else:
                    text = f"{verse['text']} (revision {self.writes})"
                    answer = api.put(f"/documents/verse/{verse['id']}", json={"text": text, "metadata": {}})
                    intended = text
                if answer.status_code >= 400 and not (answer.status_code == 404 and intended is None):
                    self.errors.append(
                        (verse["id"], answer.request.method, answer.status_code, answer.text[:200])
                    )
                    continue
                self.intended[verse["id"]] = intended
                self.writes += 1
                time.sleep(0.02)


def lost_writes(collection: str, intended: dict[str, str | None]) -> list[str]:
    """Ids whose point in `collection` does not show the row as the writer left it."""
    from embedsvc import container
    from embedsvc.adapters.content_store import content_hash, content_point_id

    store, vectors = container.content_store(), container.vector_store()
    pids = {content_point_id("verse", vid, None): vid for vid in intended}
    rows = store.rows_by_point("verse", list(pids))
    payloads = vectors.payloads(collection, list(pids))
    lost = []
    for pid, vid in pids.items():
        text, row, payload = intended[vid], rows.get(pid), payloads.get(pid)
        if text is None:
            if row is None or not row.deleted or (payload and not payload.get("deleted")):
                lost.append(vid)
        elif (
            row is None
            or row.text != text
            or payload is None
            or payload.get("deleted")
            or payload.get("content_hash") != content_hash(text)
        ):
            lost.append(vid)
    return lost


def test_migration_end_to_end_with_traffic(tmp_path, corpus):
    """m2v -> int8 under searches, updates and deletes: no search fails, no write is lost in either
    collection, the alias ends on the new collection and the old one is gone after the window."""
    from embedsvc import container

    with migration_stack(tmp_path, corpus, "minilm-m2v", wait_scale=0.005) as stack:
        searcher, writer = Searcher(stack), Writer(stack, corpus["verses"])
        searcher.start()
        writer.start()
        execution = stack.sfn.start(
            os.environ["MIGRATION_STATE_MACHINE_ARN"],
            _payload(corpus, "minilm-int8", rollback_window_seconds=100_000, window_poll_seconds=1000),
        )
        # In the window (100,000 workflow seconds, 5 s per poll here) both collections are written.
        _wait_for(
            lambda: _record().get("phase") == "rollback_window",
            what="the window",
            stack=stack,
            execution=execution,
        )
        writer.stop.set()
        writer.join()
        _drain_queue()
        assert container.vector_store().alias_target("verse") == "verse_minilm-int8"
        assert writer.writes > 10 and not writer.errors
        assert lost_writes("verse_minilm-int8", writer.intended) == []
        assert lost_writes("verse_minilm-m2v", writer.intended) == []
        stack.sfn.wait_scale = 0.0  # the rest of the window passes at once
        result = stack.sfn.wait(execution, timeout=300)
        searcher.stop.set()
        searcher.join()
        record = _record()
        assert not container.vector_store().exists("verse_minilm-m2v")
        assert container.model_config().get("verse", fresh=True).shadow is None
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert searcher.errors == [] and searcher.searches > 20
    assert record["status"] == "completed"
    assert record["phases"] == [
        "begin",
        "shadow",
        "backfill",
        "wait",
        "validate",
        "rollback_window",
        "completed",
    ]
    assert (
        record["gate"]["passed"]
        and record["gate"]["new_metrics"]["ndcg_at_10"] > record["gate"]["old_metrics"]["ndcg_at_10"]
    )
    assert record["dropped_collection"] == "verse_minilm-m2v" and record["active_model"] == "minilm-int8"
    assert record["backfill_tokens"] > 0
    assert record["window_waited_seconds"] >= 100_000


def test_worse_candidate_is_refused_and_a_second_migration_waits(tmp_path, corpus):
    """int8 -> m2v: a transient Qdrant failure is retried; a concurrent migration of the same content
    type is refused; the gate refuses the weaker model, the alias never moves, its collection goes."""
    from embedsvc import container
    from embedsvc.errors import VectorStoreUnavailable

    with migration_stack(tmp_path, corpus, "minilm-int8") as stack:
        vectors = container.vector_store()
        real_ensure, calls = vectors.ensure_collection, []

        def flaky_ensure(name: str, dimensions: int) -> None:
            calls.append(name)
            if name == "verse_minilm-m2v" and calls.count(name) == 1:
                raise VectorStoreUnavailable("qdrant create_collection failed: injected once")
            real_ensure(name, dimensions)

        vectors.ensure_collection = flaky_ensure  # type: ignore[method-assign]
        arn = os.environ["MIGRATION_STATE_MACHINE_ARN"]
        first = stack.sfn.start(arn, _payload(corpus, "minilm-m2v"))
        _wait_for(lambda: _record().get("status") == "running", what="the first migration to begin")
        second = stack.sfn.wait(stack.sfn.start(arn, _payload(corpus, "minilm-m2v")), timeout=120)
        result = stack.sfn.wait(first, timeout=600)
        record = _record()
        alias = vectors.alias_target("verse")
        m2v_exists = vectors.exists("verse_minilm-m2v")
        models = container.model_config().get("verse", fresh=True)
        lock = container.migration_records().lock_holder("verse")
        failures = [e for e in stack.sfn.history(first) if e["type"] == "LambdaFunctionFailed"]
    assert second.status == "FAILED" and second.error == "MigrationInProgress", second
    assert calls.count("verse_minilm-m2v") >= 2 and len(failures) == 1  # retried once, then went on
    assert result.status == "FAILED" and result.error == "EvaluationGateFailed", (result.error, result.cause)
    assert "Validate" in result.states_entered and "Cutover" not in result.states_entered
    assert (
        record["status"] == "refused" and record["gate"]["passed"] is False and record["gate"]["regressions"]
    )
    assert alias == "verse_minilm-int8" and not m2v_exists
    assert models.active == "minilm-int8" and models.shadow is None
    assert lock is None


def test_killed_backfill_resumes_and_rollback_inside_the_window(tmp_path, corpus, monkeypatch):
    """An execution stopped mid-backfill is resumed by the next one from its cursor (no page queued twice
    beyond the one in flight, a fresher write kept); then a rollback in the window switches back."""
    from embedsvc import container
    from embedsvc.adapters.content_store import content_point_id
    from embedsvc.cli import main as cli_main
    from embedsvc.services.migration.backfill import Backfill

    sent: list[dict] = []
    executions: list[str] = []
    real_send, real_run = Backfill._send, Backfill.run

    def one_page_per_call(self, *args, seconds, **kwargs):
        return real_run(self, *args, seconds=0, **kwargs)  # out of time after every page

    def send_and_maybe_die(self, migration_id, batch, *args, **kwargs):
        sent.extend(m.model_dump() for m in batch)
        answer = real_send(self, migration_id, batch, *args, **kwargs)
        if len(sent) >= 150 and len(executions) == 1:  # kill the first execution after its third page
            stack.sfn._client("stepfunctions").stop_execution(executionArn=executions[0])
            executions.append("stopped")
        return answer

    with migration_stack(tmp_path, corpus, "minilm-m2v", wait_scale=0.005) as stack:
        monkeypatch.setattr(container.migration_steps().backfill_job, "page", 50)
        monkeypatch.setattr(Backfill, "_send", send_and_maybe_die)
        monkeypatch.setattr(Backfill, "run", one_page_per_call)
        arn = os.environ["MIGRATION_STATE_MACHINE_ARN"]
        payload = _payload(corpus, "minilm-int8", rollback_window_seconds=100_000, window_poll_seconds=500)
        executions.append(stack.sfn.start(arn, payload))
        killed = stack.sfn.wait(executions[0], timeout=300)
        before = dict(_record())
        # A user's edit between the two executions: the resumed backfill must not undo it.
        edited = corpus["verses"][-1]
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=120) as api:
            assert (
                api.put(
                    f"/documents/verse/{edited['id']}", json={"text": "edited", "metadata": {}}
                ).status_code
                == 200
            )
        resumed = stack.sfn.start(arn, payload)
        _wait_for(
            lambda: _record().get("phase") == "rollback_window",
            what="the window",
            stack=stack,
            execution=resumed,
        )
        after = dict(_record())
        _drain_queue()
        point = container.vector_store().payloads(
            "verse_minilm-int8", [content_point_id("verse", edited["id"], None)]
        )
        row = container.content_store().get("verse", edited["id"], owner_id=None)
        assert cli_main(["migrate", "rollback", "verse", "--requested-by", "test"]) == 0
        alias_now = container.vector_store().alias_target("verse")
        stack.sfn.wait_scale = 0.0
        result = stack.sfn.wait(resumed, timeout=300)
        final = _record()
        int8_exists = container.vector_store().exists("verse_minilm-int8")
        models = container.model_config().get("verse", fresh=True)
    assert killed.status == "ABORTED"
    assert before["backfill"]["queued"] >= 150 and not before["backfill"]["done"]
    assert after["migration_id"] == before["migration_id"] and after.get("resumed_at")
    live = len([v for v in corpus["verses"]])
    assert live <= len(sent) <= live + 50  # resumed from the cursor: at most the page in flight again
    assert {m["priority"] for m in sent} == {"bulk"} and {m["source"] for m in sent} == {"reindex"}
    assert {m["task_id"] for m in sent} == {before["migration_id"]} and {
        tuple(m["models"]) for m in sent
    } == {("minilm-int8",)}
    assert row is not None and next(iter(point.values()))["version"] == row.version
    assert alias_now == "verse_minilm-m2v"  # switched back at once, before the workflow finished
    assert result.status == "SUCCEEDED" and result.states_entered[-1] == "RolledBack", result
    assert final["status"] == "rolled_back" and final["rolled_back_by"] == "test"
    assert not int8_exists and models.active == "minilm-m2v" and models.shadow is None
