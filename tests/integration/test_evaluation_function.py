"""EvaluationFunction through its real handler: moto S3 + CloudWatch, Qdrant in memory, simulator models.

The ground truth asks for each of 30 verses by its own text, so the simulator's deterministic vectors
retrieve every one at rank 1 (all metrics 1.0): a baseline that a garbled collection visibly breaks.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import load_event

from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.services.evaluation.runs import Run, read_trec_run

ROOT = Path(__file__).resolve().parents[2]
VERSES = ROOT / "tests" / "fixtures" / "eval" / "bible" / "bible" / "bsb_verses.jsonl"
EVENTS = ROOT / "events" / "evaluation"
BUCKET = "embedsvc-test-eval-runs"
GT_KEY = "ground-truth/verse.jsonl"
QUERIES = 30


def verses() -> dict[str, str]:
    out = {}
    for line in VERSES.read_text().splitlines():
        verse = json.loads(line)
        if verse["text"].strip():
            out[verse["id"]] = verse["text"].strip()
    return out


@pytest.fixture
def s3(service, monkeypatch):
    from embedsvc.adapters.aws import client

    s3 = client("s3")
    s3.create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("EVAL_BUCKET", BUCKET)
    return s3


@pytest.fixture
def indexed(service, s3) -> dict[str, str]:
    """The verses indexed through the worker path into verse_te3s, and the ground truth in S3."""
    from embedsvc.services.evaluation.corpus import index_corpus

    docs = verses()
    index_corpus("te3s", "verse_te3s", docs, None, info=lambda m: None)
    lines = [
        json.dumps({"id": f"q{i}", "query": text, "relevant_passages": [doc_id]})
        for i, (doc_id, text) in enumerate(list(docs.items())[:QUERIES])
    ]
    s3.put_object(Bucket=BUCKET, Key=GT_KEY, Body="\n".join(lines).encode())
    return docs


def invoke(event):
    from functions.evaluation.app import lambda_handler

    return lambda_handler(event, LocalLambdaContext("evaluation"))


def weekly() -> dict:
    event = load_event("evaluation/weekly.json")
    event["ground_truth"] = f"s3://{BUCKET}/{GT_KEY}"
    return event


def metric_values(name: str, dimensions: dict[str, str]) -> list[float]:
    from embedsvc.adapters.aws import client

    now = datetime.now(UTC)
    answer = client("cloudwatch").get_metric_data(
        MetricDataQueries=[
            {
                "Id": "m",
                "MetricStat": {
                    "Metric": {
                        "Namespace": "EmbeddingService",
                        "MetricName": name,
                        "Dimensions": [{"Name": k, "Value": v} for k, v in dimensions.items()],
                    },
                    "Period": 60,
                    "Stat": "Maximum",
                },
            }
        ],
        StartTime=now - timedelta(minutes=10),
        EndTime=now + timedelta(minutes=10),
    )
    return list(answer["MetricDataResults"][0]["Values"])


def test_weekly_run_is_stored_published_and_becomes_the_first_baseline(indexed, s3):
    from embedsvc.adapters.aws import client

    answer = invoke(weekly())
    assert answer["passed"] is True
    assert answer["content_type"] == "verse" and answer["model"] == "te3s"
    assert (
        answer["collection"] == answer["resolved_collection"] == "verse_te3s"
    )  # no alias: the active model's
    assert answer["queries"] == QUERIES and answer["ground_truth"] == "verse"
    assert answer["metrics"]["ndcg_at_10"] == 1.0 and answer["metrics"]["precision_at_5"] == 0.2
    assert answer["baseline_run_id"] is None and answer["baseline_set"] is True
    assert answer["comparison"] is None and answer["regressions"] == []

    run_id = answer["run_id"]
    assert answer["run"] == f"s3://{BUCKET}/runs/{run_id}.json"
    run = Run.from_json(s3.get_object(Bucket=BUCKET, Key=f"runs/{run_id}.json")["Body"].read())
    assert run.per_query["q0"]["ndcg_at_10"] == 1.0 and run.params["resolved_collection"] == "verse_te3s"
    trec = s3.get_object(Bucket=BUCKET, Key=f"runs/{run_id}.trec")["Body"].read().decode()
    first = trec.splitlines()[0].split()
    assert first[:4] == ["q0", "Q0", next(iter(indexed)), "1"] and first[5] == "te3s"
    assert read_trec_run_text(trec) == run.results
    baseline = json.loads(s3.get_object(Bucket=BUCKET, Key="baselines/verse/verse.json")["Body"].read())
    assert baseline["run_id"] == run_id

    listed = client("cloudwatch").list_metrics(Namespace="EmbeddingService")["Metrics"]
    names = {
        (m["MetricName"], tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"]))) for m in listed
    }
    for metric in ("ndcg_at_10", "recall_at_5", "precision_at_5", "mrr_at_10", "hit_at_5"):
        assert (metric, (("ContentType", "verse"), ("Model", "te3s"))) in names
    assert ("EvaluationRegression", (("ContentType", "verse"),)) in names
    assert metric_values("ndcg_at_10", {"ContentType": "verse", "Model": "te3s"}) == [1.0]
    assert metric_values("EvaluationRegression", {"ContentType": "verse"}) == [0.0]


def read_trec_run_text(text: str):
    import io

    return read_trec_run(io.StringIO(text))


def test_second_run_is_compared_with_the_baseline(indexed, s3):
    first = invoke(weekly())
    second = invoke(weekly())
    assert second["passed"] is True and second["baseline_set"] is False
    assert second["baseline_run_id"] == first["run_id"]
    comparison = second["comparison"]
    assert comparison["old_run_id"] == first["run_id"] and comparison["new_run_id"] == second["run_id"]
    assert comparison["queries"] == QUERIES
    assert {m["status"] for m in comparison["metrics"].values()} == {"ok"}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["Contents"]]
    assert (
        len([k for k in keys if k.endswith(".json")]) == 2
        and len([k for k in keys if k.endswith(".trec")]) == 2
    )


def garble(collection: str) -> None:
    """Give every point another point's vector (a broken reindex): ids and payloads stay, meaning goes."""
    from embedsvc import container
    from embedsvc.adapters.qdrant import Point

    store = container.vector_store()
    points = list(store.iter_points(collection, with_vectors=True))
    vectors = [p.vector for p in points]
    shift = len(vectors) // 2
    store.upsert(
        collection,
        [
            Point(str(p.id), vectors[(i + shift) % len(vectors)], dict(p.payload))
            for i, p in enumerate(points)
        ],
    )


def test_injected_regression_fails_the_gate_and_raises_the_alarm_metric(indexed, s3):
    baseline = invoke(weekly())
    garble("verse_te3s")
    answer = invoke(weekly())
    assert answer["passed"] is False
    assert set(answer["regressions"]) == {
        "ndcg_at_10",
        "recall_at_5",
        "precision_at_5",
        "mrr_at_10",
        "hit_at_5",
    }
    assert answer["baseline_run_id"] == baseline["run_id"] and answer["baseline_set"] is False
    ndcg = answer["comparison"]["metrics"]["ndcg_at_10"]
    assert ndcg["status"] == "regressed" and ndcg["delta_points"] < -90 and ndcg["p_value"] < 0.05
    assert max(metric_values("EvaluationRegression", {"ContentType": "verse"})) == 1.0
    # the baseline stays the good run: next week's run is still held to it
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key="baselines/verse/verse.json")["Body"].read())
    assert stored["run_id"] == baseline["run_id"]


def test_the_content_types_alias_is_searched_with_the_model_it_points_at(indexed, s3):
    from qdrant_client import models

    from embedsvc import container

    container.vector_store().client.update_collection_aliases(
        change_aliases_operations=[
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name="verse_te3s", alias_name="verse")
            )
        ]
    )
    answer = invoke(weekly())
    assert answer["collection"] == "verse" and answer["resolved_collection"] == "verse_te3s"
    assert answer["model"] == "te3s" and answer["metrics"]["ndcg_at_10"] == 1.0


def test_migration_gate_payload_names_model_and_collection(indexed, s3):
    invoke(weekly())  # the baseline
    event = json.loads((EVENTS / "migration_gate.json").read_text())
    event["ground_truth"] = f"s3://{BUCKET}/{GT_KEY}"
    answer = invoke(event)
    assert answer["passed"] is True and answer["baseline_set"] is False
    assert answer["collection"] == "verse_te3s" and answer["comparison"]["queries"] == QUERIES


def test_beir_ground_truth_from_s3(indexed, s3):
    docs = list(indexed.items())[:QUERIES]
    queries = "".join(json.dumps({"_id": f"q{i}", "text": text}) + "\n" for i, (_, text) in enumerate(docs))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{doc_id}\t1\n" for i, (doc_id, _) in enumerate(docs)
    )
    s3.put_object(Bucket=BUCKET, Key="ground-truth/own/queries.jsonl", Body=queries.encode())
    s3.put_object(Bucket=BUCKET, Key="ground-truth/own/qrels/dev.tsv", Body=qrels.encode())
    answer = invoke(
        {
            "content_type": "verse",
            "queries": f"s3://{BUCKET}/ground-truth/own/queries.jsonl",
            "qrels": f"s3://{BUCKET}/ground-truth/own/qrels/dev.tsv",
            "exclude_self": False,
        }
    )
    assert answer["ground_truth"] == "own/dev" and answer["metrics"]["recall_at_5"] == 1.0


def test_every_sample_event_is_a_valid_payload():
    from embedsvc.services.evaluation.job import EvaluationRequest

    paths = sorted(EVENTS.glob("*.json"))
    assert paths
    for path in paths:
        request = EvaluationRequest.parse(json.loads(path.read_text()))
        assert request.content_type == "verse"


@pytest.mark.parametrize(
    ("event", "error", "message"),
    [
        ([], "InvalidEvaluationRequest", "must be a JSON object"),
        ({}, "InvalidEvaluationRequest", "content_type: Field required"),
        ({"content_type": "verse"}, "InvalidEvaluationRequest", "a ground truth is required"),
        ({"content_type": "Verse", "ground_truth": "s3://b/k"}, "InvalidEvaluationRequest", "content_type"),
        ({"content_type": "verse", "ground_truth": "s3://b/k", "depth": 5}, "InvalidEvaluationRequest", "depth"),
        ({"content_type": "verse", "ground_truth": "s3://b/k", "colection": "x"}, "InvalidEvaluationRequest", "colection"),
        ({"content_type": "verse", "queries": "s3://b/q.jsonl"}, "InvalidEvaluationRequest", "queries need qrels"),
        (
            {"content_type": "verse", "ground_truth": "s3://b/k", "queries": "s3://b/q", "qrels": "s3://b/r"},
            "InvalidEvaluationRequest",
            "not both",
        ),
        ({"content_type": "verse", "ground_truth": f"s3://{BUCKET}/"}, "InvalidEvaluationRequest", "not an s3://bucket/key"),
        ({"content_type": "verse", "ground_truth": f"s3://{BUCKET}/nope.jsonl"}, "EvalDataError", "cannot read the ground truth"),
        ({"content_type": "note", "ground_truth": f"s3://{BUCKET}/{GT_KEY}"}, "CollectionNotFound", "'note_te3s'"),
        ({"content_type": "verse", "model": "nope", "ground_truth": f"s3://{BUCKET}/{GT_KEY}"}, "UnknownModel", "'nope'"),
        (
            {"content_type": "note", "collection": "verse_te3s", "ground_truth": f"s3://{BUCKET}/{GT_KEY}"},
            "InvalidEvaluationRequest",
            "does not belong to content type 'note'",
        ),
        (
            {"content_type": "verse", "model": "small", "collection": "verse_te3s", "ground_truth": f"s3://{BUCKET}/{GT_KEY}"},
            "InvalidEvaluationRequest",
            "verse_te3s",
        ),
    ],
)  # fmt: skip
def test_bad_payloads_raise_errors_a_state_machine_can_match(indexed, s3, event, error, message):
    with pytest.raises(Exception) as caught:
        invoke(event)
    assert type(caught.value).__name__ == error  # Lambda reports this as errorType; Step Functions matches it
    assert message in str(caught.value)


def test_a_missing_bucket_setting_is_a_configuration_error(indexed, monkeypatch):
    monkeypatch.delenv("EVAL_BUCKET")
    with pytest.raises(Exception) as caught:
        invoke(weekly())
    assert type(caught.value).__name__ == "ConfigError" and "EVAL_BUCKET" in str(caught.value)


def test_handler_imports_stay_light():
    """The handler module must not pull in torch or matplotlib (not in the Lambda layer)."""
    import subprocess
    import sys

    code = (
        "import sys; import functions.evaluation.app; "
        "bad = [m for m in ('torch', 'matplotlib', 'sentence_transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT / 'layers' / 'embedsvc'}:{ROOT}", "POWERTOOLS_TRACE_DISABLED": "true"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_scores_in_the_run_are_qdrant_cosines(indexed, s3):
    answer = invoke(weekly())
    run = Run.from_json(s3.get_object(Bucket=BUCKET, Key=f"runs/{answer['run_id']}.json")["Body"].read())
    top_scores = [ranked[0][1] for ranked in run.results.values()]
    assert np.allclose(top_scores, 1.0, atol=1e-5)  # each query is its verse's own text


SHARED_VERSES = ROOT.parent / "shared" / "data" / "bible" / "bsb_verses.jsonl"
GATE_QUERIES = 300


@pytest.fixture
def gate_corpus(service, s3) -> list[str]:
    """400 real verses indexed into verse_te3s; 300 of them are queries for their own text."""
    from embedsvc.services.evaluation.corpus import index_corpus

    docs: dict[str, str] = {}
    with SHARED_VERSES.open() as fh:
        for line in fh:
            verse = json.loads(line)
            if verse["text"].strip():
                docs[verse["id"]] = verse["text"].strip()
            if len(docs) == 400:
                break
    index_corpus("te3s", "verse_te3s", docs, None, info=lambda m: None)
    queried = list(docs)[:GATE_QUERIES]
    lines = [
        json.dumps({"id": f"q{i}", "query": docs[d], "relevant_passages": [d]}) for i, d in enumerate(queried)
    ]
    s3.put_object(Bucket=BUCKET, Key=GT_KEY, Body="\n".join(lines).encode())
    return queried


def break_points(doc_ids: list[str]) -> None:
    """A bad reindex of a few documents: their vectors now mean something else."""
    from embedsvc import container
    from embedsvc.adapters.qdrant import Point, point_id
    from embedsvc.local.provider_sim import hash_vector

    store = container.vector_store()
    payloads = store.payloads("verse_te3s", [point_id("verse", d) for d in doc_ids])
    store.upsert(
        "verse_te3s",
        [Point(pid, hash_vector(f"unrelated {pid}", 1536), payload) for pid, payload in payloads.items()],
    )


def test_a_five_point_drop_on_300_queries_fails_the_gate_alarms_and_marks_the_stored_run(gate_corpus, s3):
    from embedsvc.services.evaluation.runs import S3RunStore

    invoke(weekly())  # the baseline: every query finds its verse
    break_points(gate_corpus[:18])  # 6% of the queries lose their answer: a 6-point drop
    answer = invoke(weekly())
    assert answer["passed"] is False and "recall_at_5" in answer["regressions"]
    assert answer["comparison"]["metrics"]["recall_at_5"]["delta_points"] == pytest.approx(-6.0)
    assert max(metric_values("EvaluationRegression", {"ContentType": "verse"})) == 1.0
    stored = S3RunStore(BUCKET).load(answer["run_id"])
    assert stored.params["gate"]["passed"] is False and "recall_at_5" in stored.params["gate"]["regressions"]


def test_a_one_point_wobble_on_300_queries_passes_the_gate(gate_corpus, s3):
    invoke(weekly())
    break_points(gate_corpus[:3])  # a 1-point drop
    answer = invoke(weekly())
    assert answer["passed"] is True
    assert answer["comparison"]["metrics"]["recall_at_5"]["delta_points"] == pytest.approx(-1.0)
    assert max(metric_values("EvaluationRegression", {"ContentType": "verse"})) == 0.0
