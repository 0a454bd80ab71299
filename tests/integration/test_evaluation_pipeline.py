"""`embedsvc eval` through the real pipeline (worker path -> Qdrant, router -> search) against exact search.

A slice of BEIR SciFact (the first 30 judged train queries, their documents and distractors: 300
documents) is indexed and evaluated through the service; the same vectors, searched exhaustively in
numpy, must give the same rankings and the same per-query metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from embedsvc.cli import main
from embedsvc.local.provider_sim import Fault, hash_vector
from embedsvc.services.evaluation.groundtruth import GroundTruth, load_beir
from embedsvc.services.evaluation.metrics import evaluate_results, rank
from embedsvc.services.evaluation.runs import LocalRunStore, Run, read_trec_run
from embedsvc.services.indexing import BatchOutcome

ROOT = Path(__file__).resolve().parents[2]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
FIXTURES = ROOT / "tests" / "fixtures" / "eval"
SLICE_QUERIES = 30
SLICE_DOCS = 300


@pytest.fixture(scope="module")
def scifact_slice(tmp_path_factory) -> Path:
    """A BEIR-layout slice of SciFact train: 30 judged queries, their documents, distractors up to 300."""
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    root = tmp_path_factory.mktemp("scifact_slice")
    lines = (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()
    qrels: dict[str, list[str]] = {}
    for line in lines[1:]:
        qid, doc, _ = line.split("\t")
        if qid in qrels or len(qrels) < SLICE_QUERIES:
            qrels.setdefault(qid, []).append(doc)
    wanted = {d for docs in qrels.values() for d in docs}
    corpus: list[str] = []
    distractors = 0
    with (SCIFACT / "corpus.jsonl").open() as fh:
        for raw in fh:
            if json.loads(raw)["_id"] in wanted:
                corpus.append(raw)
            elif distractors < SLICE_DOCS - len(wanted):
                corpus.append(raw)
                distractors += 1
    assert len(corpus) == SLICE_DOCS
    (root / "corpus.jsonl").write_text("".join(corpus))
    with (SCIFACT / "queries.jsonl").open() as fh:
        queries = [raw for raw in fh if json.loads(raw)["_id"] in qrels]
    (root / "queries.jsonl").write_text("".join(queries))
    (root / "qrels").mkdir()
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, docs in qrels.items() for d in docs)
    )
    return root


def eval_argv(data: Path, work: Path, model: str, collection: str, *extra: str) -> list[str]:
    return [
        "eval",
        "--corpus", str(data / "corpus.jsonl"),
        "--queries", str(data / "queries.jsonl"),
        "--qrels", str(data / "qrels" / "train.tsv"),
        "--model", model,
        "--collection", collection,
        "--format", "json",
        "--workdir", str(work),
        "--aws",
        *extra,
    ]  # fmt: skip


def run_main(argv: list[str], capsys) -> tuple[int, dict | None, str]:
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def exact_search(
    gt: GroundTruth, doc_ids: list[str], doc_vectors: np.ndarray, query_vectors: dict[str, np.ndarray], k: int
) -> dict[str, list[tuple[str, float]]]:
    """Cosine over every document, in numpy; the top k of each query in trec_eval order."""
    docs = doc_vectors / np.linalg.norm(doc_vectors, axis=1, keepdims=True)
    results = {}
    for qid in gt.queries:
        q = query_vectors[qid] / np.linalg.norm(query_vectors[qid])
        scores = docs @ q
        order = rank(zip(doc_ids, scores.tolist(), strict=True))[:k]
        by_id = dict(zip(doc_ids, scores.tolist(), strict=True))
        results[qid] = [(d, by_id[d]) for d in order]
    return results


def stored_vectors(collection: str) -> tuple[list[str], np.ndarray]:
    from embedsvc import container

    points = list(container.vector_store().iter_points(collection, with_vectors=True))
    return [p.payload["id"] for p in points], np.asarray([p.vector for p in points], dtype=np.float32)


def assert_same_as_exact(run: Run, gt: GroundTruth, exact: dict[str, list[tuple[str, float]]]) -> None:
    scored = evaluate_results(exact, gt.qrels, metrics=list(run.aggregate), queries=list(gt.queries))
    for qid in gt.queries:
        assert [d for d, _ in run.results[qid]] == [d for d, _ in exact[qid]], qid
        assert np.allclose([s for _, s in run.results[qid]], [s for _, s in exact[qid]], atol=1e-5), qid
    assert run.per_query == scored.per_query
    assert run.aggregate == scored.aggregate


def test_scifact_slice_through_the_service_equals_exact_search(service, sim, scifact_slice, tmp_path, capsys):
    work = tmp_path / "work"
    argv = eval_argv(scifact_slice, work, "te3s", "scifact_te3s", "--run-file", str(tmp_path / "run.trec"))
    code, summary, err = run_main(argv, capsys)
    assert code == 0, err
    assert summary is not None and summary["queries"] == SLICE_QUERIES
    assert "indexed 300 documents into scifact_te3s" in err
    run = LocalRunStore(work / "runs").load(summary["run_id"])  # runs default to <workdir>/runs
    assert read_trec_run(tmp_path / "run.trec") == run.results

    gt = load_beir(
        scifact_slice / "queries.jsonl",
        scifact_slice / "qrels" / "train.tsv",
        corpus=scifact_slice / "corpus.jsonl",
    )
    assert gt.corpus is not None
    ids, vectors = stored_vectors("scifact_te3s")
    assert sorted(ids) == sorted(gt.corpus)
    # The vectors Qdrant holds are the provider's vectors of title + " " + text, nothing else.
    expected = np.stack([hash_vector(gt.corpus[d], 1536) for d in ids])
    assert np.allclose(vectors, expected, atol=1e-6)
    queries = {q: hash_vector(text, 1536) for q, text in gt.queries.items()}
    assert_same_as_exact(run, gt, exact_search(gt, ids, vectors, queries, k=100))

    # A second run finds the corpus indexed: no document is embedded again, and the numbers stand.
    calls = sim.calls
    code, again, err = run_main(argv, capsys)
    assert code == 0 and again is not None
    assert "scifact_te3s already holds all 300 documents: nothing to index" in err
    assert sim.calls == calls  # queries come from the embedding cache, documents are not re-sent
    assert {k: again[k] for k in run.aggregate} == run.aggregate


def test_a_partly_indexed_collection_gets_only_what_it_lacks(service, sim, scifact_slice, tmp_path, capsys):
    from embedsvc import container
    from embedsvc.adapters.qdrant import point_id

    work = tmp_path / "work"
    argv = eval_argv(scifact_slice, work, "te3s", "scifact_te3s")
    assert run_main(argv, capsys)[0] == 0
    ids, _ = stored_vectors("scifact_te3s")
    container.vector_store().delete("scifact_te3s", [point_id("scifact", d) for d in ids[:7]])
    code, _, err = run_main(argv, capsys)
    assert code == 0
    assert "scifact_te3s holds 293 of them; indexing the other 7" in err
    assert "indexed 7 documents into scifact_te3s" in err
    assert container.vector_store().count("scifact_te3s") == SLICE_DOCS


@pytest.mark.parametrize(
    ("collection", "problem"),
    [
        ("SciFact", "cannot index into collection 'SciFact'"),
        ("scifact_minilm", "cannot index into collection 'scifact_minilm'"),
        ("te3s", "cannot index into collection 'te3s'"),
    ],
)
def test_a_collection_the_worker_cannot_write_is_refused(service, tmp_path, capsys, collection, problem):
    argv = eval_argv(FIXTURES / "scifact", tmp_path, "te3s", collection)
    code, summary, err = run_main(argv, capsys)
    assert code == 2 and summary is None
    assert problem in err and "<content_type>_te3s" in err


def test_searching_a_missing_collection_without_a_corpus_is_a_clear_error(service, tmp_path, capsys):
    argv = [
        "eval", "--queries", str(FIXTURES / "ground_truth.jsonl"), "--model", "te3s",
        "--collection", "verse_te3s", "--aws", "--workdir", str(tmp_path),
    ]  # fmt: skip
    code, summary, err = run_main(argv, capsys)
    assert code == 2 and summary is None
    assert "collection_not_found" in err and "'verse_te3s' does not exist" in err


class ScriptedIndexer:
    """Stands in for the worker: asks to retry (or dead-letters) scripted message positions."""

    def __init__(self, retry_rounds: int = 0, dead: bool = False):
        self.retry_rounds = retry_rounds
        self.dead = dead
        self.calls: list[list[str]] = []

    def process(self, batch):
        self.calls.append([m.message_id for m in batch])
        outcome = BatchOutcome()
        if self.dead:
            outcome.dead_lettered[batch[0].message_id] = "text is empty"
        if len(self.calls) <= self.retry_rounds:
            outcome.retry = [batch[0].message_id]
        outcome.indexed = len(batch) - len(outcome.retry) - len(outcome.dead_lettered)
        return outcome


def test_index_corpus_retries_with_backoff_then_gives_up_clearly(service):
    from embedsvc.services.evaluation.corpus import index_corpus
    from embedsvc.services.evaluation.errors import IndexingIncomplete

    docs = {f"d{i}": f"document {i}" for i in range(250)}
    sleeps: list[float] = []
    indexer = ScriptedIndexer(retry_rounds=2)
    report = index_corpus(
        "te3s", "synth_te3s", docs, None, indexer=indexer, sleep=sleeps.append, info=lambda m: None
    )
    assert [len(c) for c in indexer.calls] == [
        100,
        1,
        1,
        100,
        50,
    ]  # batches of 100, the retried message alone
    assert indexer.calls[1] == indexer.calls[2] == ["eval-0-0"]  # only the retried message goes again
    assert sleeps == [1.0, 2.0]
    assert report.indexed == 250 and report.retried == 2

    with pytest.raises(
        IndexingIncomplete, match=r"1 documents of synth_te3s still failed after 5 attempts \(e.g. d0"
    ):
        index_corpus(
            "te3s",
            "synth_te3s",
            docs,
            None,
            indexer=ScriptedIndexer(retry_rounds=99),
            sleep=sleeps.append,
            info=lambda m: None,
        )


def test_a_document_the_worker_refuses_fails_the_evaluation(service):
    from embedsvc.services.evaluation.corpus import index_corpus
    from embedsvc.services.evaluation.errors import IndexingFailed

    with pytest.raises(IndexingFailed, match="refused document 'd0' for synth_te3s: text is empty"):
        index_corpus(
            "te3s",
            "synth_te3s",
            {"d0": "x", "d1": "y"},
            None,
            indexer=ScriptedIndexer(dead=True),
            info=lambda m: None,
        )
    # and through the real worker: an id longer than the message schema allows is dead-lettered
    with pytest.raises(IndexingFailed, match="'" + "x" * 600 + "'"):
        index_corpus("te3s", "synth_te3s", {"x" * 600: "some text"}, None, info=lambda m: None)


def test_provider_outage_during_indexing_is_retried_through_the_worker(service, sim, sim2):
    from embedsvc import container
    from embedsvc.services.evaluation.corpus import index_corpus

    sim.inject(*[Fault(status=500)] * 3)
    sim2.inject(*[Fault(status=500)] * 3)
    sleeps: list[float] = []
    report = index_corpus(
        "te3s",
        "synth_te3s",
        {f"d{i}": f"text {i}" for i in range(20)},
        None,
        sleep=sleeps.append,
        info=lambda m: None,
    )
    assert report.indexed == 20 and sleeps  # the first attempt failed on both providers and was retried
    assert container.vector_store().count("synth_te3s") == 20


def test_run_cli_on_the_embedded_local_stack_persists_the_index(sim, tmp_path, monkeypatch, capsys):
    """The default (no --aws): moto server + Qdrant on disk under --workdir; a second run skips indexing."""
    from conftest import sim_registry

    for key in ("QDRANT_PATH", "QDRANT_URL", "AWS_ENDPOINT_URL", "EMBEDSVC_REGISTRY_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SIM_API_KEY", "sk-sim")
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(sim_registry(sim)))
    work = tmp_path / "eval"
    argv = eval_argv(FIXTURES / "scifact", work, "te3s", "scifact_te3s")
    argv.remove("--aws")
    code, first, err = run_main(argv, capsys)
    assert code == 0, err
    assert f"starting the embedded local stack in {work}" in err
    assert "indexed 11 documents into scifact_te3s" in err
    assert (work / "qdrant").is_dir() and (work / "emf.jsonl").is_file()
    code, second, err = run_main(argv, capsys)
    assert code == 0 and first is not None and second is not None
    assert "already holds all 11 documents" in err
    assert first["ndcg_at_10"] == second["ndcg_at_10"]
    assert len(LocalRunStore(work / "runs").run_ids()) == 2
    assert "AWS_ENDPOINT_URL" not in os.environ  # the stack put the environment back


@pytest.mark.slow
def test_scifact_slice_with_the_local_model_equals_exact_search(aws, scifact_slice, tmp_path, capsys):
    """The same check with all-MiniLM-L6-v2: truncation, normalisation and cosine as published."""
    from embedsvc import container
    from embedsvc.observability import CallContext

    work = tmp_path / "work"
    code, summary, err = run_main(eval_argv(scifact_slice, work, "minilm", "scifact_minilm"), capsys)
    assert code == 0, err
    assert summary is not None and summary["ndcg_at_10"] > 0.6  # a real model finds the abstracts
    run = LocalRunStore(work / "runs").load(summary["run_id"])
    gt = load_beir(scifact_slice / "queries.jsonl", scifact_slice / "qrels" / "train.tsv")
    ids, vectors = stored_vectors("scifact_minilm")
    assert len(ids) == SLICE_DOCS
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    qids = list(gt.queries)
    # The query vectors the search used (the service's cache answers now; no second model call).
    embedded = container.embedding_service().embed(
        [gt.queries[q] for q in qids], "minilm", context=CallContext(source="test")
    )
    assert embedded.cache_hits == len(qids)
    queries = dict(zip(qids, embedded.vectors, strict=True))
    assert_same_as_exact(run, gt, exact_search(gt, ids, vectors, queries, k=100))


def test_demo_step_evaluates_topics_on_the_indexed_verses_only(service, tmp_path):
    import io

    from embedsvc.local.demo_eval import evaluate_bible_topics
    from embedsvc.services.evaluation.corpus import index_corpus

    bible = FIXTURES / "bible"
    verses = [json.loads(line) for line in (bible / "bible" / "bsb_verses.jsonl").read_text().splitlines()]
    # The demo indexes some books: here, everything but Acts.
    docs = {v["id"]: v["text"] for v in verses if v["text"].strip() and v["osis_book"] != "Acts"}
    index_corpus("te3s", "verse_te3s", docs, None, info=lambda m: None)
    out = io.StringIO()
    run = evaluate_bible_topics(bible / "bible_eval" / "topics", set(docs), workdir=tmp_path, out=out)
    text = out.getvalue()
    assert run is not None and run.collection == "verse_te3s" and run.model_key == "te3s"
    # every topic keeps a verse outside Acts; "additions" and "being baptized" lose their Acts verses
    assert "4 of 4 topics have relevant verses among the 35 indexed (16 of 24 judgements kept)" in text
    assert set(run.per_query) == {"T00006", "T00031", "T00075", "T00452"}
    assert all(doc in docs for ranked in run.results.values() for doc, _ in ranked)
    assert "ndcg@10" in text and f"chart: {tmp_path / 'eval_topics.png'}" in text
    assert (tmp_path / "eval_topics.png").read_bytes()[:4] == b"\x89PNG"
    assert LocalRunStore(tmp_path / "eval-runs").run_ids() == [run.run_id]

    # with only Genesis indexed, one topic is left
    genesis = {d for d in docs if d.startswith("Gen.")}
    out = io.StringIO()
    run = evaluate_bible_topics(bible / "bible_eval" / "topics", genesis, workdir=tmp_path, out=out)
    assert run is not None and list(run.per_query) == ["T00006"]
    assert "1 of 4 topics have relevant verses among the 7 indexed" in out.getvalue()
