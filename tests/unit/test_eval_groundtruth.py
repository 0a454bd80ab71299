"""Ground-truth loaders: the JSON-lines shape, BEIR files, the Bible layouts, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedsvc.errors import InvalidRequest
from embedsvc.services.evaluation.groundtruth import (
    EvalDataError,
    load_beir,
    load_bible_eval,
    load_corpus,
    load_ground_truth,
    load_jsonl_ground_truth,
    load_qrels,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
SCIFACT = FIXTURES / "scifact"
BIBLE = FIXTURES / "bible"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


# --- the project's JSON-lines format -------------------------------------------------------------


def test_jsonl_ground_truth_ids_grades_and_irrelevant() -> None:
    gt = load_jsonl_ground_truth(FIXTURES / "ground_truth.jsonl")
    assert gt.name == "ground_truth"
    assert list(gt.queries) == ["companionship", "q2", "q3"]  # q<ordinal> when "id" is absent
    assert gt.queries["q2"] == "the serpent who deceived Eve"
    assert gt.qrels["companionship"] == {"Eccl.4.9": 1, "Eccl.4.10": 1, "Gen.2.18": 1}
    assert gt.qrels["q3"] == {"Rom.6.23": 2, "Gen.2.17": 1}  # an object gives grades
    assert gt.irrelevant == {"companionship": {"Rev.20.2"}, "q2": {"Eccl.4.11"}}
    assert gt.corpus is None


def test_jsonl_ground_truth_checked_against_a_corpus() -> None:
    gt = load_jsonl_ground_truth(FIXTURES / "ground_truth.jsonl", corpus=BIBLE / "bible" / "kjv_verses.jsonl")
    assert gt.corpus is not None and gt.corpus["Gen.2.18"].startswith("And the LORD God said")


def test_architecture_example_line_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path / "gt.jsonl",
        jsonl(
            {
                "query": "God's faithfulness even when we are unfaithful",
                "relevant_passages": ["2tim_2_13", "lam_3_22", "rom_3_3", "ps_89_33"],
                "irrelevant_passages": ["gen_1_1", "rev_22_16"],
            }
        ),
    )
    gt = load_jsonl_ground_truth(path)
    assert gt.qrels == {"q1": {"2tim_2_13": 1, "lam_3_22": 1, "rom_3_3": 1, "ps_89_33": 1}}
    assert gt.irrelevant == {"q1": {"gen_1_1", "rev_22_16"}}


# --- BEIR ----------------------------------------------------------------------------------------


def test_beir_scifact_slice() -> None:
    gt = load_beir(
        SCIFACT / "queries.jsonl", SCIFACT / "qrels" / "train.tsv", corpus=SCIFACT / "corpus.jsonl"
    )
    assert gt.name == "scifact/train"
    assert list(gt.queries) == ["0", "2", "4", "6", "9"]
    assert gt.qrels["0"] == {"31715818": 1}  # CRLF line ends and the header line are handled
    assert gt.corpus is not None and len(gt.corpus) == 11
    first = json.loads((SCIFACT / "corpus.jsonl").read_text().splitlines()[0])
    assert gt.corpus[first["_id"]] == (first["title"] + " " + first["text"]).strip()
    assert gt.warnings == []


def test_beir_dataset_directory_and_graded_scores(tmp_path: Path) -> None:
    write(
        tmp_path / "ds" / "corpus.jsonl",
        jsonl({"_id": "d1", "title": "", "text": "one"}, {"_id": "d2", "text": "two"}),
    )
    write(
        tmp_path / "ds" / "queries.jsonl", jsonl({"_id": "a", "text": "x"}, {"_id": "b", "text": "unjudged"})
    )
    write(tmp_path / "ds" / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\na\td1\t2\na\td2\t0\n")
    gt = load_ground_truth(tmp_path / "ds")
    assert gt.name == "ds/test"
    assert gt.queries == {"a": "x"}  # queries of other splits are dropped
    assert gt.qrels == {"a": {"d1": 2, "d2": 0}}
    assert gt.relevant("a") == {"d1": 2}
    assert gt.corpus == {"d1": "one", "d2": "two"}


def test_trec_qrels_format_is_read_too(tmp_path: Path) -> None:
    path = write(tmp_path / "qrels.txt", "q1 0 d1 1\nq1 0 d2 3\n")
    qrels, _ = load_qrels(path)
    assert qrels == {"q1": {"d1": 1, "d2": 3}}


# --- the Bible layouts ---------------------------------------------------------------------------


def test_bible_topics_slice_graded_over_kjv() -> None:
    gt = load_bible_eval(BIBLE, "topics", translation="kjv")
    assert gt.name == "bible-topics/dev@kjv"
    assert gt.queries["T00031"] == "absenteeism"
    assert gt.qrels["T00031"]["Luke.16.10"] == 18  # OpenBible votes are the grades
    assert gt.corpus is not None and "Acts.8.37" in gt.corpus
    assert gt.warnings == []


def test_bible_ids_are_the_verse_ids() -> None:
    verses = [json.loads(line) for line in (BIBLE / "bible" / "bsb_verses.jsonl").read_text().splitlines()]
    gt = load_bible_eval(BIBLE, "xref", translation="bsb")
    assert gt.corpus is not None
    nonempty = {v["id"] for v in verses if v["text"].strip()}
    assert set(gt.corpus) == nonempty
    judged = {d for docs in gt.qrels.values() for d in docs}
    assert judged <= {v["id"] for v in verses}


def test_bible_bsb_omitted_verses_are_kept_as_judgements_with_a_warning() -> None:
    gt = load_bible_eval(BIBLE, "xref", translation="bsb")
    assert gt.name == "bible-xref-bsb/dev@bsb"
    assert gt.corpus is not None and "Luke.17.36" not in gt.corpus  # the BSB omits it
    assert gt.qrels["Matt.24.40"]["Luke.17.36"] == 1  # still a judgement: no model can find it
    assert any("empty text" in w for w in gt.warnings)


def test_bible_xref_kjv_queries_over_bsb_corpus() -> None:
    gt = load_bible_eval(BIBLE, "xref", translation="bsb", query_translation="kjv")
    assert gt.name == "bible-xref-kjv/dev@bsb"
    assert gt.queries["Gen.2.18"].startswith("And the LORD God said")


def test_bible_layout_through_the_generic_loader() -> None:
    gt = load_ground_truth(
        BIBLE / "bible_eval" / "xref" / "queries_kjv.jsonl",
        qrels=BIBLE / "bible_eval" / "xref" / "qrels" / "dev.tsv",
        corpus=BIBLE / "bible" / "kjv_verses.jsonl",
    )
    assert gt.name == "xref-kjv/dev"
    assert set(gt.queries) == {"Gen.2.17", "Gen.2.18", "Gen.3.1", "Matt.24.40"}


# --- errors: each names the file, the line and the id --------------------------------------------


def assert_error(
    exc: pytest.ExceptionInfo[EvalDataError], path: Path, line: int | None, *needles: str
) -> None:
    message = str(exc.value)
    assert isinstance(exc.value, InvalidRequest)
    assert exc.value.status == 400
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(prefix), message
    for needle in needles:
        assert needle in message, message


def test_error_qrels_id_missing_from_corpus(tmp_path: Path) -> None:
    corpus = write(tmp_path / "corpus.jsonl", jsonl({"_id": "d1", "text": "one"}))
    queries = write(tmp_path / "queries.jsonl", jsonl({"_id": "q1", "text": "x"}))
    qrels = write(tmp_path / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td404\t1\n")
    with pytest.raises(EvalDataError) as exc:
        load_beir(queries, qrels, corpus=corpus)
    assert_error(exc, qrels, 3, "'d404'", "'q1'", "not in the corpus")
    assert exc.value.item_id == "d404"


def test_error_relevant_passage_missing_from_corpus(tmp_path: Path) -> None:
    gt = write(
        tmp_path / "gt.jsonl",
        jsonl(
            {"query": "a", "relevant_passages": ["Gen.2.17"]},
            {"query": "b", "relevant_passages": ["Nope.1.1"]},
        ),
    )
    with pytest.raises(EvalDataError) as exc:
        load_jsonl_ground_truth(gt, corpus=BIBLE / "bible" / "kjv_verses.jsonl")
    assert_error(exc, gt, 2, "'Nope.1.1'", "'q2'", "not in the corpus")


def test_error_irrelevant_passage_missing_from_corpus(tmp_path: Path) -> None:
    gt = write(
        tmp_path / "gt.jsonl",
        jsonl({"query": "a", "relevant_passages": ["Gen.2.17"], "irrelevant_passages": ["Gen.99.1"]}),
    )
    with pytest.raises(EvalDataError) as exc:
        load_jsonl_ground_truth(gt, corpus=BIBLE / "bible" / "kjv_verses.jsonl")
    assert_error(exc, gt, 1, "irrelevant document 'Gen.99.1'")


@pytest.mark.parametrize("text", ["", "   "])
def test_error_empty_query_beir(tmp_path: Path, text: str) -> None:
    queries = write(
        tmp_path / "queries.jsonl", jsonl({"_id": "q1", "text": "ok"}, {"_id": "q2", "text": text})
    )
    qrels = write(tmp_path / "qrels.tsv", "q1\td1\t1\n")
    with pytest.raises(EvalDataError) as exc:
        load_beir(queries, qrels)
    assert_error(exc, queries, 2, "query 'q2' has empty text")


def test_error_empty_query_jsonl(tmp_path: Path) -> None:
    gt = write(
        tmp_path / "gt.jsonl",
        jsonl({"id": "a", "query": "x", "relevant_passages": []}, {"id": "b", "query": " "}),
    )
    with pytest.raises(EvalDataError) as exc:
        load_jsonl_ground_truth(gt)
    assert_error(exc, gt, 2, "query 'b' is empty")


def test_error_duplicate_query_id_beir(tmp_path: Path) -> None:
    queries = write(
        tmp_path / "queries.jsonl", "\n" + jsonl({"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"})
    )
    with pytest.raises(EvalDataError) as exc:
        load_beir(queries, write(tmp_path / "q.tsv", "q1\td\t1\n"))
    assert_error(exc, queries, 3, "duplicate query id 'q1'", "first on line 2")


def test_error_duplicate_query_id_jsonl_explicit_and_generated(tmp_path: Path) -> None:
    gt = write(tmp_path / "gt.jsonl", jsonl({"id": "q2", "query": "a"}, {"query": "b"}))
    with pytest.raises(EvalDataError) as exc:
        load_jsonl_ground_truth(gt)
    # the second line would be q2 by position, which the first line already took
    assert_error(exc, gt, 2, "duplicate query id 'q2'", "first on line 1")


def test_error_duplicate_document_id(tmp_path: Path) -> None:
    corpus = write(
        tmp_path / "corpus.jsonl",
        jsonl({"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"_id": "d1", "text": "c"}),
    )
    with pytest.raises(EvalDataError) as exc:
        load_corpus(corpus)
    assert_error(exc, corpus, 3, "duplicate document id 'd1'", "first on line 1")


def test_error_duplicate_judgement(tmp_path: Path) -> None:
    qrels = write(tmp_path / "train.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n")
    with pytest.raises(EvalDataError) as exc:
        load_qrels(qrels)
    assert_error(exc, qrels, 3, "duplicate judgement", "'q1'", "'d1'", "first on line 2")


def test_error_duplicate_relevant_passage(tmp_path: Path) -> None:
    gt = write(tmp_path / "gt.jsonl", jsonl({"query": "a", "relevant_passages": ["x", "y", "x"]}))
    with pytest.raises(EvalDataError) as exc:
        load_jsonl_ground_truth(gt)
    assert_error(exc, gt, 1, "duplicate id 'x'", "relevant_passages", "'q1'")


def test_error_passage_both_relevant_and_irrelevant(tmp_path: Path) -> None:
    gt = write(
        tmp_path / "gt.jsonl", jsonl({"query": "a", "relevant_passages": ["x"], "irrelevant_passages": ["x"]})
    )
    with pytest.raises(EvalDataError) as exc:
        load_jsonl_ground_truth(gt)
    assert_error(exc, gt, 1, "'x'", "relevant and irrelevant")


def test_error_judged_query_not_in_queries(tmp_path: Path) -> None:
    queries = write(tmp_path / "queries.jsonl", jsonl({"_id": "q1", "text": "a"}))
    qrels = write(tmp_path / "dev.tsv", "q1\td1\t1\nq9\td1\t1\n")
    with pytest.raises(EvalDataError) as exc:
        load_beir(queries, qrels)
    assert_error(exc, qrels, 2, "judged query 'q9'")


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", 2, "score 'high' of query 'q1' is not an integer"),
        ("q1\td1\n", 1, "got 2 fields"),
        ("q1\td1\t1\nq1\td2\t0.5\n", 2, "not an integer"),
    ],
)
def test_error_malformed_qrels_lines(tmp_path: Path, content: str, line: int, needle: str) -> None:
    qrels = write(tmp_path / "dev.tsv", content)
    with pytest.raises(EvalDataError) as exc:
        load_qrels(qrels)
    assert_error(exc, qrels, line, needle)


def test_error_bad_json_line(tmp_path: Path) -> None:
    gt = write(tmp_path / "gt.jsonl", jsonl({"query": "a"}) + '{"query": "b",\n')
    with pytest.raises(EvalDataError) as exc:
        load_jsonl_ground_truth(gt)
    assert_error(exc, gt, 2, "not valid JSON")


def test_error_qrels_directory_with_several_splits(tmp_path: Path) -> None:
    write(tmp_path / "qrels" / "dev.tsv", "q\td\t1\n")
    write(tmp_path / "qrels" / "test.tsv", "q\td\t1\n")
    with pytest.raises(EvalDataError) as exc:
        load_qrels(tmp_path / "qrels")
    assert_error(exc, tmp_path / "qrels", None, "choose a split", "dev, test")
    assert load_qrels(tmp_path / "qrels", split="test")[1]["path"].name == "test.tsv"


def test_error_wrong_combination_of_files(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="do not pass qrels"):
        load_ground_truth(FIXTURES / "ground_truth.jsonl", qrels=SCIFACT / "qrels" / "train.tsv")
    with pytest.raises(EvalDataError, match="need a qrels file"):
        load_ground_truth(SCIFACT / "queries.jsonl")
    with pytest.raises(EvalDataError, match="file not found"):
        load_ground_truth(tmp_path / "missing.jsonl")


def test_head_keeps_first_queries_and_whole_corpus() -> None:
    gt = load_beir(
        SCIFACT / "queries.jsonl", SCIFACT / "qrels" / "train.tsv", corpus=SCIFACT / "corpus.jsonl"
    )
    small = gt.head(2)
    assert list(small.queries) == ["0", "2"]
    assert set(small.qrels) == {"0", "2"}
    assert small.corpus == gt.corpus
    assert small.evaluable_queries == ["0", "2"]
