"""Runs: TREC run files, run JSON, the run store (local and S3), the runner, the chart and `embedsvc eval`."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from embedsvc.charts.evaluation import render_chart
from embedsvc.cli.eval import add_eval_parser, default_collection, run_eval
from embedsvc.services.evaluation.groundtruth import EvalDataError, GroundTruth, load_beir
from embedsvc.services.evaluation.metrics import DEFAULT_METRICS, GATE_METRICS
from embedsvc.services.evaluation.runner import evaluate
from embedsvc.services.evaluation.runs import (
    LocalRunStore,
    Run,
    RunNotFound,
    S3RunStore,
    content_type_of,
    open_run_store,
    read_trec_run,
    write_trec_run,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
SCIFACT = FIXTURES / "scifact"


def sample_run(model: str = "minilm", *, run_id: str = "", when: datetime | None = None) -> Run:
    return Run(
        model_key=model,
        collection=f"verses_{model}",
        ground_truth="bible-xref-bsb/dev@bsb",
        created_at=when or datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        results={"Gen.1.1": [("John.1.1", 0.91), ("Heb.11.3", 0.5), ("Ps.33.6", 0.5)], "Gen.1.3": []},
        per_query={"Gen.1.1": {m: 0.5 for m in DEFAULT_METRICS}},
        aggregate={m: 0.5 for m in DEFAULT_METRICS},
        params={"exclude_self": True, "k_search": 100},
        irrelevant_hits={"Gen.1.1": [("Heb.11.3", 2)]},
        skipped=["Gen.1.3"],
        run_id=run_id,
    )


# --- TREC run files and JSON ---------------------------------------------------------------------


def test_trec_run_file_round_trip(tmp_path: Path) -> None:
    results = {
        "q1": [("b", 0.5), ("a", 0.5), ("c", 0.9), ("d", 0.1 + 0.2)],  # a tie and a non-short float
        "q2": [("x", -1.25e-7)],
    }
    path = tmp_path / "run.trec"
    write_trec_run(results, path, tag="minilm v1")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 c 1 0.9 minilm-v1"
    assert lines[1:3] == ["q1 Q0 b 2 0.5 minilm-v1", "q1 Q0 a 3 0.5 minilm-v1"]  # ties: id descending
    assert lines[3] == f"q1 Q0 d 4 {0.1 + 0.2!r} minilm-v1"
    back = read_trec_run(path)
    assert back == {"q1": [("c", 0.9), ("b", 0.5), ("a", 0.5), ("d", 0.1 + 0.2)], "q2": [("x", -1.25e-7)]}


def test_trec_run_reader_ignores_the_rank_column_and_checks_lines() -> None:
    text = "q1 Q0 a 7 0.2 t\nq1 Q0 b 1 0.8 t\n"
    assert read_trec_run(io.StringIO(text)) == {"q1": [("b", 0.8), ("a", 0.2)]}
    with pytest.raises(EvalDataError, match=r"<run>:2: .*appears twice"):
        read_trec_run(io.StringIO("q1 Q0 a 1 0.2 t\nq1 Q0 a 2 0.1 t\n"))
    with pytest.raises(EvalDataError, match=r":1: expected 'qid Q0 docid rank score tag'"):
        read_trec_run(io.StringIO("q1 a 0.2\n"))
    with pytest.raises(EvalDataError, match="not a number"):
        read_trec_run(io.StringIO("q1 Q0 a 1 high t\n"))


def test_trec_writer_refuses_ids_with_spaces() -> None:
    with pytest.raises(ValueError, match="cannot be written"):
        write_trec_run({"q1": [("a b", 1.0)]}, io.StringIO(), tag="t")


def test_run_json_round_trip() -> None:
    run = sample_run()
    back = Run.from_json(run.to_json())
    assert back == run
    assert back.to_trec().splitlines()[0] == "Gen.1.1 Q0 John.1.1 1 0.91 minilm"


def test_run_ids_and_content_type() -> None:
    run = sample_run()
    assert re.fullmatch(r"20250301T120000Z-verses_minilm-bible-xref-bsb-dev-bsb-[0-9a-f]{8}", run.run_id)
    assert run.content_type == "verses"
    assert run.baseline_key == ("verses", "bible-xref-bsb/dev@bsb")
    assert content_type_of("bible_verses_te3s", "te3s") == "bible_verses"
    assert content_type_of("custom", "te3s") == "custom"
    with pytest.raises(ValueError, match="run id"):
        sample_run(run_id="../escape")


# --- the run store -------------------------------------------------------------------------------


def exercise_store(store: LocalRunStore | S3RunStore) -> None:
    first = sample_run("minilm", when=datetime(2025, 3, 1, tzinfo=UTC))
    second = sample_run("te3s", when=datetime(2025, 3, 2, tzinfo=UTC))
    key = first.baseline_key
    assert second.baseline_key == key  # two models of one content type share a baseline
    assert store.baseline(key) is None
    assert store.save(first) == first.run_id
    store.save(second)
    assert store.load(first.run_id) == first
    assert store.run_ids() == [first.run_id, second.run_id]
    store.set_baseline(key, first.run_id)
    assert store.baseline(key) == first
    store.set_baseline(key, second.run_id)
    assert store.baseline(key) == second
    assert store.baseline(("verses", "other-ground-truth")) is None
    with pytest.raises(RunNotFound, match="no run"):
        store.load("20990101T000000Z-missing")
    with pytest.raises(RunNotFound):
        store.set_baseline(key, "20990101T000000Z-missing")
    with pytest.raises(RunNotFound, match="not a run id"):
        store.load("../../etc/passwd")


def test_local_run_store(tmp_path: Path) -> None:
    store = LocalRunStore(tmp_path / "runs")
    exercise_store(store)
    trec = next((tmp_path / "runs" / "runs").glob("*.trec"))
    assert read_trec_run(trec)["Gen.1.1"][0] == ("John.1.1", 0.91)
    baseline_files = list((tmp_path / "runs" / "baselines").rglob("*.json"))
    assert [p.relative_to(tmp_path / "runs").as_posix() for p in baseline_files] == [
        "baselines/verses/bible-xref-bsb%2Fdev%40bsb.json"
    ]


@mock_aws
def test_s3_run_store() -> None:
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="eval-runs")
    store = open_run_store("s3://eval-runs/team/eval", s3_client=s3)
    assert isinstance(store, S3RunStore) and str(store) == "s3://eval-runs/team/eval/"
    exercise_store(store)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="eval-runs")["Contents"]]
    assert all(k.startswith("team/eval/") for k in keys)
    assert sum(k.endswith(".trec") for k in keys) == 2


def test_open_run_store_local(tmp_path: Path) -> None:
    assert isinstance(open_run_store(str(tmp_path)), LocalRunStore)
    with pytest.raises(ValueError, match="no bucket"):
        open_run_store("s3:///prefix")


# --- the runner ----------------------------------------------------------------------------------


def word_search(docs: dict[str, str]):
    """A deterministic stand-in for embed+search: cosine of word counts."""

    def vec(text: str) -> Counter[str]:
        return Counter(re.findall(r"[a-z0-9]+", text.lower()))

    doc_vecs = {d: vec(t) for d, t in docs.items()}

    def cos(a: Counter[str], b: Counter[str]) -> float:
        dot = sum(a[w] * b[w] for w in a)
        return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()) or 1)

    calls: list[tuple[int, int]] = []

    def search(texts: list[str], limit: int) -> list[list[tuple[str, float]]]:
        calls.append((len(texts), limit))
        out = []
        for text in texts:
            q = vec(text)
            scored = sorted(((cos(q, v), d) for d, v in doc_vecs.items()), reverse=True)[:limit]
            out.append([(d, s) for s, d in scored])
        return out

    search.calls = calls  # type: ignore[attr-defined]
    return search


def test_evaluate_scores_the_scifact_slice() -> None:
    gt = load_beir(
        SCIFACT / "queries.jsonl", SCIFACT / "qrels" / "train.tsv", corpus=SCIFACT / "corpus.jsonl"
    )
    assert gt.corpus is not None
    search = word_search(gt.corpus)
    progress: list[tuple[int, int]] = []
    run = evaluate(
        gt,
        search=search,
        k_search=10,
        model_key="bow",
        collection="scifact_bow",
        batch_size=2,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert search.calls == [(2, 10), (2, 10), (1, 10)]
    assert progress == [(2, 5), (4, 5), (5, 5)]
    assert run.ground_truth == "scifact/train" and run.queries == 5
    assert set(run.aggregate) == set(DEFAULT_METRICS)
    assert all(0.0 <= v <= 1.0 for v in run.aggregate.values())
    assert run.params == {"exclude_self": False, "k_search": 10, "metrics": list(DEFAULT_METRICS)}
    assert all(len(r) == 10 for r in run.results.values())


def test_evaluate_with_exclude_self_asks_one_more_and_drops_the_query() -> None:
    docs = {"a": "x", "b": "x", "c": "x"}
    gt = GroundTruth(name="self", queries={"a": "x"}, qrels={"a": {"b": 1}}, corpus=docs)
    seen: list[int] = []

    def search(texts: list[str], limit: int) -> list[list[tuple[str, float]]]:
        seen.append(limit)
        return [[("a", 1.0), ("c", 0.9), ("b", 0.8)][:limit]]

    run = evaluate(gt, search=search, k_search=10, exclude_self=True, model_key="m", collection="c_m")
    assert seen == [11]
    assert run.results["a"] == [("c", 0.9), ("b", 0.8)]
    assert run.per_query["a"]["mrr_at_10"] == 0.5


def test_evaluate_checks_its_inputs() -> None:
    gt = GroundTruth(name="g", queries={"a": "x", "b": "y"}, qrels={"a": {"d": 1}})
    with pytest.raises(ValueError, match="shallower"):
        evaluate(gt, search=lambda t, k: [], k_search=5, model_key="m", collection="c")
    with pytest.raises(RuntimeError, match="1 result lists for 2 queries"):
        evaluate(gt, search=lambda t, k: [[]], model_key="m", collection="c")


# --- the chart -----------------------------------------------------------------------------------


def test_render_chart_writes_a_png(tmp_path: Path) -> None:
    a = sample_run("minilm")
    b = sample_run("te3s")
    b.aggregate = {m: 0.7 for m in DEFAULT_METRICS}
    path = render_chart([a, b], tmp_path / "charts" / "eval.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 2_000 < len(data) < 200_000
    with pytest.raises(ValueError):
        render_chart([], tmp_path / "x.png")


# --- embedsvc eval -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="embedsvc")
    add_eval_parser(root.add_subparsers(dest="command"))
    return root


def synthetic_beir(root: Path, n: int = 40) -> Path:
    """n queries, each with one relevant document `d<i>`, plus distractors."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w") as fh:
        for i in range(n * 2):
            fh.write(json.dumps({"_id": f"d{i}", "title": "", "text": f"document {i}"}) + "\n")
    with (root / "queries.jsonl").open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n")
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n))
    )
    return root


class FakeService:
    """Stands in for the service: records indexing, answers searches with the relevant doc at `position`."""

    def __init__(self, position: int = 1):
        self.position = position
        self.indexed: list[tuple[str, str, int]] = []
        self.searched: list[tuple[str, str]] = []

    def index_corpus(self, model_key, collection, docs, progress) -> None:
        self.indexed.append((model_key, collection, len(docs)))
        progress(len(docs), len(docs))

    def search(self, model_key, collection, texts, limit):
        self.searched.append((model_key, collection))
        out = []
        for text in texts:
            i = int(text.split()[-1])
            ids = [f"d{j}" for j in range(100, 100 + limit)]
            ids.insert(self.position - 1, f"d{i}")
            out.append([(d, 1.0 - r / 1000) for r, d in enumerate(ids[:limit])])
        return out


def call(argv: list[str], service: FakeService) -> tuple[int, str, str]:
    args = parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = run_eval(args, index_corpus=service.index_corpus, search=service.search, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_json_output_is_the_last_stdout_line(tmp_path: Path) -> None:
    service = _ScifactService()
    code, out, err = call(
        [
            "eval",
            "--corpus", str(SCIFACT / "corpus.jsonl"),
            "--queries", str(SCIFACT / "queries.jsonl"),
            "--qrels", str(SCIFACT / "qrels" / "train.tsv"),
            "--model", "minilm",
            "--format", "json",
            "--run-file", str(tmp_path / "run.trec"),
        ],
        service,
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    for key in (*GATE_METRICS, "queries"):
        assert key in summary
    assert summary["queries"] == 5
    assert summary["ndcg_at_10"] == 1.0 and summary["recall_at_5"] == 1.0 and summary["precision_at_5"] == 0.2
    assert summary["model"] == "minilm" and summary["collection"] == "eval_scifact_train_minilm"
    assert "indexing 11 documents into eval_scifact_train_minilm" in err
    assert read_trec_run(tmp_path / "run.trec").keys() == {"0", "2", "4", "6", "9"}
    assert service.indexed == [("minilm", "eval_scifact_train_minilm", 11)]


class _ScifactService(FakeService):
    """Puts each SciFact query's judged document first."""

    def __init__(self) -> None:
        super().__init__()
        gt = load_beir(SCIFACT / "queries.jsonl", SCIFACT / "qrels" / "train.tsv")
        self.answer = {gt.queries[q]: next(iter(docs)) for q, docs in gt.qrels.items()}

    def search(self, model_key, collection, texts, limit):
        return [[(self.answer[t], 0.9), ("4983", 0.1)] for t in texts]


def test_cli_table_output_and_baseline_gate(tmp_path: Path) -> None:
    data = synthetic_beir(tmp_path / "synth")
    runs = tmp_path / "runs"
    base = ["eval", "--queries", str(data), "--runs-dir", str(runs)]

    code, out, err = call([*base, "--model", "minilm", "--baseline"], FakeService(position=1))
    assert code == 0
    assert "ndcg_at_10" in out and "1.0000" in out
    assert "no baseline yet for eval_synth_test / synth/test" in err
    assert "is now the baseline" in err

    # a model that puts the relevant document at rank 3: nDCG drops ~50 points on 40 queries
    code, out, err = call(
        [
            *base,
            "--model",
            "te3s",
            "--collection",
            "eval_synth_test_te3s",
            "--chart",
            str(tmp_path / "c.png"),
        ],
        FakeService(position=3),
    )
    assert code == 1
    assert "gate: FAILED" in out and "regressed" in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"

    # the same drop, as JSON
    code, out, _ = call([*base, "--model", "te3s", "--format", "json"], FakeService(position=3))
    summary = json.loads(out.splitlines()[-1])
    assert code == 1 and summary["passed"] is False
    assert summary["comparison"]["metrics"]["ndcg_at_10"]["status"] == "regressed"

    # an equal run passes
    code, out, _ = call([*base, "--model", "minilm"], FakeService(position=1))
    assert code == 0 and "gate: PASSED" in out
    assert len(LocalRunStore(runs).run_ids()) == 4


def test_cli_bad_input_exits_2_with_the_location(tmp_path: Path) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": ""}\n')
    code, out, err = call(
        ["eval", "--queries", str(queries), "--qrels", str(SCIFACT / "qrels" / "train.tsv"), "--model", "m"],
        FakeService(),
    )
    assert code == 2 and out == ""
    assert f"{queries}:1: query 'q1' has empty text" in err
    code, _, err = call(["eval", "--queries", str(SCIFACT), "--model", "m", "--baseline"], FakeService())
    assert code == 2 and "--baseline needs --runs-dir" in err


def test_cli_without_corpus_searches_the_collection_as_it_is() -> None:
    service = FakeService()

    def search(model_key, collection, texts, limit):
        assert (model_key, collection) == ("te3s", "verses_te3s")
        return [[("Eccl.4.9", 0.9), ("Rev.20.2", 0.8)] for _ in texts]

    args = parser().parse_args(
        [
            "eval",
            "--queries",
            str(FIXTURES / "ground_truth.jsonl"),
            "--model",
            "te3s",
            "--collection",
            "verses_te3s",
        ]
    )
    out, err = io.StringIO(), io.StringIO()
    code = run_eval(args, index_corpus=service.index_corpus, search=search, stdout=out, stderr=err)
    assert code == 0 and service.indexed == []
    assert "searching verses_te3s as it is" in err.getvalue()
    assert "queries with known-irrelevant passages in their top 10: 1" in out.getvalue()
    assert "companionship (two are better than one): Rev.20.2 at rank 2" in out.getvalue()


def test_cli_limit_queries_and_exclude_self_hint(tmp_path: Path) -> None:
    bible = FIXTURES / "bible"
    argv = [
        "eval",
        "--corpus", str(bible / "bible" / "kjv_verses.jsonl"),
        "--queries", str(bible / "bible_eval" / "xref" / "queries_kjv.jsonl"),
        "--qrels", str(bible / "bible_eval" / "xref" / "qrels" / "dev.tsv"),
        "--model", "minilm",
        "--limit-queries", "2",
        "--format", "json",
    ]  # fmt: skip
    service = FakeService()

    def search(model_key, collection, texts, limit):
        return [[("Gen.2.17", 1.0), ("Rom.6.23", 0.5)] for _ in texts]

    args = parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    assert run_eval(args, index_corpus=service.index_corpus, search=search, stdout=out, stderr=err) == 0
    assert json.loads(out.getvalue().splitlines()[-1])["queries"] == 2
    assert "--exclude-self" in err.getvalue()


def test_cli_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--corpus", "--queries", "--qrels", "--model", "--collection", "--exclude-self", "--format",
        "--run-file", "--runs-dir", "--baseline", "--chart", "--limit-queries", "--split", "--name",
        "--depth", "--max-drop", "--alpha",
    ):  # fmt: skip
        assert option in text
    assert "examples:" in text and "exit status:" in text and "Default: 100" in text


def test_default_collection_name() -> None:
    assert default_collection("scifact/train", "minilm") == "eval_scifact_train_minilm"
    assert default_collection("bible-xref-bsb/dev@bsb", "te3s") == "eval_bible_xref_bsb_dev_bsb_te3s"
