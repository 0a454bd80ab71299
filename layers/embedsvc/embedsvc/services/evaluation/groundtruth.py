"""Ground truth for retrieval evaluation: the project's JSON-lines shape, BEIR files and the Bible layouts.

Everything loads into one `GroundTruth`. Loaders are strict: a malformed line, an empty query, a
duplicate id or a judgement pointing outside the corpus stops the load with an `EvalDataError`
naming the file, the line and the id, because a silently skipped judgement changes the numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedsvc.errors import InvalidRequest

PathLike = str | Path


class EvalDataError(InvalidRequest):
    """Ground truth, corpus or run data that cannot be used as given."""

    code = "invalid_evaluation_data"

    def __init__(
        self,
        message: str,
        *,
        path: PathLike | None = None,
        line: int | None = None,
        item_id: str | None = None,
    ):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message, param="ground_truth")
        self.path = str(path) if path is not None else None
        self.line = line
        self.item_id = item_id


@dataclass
class GroundTruth:
    """Queries, graded judgements (grade > 0 = relevant), known-irrelevant ids and optionally the corpus."""

    name: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    irrelevant: dict[str, set[str]] = field(default_factory=dict)
    corpus: dict[str, str] | None = None
    # Things worth telling a person that do not stop the evaluation (e.g. unretrievable empty documents).
    warnings: list[str] = field(default_factory=list)

    def relevant(self, qid: str) -> dict[str, int]:
        """The judged-relevant documents of one query (grade > 0)."""
        return {doc: grade for doc, grade in self.qrels.get(qid, {}).items() if grade > 0}

    @property
    def evaluable_queries(self) -> list[str]:
        """Query ids with at least one relevant document: the ones trec_eval averages over."""
        return [qid for qid in self.queries if any(g > 0 for g in self.qrels.get(qid, {}).values())]

    def restricted_to(self, indexed_ids: AbstractSet[str]) -> GroundTruth:
        """Judgements outside `indexed_ids` removed, and queries left with no relevant document dropped.

        For a content store that holds part of a corpus (the demo's books): neither model can find a
        document that is not there, so such judgements would only lower both runs alike.
        """
        qrels: dict[str, dict[str, int]] = {}
        for qid, judged in self.qrels.items():
            kept = {doc: grade for doc, grade in judged.items() if doc in indexed_ids}
            if any(grade > 0 for grade in kept.values()):
                qrels[qid] = kept
        return GroundTruth(
            name=self.name,
            queries={qid: text for qid, text in self.queries.items() if qid in qrels},
            qrels=qrels,
            irrelevant={
                q: {d for d in docs if d in indexed_ids} for q, docs in self.irrelevant.items() if q in qrels
            },
            warnings=list(self.warnings),
        )

    def head(self, n: int) -> GroundTruth:
        """The first n queries (file order) with their judgements; the corpus is kept whole."""
        if n < 0:
            raise ValueError("n must be >= 0")
        keep = list(self.queries)[:n]
        return GroundTruth(
            name=self.name,
            queries={q: self.queries[q] for q in keep},
            qrels={q: dict(self.qrels[q]) for q in keep if q in self.qrels},
            irrelevant={q: set(self.irrelevant[q]) for q in keep if q in self.irrelevant},
            corpus=self.corpus,
            warnings=list(self.warnings),
        )


# --- reading helpers -----------------------------------------------------------------------------


def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise EvalDataError("file not found", path=path)
    # utf-8-sig: files saved by spreadsheet tools start with a BOM that would end up in the first id.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if line.strip():
                yield number, line


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in _open_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"not valid JSON ({exc.msg})", path=path, line=number) from None
        if not isinstance(obj, dict):
            raise EvalDataError("expected a JSON object on each line", path=path, line=number)
        yield number, obj


def _id_of(obj: Mapping[str, Any], keys: tuple[str, ...], path: Path, number: int) -> str:
    for key in keys:
        if key in obj:
            value = obj[key]
            # Numeric ids (SciFact's are digit strings, some tools write numbers) compare as text.
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise EvalDataError(f"'{key}' must be a string", path=path, line=number)
            text = str(value).strip()
            if not text:
                raise EvalDataError(f"empty '{key}'", path=path, line=number)
            if any(ch.isspace() for ch in text):
                # A TREC run file is whitespace-separated: an id with a space cannot round-trip.
                raise EvalDataError(f"id '{text}' contains whitespace", path=path, line=number, item_id=text)
            return text
    raise EvalDataError(f"missing {' or '.join(repr(k) for k in keys)}", path=path, line=number)


def _text_field(obj: Mapping[str, Any], key: str, path: Path, number: int) -> str:
    value = obj.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EvalDataError(f"'{key}' must be a string", path=path, line=number)
    return value


# --- corpus --------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Document texts by id, plus the ids whose text is empty (known, but cannot be embedded)."""

    docs: dict[str, str]
    empty: set[str]
    path: Path | None = None

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.docs or doc_id in self.empty


def load_corpus(path: PathLike) -> Corpus:
    """Read a corpus: BEIR `corpus.jsonl` ({_id,title,text}) or Bible verses ({id,text,...}).

    Document text is `title + " " + text`, stripped (the BEIR/MTEB convention).
    """
    path = Path(path)
    docs: dict[str, str] = {}
    empty: set[str] = set()
    first_line: dict[str, int] = {}
    for number, obj in _json_lines(path):
        doc_id = _id_of(obj, ("_id", "id"), path, number)
        if doc_id in first_line:
            raise EvalDataError(
                f"duplicate document id '{doc_id}' (first on line {first_line[doc_id]})",
                path=path,
                line=number,
                item_id=doc_id,
            )
        first_line[doc_id] = number
        text = (
            _text_field(obj, "title", path, number) + " " + _text_field(obj, "text", path, number)
        ).strip()
        if text:
            docs[doc_id] = text
        else:
            # The BSB omits 16 verses other translations have: such ids are real but unembeddable.
            empty.add(doc_id)
    if not docs:
        raise EvalDataError("the corpus has no documents", path=path)
    return Corpus(docs=docs, empty=empty, path=path)


# --- queries and qrels ---------------------------------------------------------------------------


def load_queries(path: PathLike) -> dict[str, str]:
    """Read BEIR `queries.jsonl` ({_id,text}); empty texts and duplicate ids are errors."""
    path = Path(path)
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, obj in _json_lines(path):
        qid = _id_of(obj, ("_id", "id"), path, number)
        if qid in first_line:
            raise EvalDataError(
                f"duplicate query id '{qid}' (first on line {first_line[qid]})",
                path=path,
                line=number,
                item_id=qid,
            )
        first_line[qid] = number
        text = _text_field(obj, "text", path, number).strip()
        if not text:
            raise EvalDataError(f"query '{qid}' has empty text", path=path, line=number, item_id=qid)
        queries[qid] = text
    return queries


def _resolve_qrels(path: Path, split: str | None) -> Path:
    if path.is_dir():
        if split is not None:
            candidate = path / f"{split}.tsv"
            if not candidate.is_file():
                raise EvalDataError(f"no qrels file for split '{split}'", path=candidate)
            return candidate
        files = sorted(path.glob("*.tsv"))
        if len(files) == 1:
            return files[0]
        names = ", ".join(f.stem for f in files) or "none"
        raise EvalDataError(f"choose a split: the directory holds qrels for {names}", path=path)
    return path


def load_qrels(path: PathLike, *, split: str | None = None) -> tuple[dict[str, dict[str, int]], dict]:
    """Read qrels: BEIR TSV (`query-id corpus-id score`, header optional) or TREC (`qid 0 docid rel`).

    Returns the judgements and, for error messages later, the line of each (qid, doc_id) pair.
    """
    path = _resolve_qrels(Path(path), split)
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    seen_data = False
    for number, line in _open_lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if not seen_data and len(fields) == 3 and not _is_int(fields[2]):
            # BEIR's header line ("query-id corpus-id score"); only the first line may be one.
            seen_data = True
            continue
        seen_data = True
        if len(fields) == 3:
            qid, doc_id, score = fields
        elif len(fields) == 4:
            qid, _, doc_id, score = fields
        else:
            raise EvalDataError(
                f"expected 'query-id corpus-id score' (or TREC 'qid 0 docid rel'), got {len(fields)} fields",
                path=path,
                line=number,
            )
        if not qid or not doc_id:
            raise EvalDataError("empty query or document id", path=path, line=number)
        if not _is_int(score):
            raise EvalDataError(
                f"score '{score}' of query '{qid}' is not an integer", path=path, line=number, item_id=qid
            )
        if (qid, doc_id) in lines:
            raise EvalDataError(
                f"duplicate judgement for query '{qid}', document '{doc_id}' (first on line {lines[qid, doc_id]})",
                path=path,
                line=number,
                item_id=doc_id,
            )
        lines[qid, doc_id] = number
        qrels.setdefault(qid, {})[doc_id] = int(score)
    if not qrels:
        raise EvalDataError("no judgements", path=path)
    return qrels, {"path": path, "lines": lines}


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def _check_in_corpus(
    qrels: Mapping[str, Mapping[str, int]],
    corpus: Corpus,
    where: Mapping[tuple[str, str], int],
    path: Path,
    what: str = "judged",
) -> None:
    missing = [(where[q, d], q, d) for q, docs in qrels.items() for d in docs if d not in corpus]
    if missing:
        missing.sort()
        number, qid, doc_id = missing[0]
        more = f" ({len(missing) - 1} more judgements also point outside it)" if len(missing) > 1 else ""
        raise EvalDataError(
            f"{what} document '{doc_id}' of query '{qid}' is not in the corpus {corpus.path}{more}",
            path=path,
            line=number,
            item_id=doc_id,
        )


def _empty_doc_warning(qrels: Mapping[str, Mapping[str, int]], corpus: Corpus) -> list[str]:
    hits = sum(1 for docs in qrels.values() for d, g in docs.items() if g > 0 and d in corpus.empty)
    warnings = []
    if corpus.empty:
        warnings.append(f"{len(corpus.empty)} documents have empty text and are not indexed")
    if hits:
        warnings.append(
            f"{hits} relevant judgements point to documents with empty text: no model can retrieve them"
        )
    return warnings


def default_name(queries: PathLike, qrels: PathLike | None = None) -> str:
    """A ground-truth name from its paths, e.g. `scifact/train`, `topics/dev`, `xref-bsb/dev`."""
    queries = Path(queries)
    base = queries.parent.name or queries.stem
    if queries.stem not in ("queries", base):
        base = f"{base}-{queries.stem.removeprefix('queries_')}" if queries.parent.name else queries.stem
    if qrels is None:
        return base
    return f"{base}/{Path(qrels).stem}"


def load_beir(
    queries: PathLike,
    qrels: PathLike,
    *,
    corpus: PathLike | Corpus | None = None,
    split: str | None = None,
    name: str | None = None,
) -> GroundTruth:
    """Load BEIR-style files: `queries.jsonl`, `qrels/<split>.tsv` and optionally `corpus.jsonl`.

    Only queries that have judgements are kept (BEIR's queries file covers every split); a judged
    query missing from the queries file is an error.
    """
    queries_path = Path(queries)
    all_queries = load_queries(queries_path)
    judgements, info = load_qrels(qrels, split=split)
    qrels_path: Path = info["path"]
    lines: dict[tuple[str, str], int] = info["lines"]
    first_line_of_query: dict[str, int] = {}
    for (qid, _), number in lines.items():
        first_line_of_query[qid] = min(number, first_line_of_query.get(qid, number))
    for qid in sorted(judgements, key=first_line_of_query.__getitem__):
        if qid not in all_queries:
            raise EvalDataError(
                f"judged query '{qid}' is not in {queries_path}",
                path=qrels_path,
                line=first_line_of_query[qid],
                item_id=qid,
            )
    gt = GroundTruth(
        name=name or default_name(queries_path, qrels_path),
        queries={qid: text for qid, text in all_queries.items() if qid in judgements},
        qrels=judgements,
    )
    if corpus is not None:
        loaded = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
        _check_in_corpus(judgements, loaded, lines, qrels_path)
        gt.corpus = loaded.docs
        gt.warnings.extend(_empty_doc_warning(judgements, loaded))
    return gt


def load_jsonl_ground_truth(
    path: PathLike, *, corpus: PathLike | Corpus | None = None, name: str | None = None
) -> GroundTruth:
    """Load the project's JSON-lines ground truth (see ARCHITECTURE.md), one query per line.

    `relevant_passages` is a list of ids (grade 1) or an object {id: grade}; `irrelevant_passages`
    is optional; `id` is optional (queries without one get `q<line ordinal>`).
    """
    path = Path(path)
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    irrelevant: dict[str, set[str]] = {}
    first_line: dict[str, int] = {}
    where: dict[tuple[str, str], int] = {}
    for ordinal, (number, obj) in enumerate(_json_lines(path), start=1):
        qid = _id_of(obj, ("id", "_id"), path, number) if ("id" in obj or "_id" in obj) else f"q{ordinal}"
        if qid in first_line:
            raise EvalDataError(
                f"duplicate query id '{qid}' (first on line {first_line[qid]})",
                path=path,
                line=number,
                item_id=qid,
            )
        first_line[qid] = number
        text = obj.get("query")
        if not isinstance(text, str):
            raise EvalDataError(f"query '{qid}' has no 'query' string", path=path, line=number, item_id=qid)
        if not text.strip():
            raise EvalDataError(f"query '{qid}' is empty", path=path, line=number, item_id=qid)
        queries[qid] = text.strip()
        graded = _graded_ids(obj.get("relevant_passages", []), "relevant_passages", qid, path, number)
        bad = _graded_ids(obj.get("irrelevant_passages", []), "irrelevant_passages", qid, path, number)
        both = sorted(set(graded) & set(bad))
        if both:
            raise EvalDataError(
                f"passage '{both[0]}' of query '{qid}' is listed as relevant and irrelevant",
                path=path,
                line=number,
                item_id=both[0],
            )
        qrels[qid] = graded
        if bad:
            irrelevant[qid] = set(bad)
        for doc_id in [*graded, *bad]:
            where[qid, doc_id] = number
    if not queries:
        raise EvalDataError("no queries", path=path)
    gt = GroundTruth(name=name or path.stem, queries=queries, qrels=qrels, irrelevant=irrelevant)
    if corpus is not None:
        loaded = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
        _check_in_corpus(qrels, loaded, where, path, "relevant")
        _check_in_corpus(irrelevant_as_qrels(irrelevant), loaded, where, path, "irrelevant")
        gt.corpus = loaded.docs
        gt.warnings.extend(_empty_doc_warning(qrels, loaded))
    return gt


def irrelevant_as_qrels(irrelevant: Mapping[str, set[str]]) -> dict[str, dict[str, int]]:
    """Known-irrelevant ids as grade-0 judgements (how trec_eval would see them)."""
    return {qid: {doc: 0 for doc in sorted(docs)} for qid, docs in irrelevant.items()}


def _graded_ids(value: Any, key: str, qid: str, path: Path, number: int) -> dict[str, int]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(doc, 1) for doc in value]
    else:
        raise EvalDataError(
            f"'{key}' of query '{qid}' must be a list of ids", path=path, line=number, item_id=qid
        )
    out: dict[str, int] = {}
    for doc, grade in items:
        if isinstance(doc, bool) or not isinstance(doc, str | int) or not str(doc).strip():
            raise EvalDataError(
                f"'{key}' of query '{qid}' holds an invalid id {doc!r}", path=path, line=number
            )
        doc_id = str(doc).strip()
        if isinstance(grade, bool) or not isinstance(grade, int) or grade < 1:
            raise EvalDataError(
                f"grade of '{doc_id}' in '{key}' of query '{qid}' must be an integer >= 1",
                path=path,
                line=number,
                item_id=doc_id,
            )
        if doc_id in out:
            raise EvalDataError(
                f"duplicate id '{doc_id}' in '{key}' of query '{qid}'", path=path, line=number, item_id=doc_id
            )
        out[doc_id] = grade
    return out


# --- Bible layouts and dispatch ------------------------------------------------------------------

BIBLE_TASKS = ("topics", "xref")
BIBLE_TRANSLATIONS = ("bsb", "kjv")


def load_bible_eval(
    data_dir: PathLike,
    task: str,
    *,
    translation: str = "bsb",
    query_translation: str | None = None,
    split: str = "dev",
) -> GroundTruth:
    """Load `bible_eval/<task>` over `bible/<translation>_verses.jsonl` (ids are the verses' `id`).

    `xref` queries are verses themselves: evaluate them with `exclude_self=True`.
    """
    if task not in BIBLE_TASKS:
        raise ValueError(f"task must be one of {BIBLE_TASKS}")
    data_dir = Path(data_dir)
    query_translation = query_translation or translation
    for tr in (translation, query_translation):
        if tr not in BIBLE_TRANSLATIONS:
            raise ValueError(f"translation must be one of {BIBLE_TRANSLATIONS}")
    task_dir = data_dir / "bible_eval" / task
    if task == "topics":
        queries = task_dir / "queries.jsonl"
        name = f"bible-topics/{split}"
    else:
        queries = task_dir / f"queries_{query_translation}.jsonl"
        name = f"bible-xref-{query_translation}/{split}"
    corpus = data_dir / "bible" / f"{translation}_verses.jsonl"
    name += f"@{translation}"
    return load_beir(queries, task_dir / "qrels" / f"{split}.tsv", corpus=corpus, name=name)


def is_jsonl_ground_truth(path: PathLike) -> bool:
    """True when the first record of a JSON-lines file has a `query` key (the project's format)."""
    for _, obj in _json_lines(Path(path)):
        return "query" in obj
    return False


def load_ground_truth(
    queries: PathLike,
    *,
    qrels: PathLike | None = None,
    corpus: PathLike | None = None,
    split: str | None = None,
    name: str | None = None,
) -> GroundTruth:
    """Load whichever layout the paths describe (what the CLI calls).

    `queries` may be a BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/), a BEIR queries
    file (then `qrels` is required) or a JSON-lines ground truth file (then `qrels` must be absent).
    """
    qpath = Path(queries)
    if qpath.is_dir():
        corpus = corpus if corpus is not None else (qpath / "corpus.jsonl")
        qrels = qrels if qrels is not None else (qpath / "qrels")
        queries_file = qpath / "queries.jsonl"
        qrels_path = _resolve_qrels(Path(qrels), split)
        return load_beir(
            queries_file,
            qrels_path,
            corpus=corpus if Path(corpus).exists() else None,
            name=name or f"{qpath.name}/{qrels_path.stem}",
        )
    if is_jsonl_ground_truth(qpath):
        if qrels is not None:
            raise EvalDataError(
                "this file holds its own judgements (relevant_passages): do not pass qrels", path=qpath
            )
        return load_jsonl_ground_truth(qpath, corpus=corpus, name=name)
    if qrels is None:
        raise EvalDataError("BEIR-style queries need a qrels file (query-id corpus-id score)", path=qpath)
    return load_beir(qpath, qrels, corpus=corpus, split=split, name=name)
