"""Evaluation runs: the record of one model's results on one ground truth, TREC run files, and storage.

Layout (same in a local directory and under an S3 prefix):
    runs/<run_id>.json          the whole run (results, per-query and aggregate metrics)
    runs/<run_id>.trec          the TREC run file (`qid Q0 docid rank score tag`), for trec_eval
    baselines/<scope>/<gt>.json {"run_id": ...}: the reference run per (content type, ground truth)
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from embedsvc.services.evaluation.groundtruth import EvalDataError, PathLike
from embedsvc.services.evaluation.metrics import rank

SCHEMA_VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Results = dict[str, list[tuple[str, float]]]
BaselineKey = tuple[str, str]


class RunNotFound(EvalDataError):
    """A run id (or a baseline's run) that the store does not hold."""

    status = 404
    code = "run_not_found"


def _slug(text: str) -> str:
    return _SAFE.sub("-", text).strip("-") or "x"


def content_type_of(collection: str, model_key: str) -> str:
    """The content type of a `{content_type}_{model_key}` collection (the collection itself otherwise)."""
    suffix = f"_{model_key}"
    if collection.endswith(suffix) and len(collection) > len(suffix):
        return collection[: -len(suffix)]
    return collection


def new_run_id(collection: str, ground_truth: str, created_at: datetime) -> str:
    """A sortable, path- and key-safe id: `<UTC time>-<collection>-<ground truth>-<random>`."""
    stamp = created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{_slug(collection)}-{_slug(ground_truth)}-{uuid.uuid4().hex[:8]}"


@dataclass
class Run:
    """One evaluation: ranked results, per-query metrics and their averages for one model and ground truth."""

    model_key: str
    collection: str
    ground_truth: str
    created_at: datetime
    results: Results
    per_query: dict[str, dict[str, float]]
    aggregate: dict[str, float]
    run_id: str = ""
    # How the run was made (exclude_self, k_search, metrics ...), so two runs can be checked for comparability.
    params: dict[str, Any] = field(default_factory=dict)
    irrelevant_hits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.created_at.tzinfo is None:
            self.created_at = self.created_at.replace(tzinfo=UTC)
        if not self.run_id:
            self.run_id = new_run_id(self.collection, self.ground_truth, self.created_at)
        if not _RUN_ID.match(self.run_id):
            raise ValueError(f"run id '{self.run_id}' may hold only letters, digits, '.', '_' and '-'")

    @property
    def content_type(self) -> str:
        """The content type the run's collection serves (the baseline scope)."""
        return content_type_of(self.collection, self.model_key)

    @property
    def baseline_key(self) -> BaselineKey:
        """(content type, ground truth): runs of different models on the same data share a baseline."""
        return (self.content_type, self.ground_truth)

    @property
    def queries(self) -> int:
        """Number of queries averaged."""
        return len(self.per_query)

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-ready data."""
        return {
            "schema": SCHEMA_VERSION,
            "run_id": self.run_id,
            "model_key": self.model_key,
            "collection": self.collection,
            "ground_truth": self.ground_truth,
            "created_at": self.created_at.isoformat(),
            "params": self.params,
            "aggregate": self.aggregate,
            "queries": self.queries,
            "skipped": self.skipped,
            "per_query": self.per_query,
            "irrelevant_hits": {q: [[d, r] for d, r in hits] for q, hits in self.irrelevant_hits.items()},
            "results": {q: [[d, s] for d, s in ranked] for q, ranked in self.results.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Run:
        """Rebuild a run from `to_dict` output."""
        if data.get("schema") != SCHEMA_VERSION:
            raise EvalDataError(f"unsupported run schema {data.get('schema')!r}")
        try:
            return cls(
                run_id=data["run_id"],
                model_key=data["model_key"],
                collection=data["collection"],
                ground_truth=data["ground_truth"],
                created_at=datetime.fromisoformat(data["created_at"]),
                params=dict(data.get("params", {})),
                aggregate={k: float(v) for k, v in data["aggregate"].items()},
                skipped=list(data.get("skipped", [])),
                per_query={q: {k: float(v) for k, v in m.items()} for q, m in data["per_query"].items()},
                irrelevant_hits={
                    q: [(str(d), int(r)) for d, r in hits]
                    for q, hits in data.get("irrelevant_hits", {}).items()
                },
                results={q: [(str(d), float(s)) for d, s in ranked] for q, ranked in data["results"].items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EvalDataError(f"malformed run data: {exc!r}") from None

    def to_json(self) -> str:
        """The run as a JSON document."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Run:
        """Parse `to_json` output."""
        return cls.from_dict(json.loads(text))

    def to_trec(self, tag: str | None = None) -> str:
        """The results as a TREC run file."""
        buf = io.StringIO()
        write_trec_run(self.results, buf, tag=tag or self.model_key)
        return buf.getvalue()


# --- TREC run files ------------------------------------------------------------------------------


def write_trec_run(
    results: Mapping[str, Iterable[tuple[str, float]]], out: PathLike | TextIO, *, tag: str
) -> None:
    """Write `qid Q0 docid rank score tag` lines, each query in trec_eval's order.

    Scores are written with `repr` so that a re-read run ties exactly where the original did.
    """
    tag = _slug(tag)
    if isinstance(out, str | Path):
        with open(out, "w", encoding="utf-8") as fh:
            write_trec_run(results, fh, tag=tag)
        return
    for qid, ranked in results.items():
        if not qid or any(ch.isspace() for ch in qid):
            raise ValueError(f"query id '{qid}' cannot be written to a TREC run file")
        items = _in_trec_order(ranked)
        for doc_id, _ in items:
            if not doc_id or any(ch.isspace() for ch in doc_id):
                raise ValueError(f"document id '{doc_id}' cannot be written to a TREC run file")
        for position, (doc_id, score) in enumerate(items, start=1):
            out.write(f"{qid} Q0 {doc_id} {position} {score!r} {tag}\n")


def read_trec_run(source: PathLike | TextIO) -> Results:
    """Read a TREC run file into {qid: [(doc_id, score)]} in trec_eval order (the rank column is ignored)."""
    if isinstance(source, str | Path):
        with open(source, encoding="utf-8") as fh:
            return _read_trec(fh, str(source))
    return _read_trec(source, getattr(source, "name", "<run>"))


def _read_trec(fh: TextIO, name: str) -> Results:
    scores: dict[str, dict[str, float]] = {}
    for number, line in enumerate(fh, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise EvalDataError(
                f"expected 'qid Q0 docid rank score tag', got {len(fields)} fields", path=name, line=number
            )
        qid, _, doc_id, _, score, _ = fields
        try:
            value = float(score)
        except ValueError:
            raise EvalDataError(
                f"score '{score}' is not a number", path=name, line=number, item_id=doc_id
            ) from None
        per_query = scores.setdefault(qid, {})
        if doc_id in per_query:
            raise EvalDataError(
                f"document '{doc_id}' appears twice for query '{qid}'", path=name, line=number, item_id=doc_id
            )
        per_query[doc_id] = value
    return {qid: [(d, s[d]) for d in rank(s.items())] for qid, s in scores.items()}


# --- storage -------------------------------------------------------------------------------------


def _baseline_path(key: BaselineKey) -> str:
    scope, ground_truth = key
    # quote() is injective, so "a/b" and "a_b" never share a baseline file.
    return f"baselines/{quote(scope, safe='')}/{quote(ground_truth, safe='')}.json"


def _check_run_id(run_id: str) -> None:
    if not _RUN_ID.match(run_id):
        raise RunNotFound(f"'{run_id}' is not a run id", item_id=run_id)


class RunStore(ABC):
    """Runs and baselines, by run id and by (content type or collection, ground-truth name)."""

    @abstractmethod
    def _put(self, key: str, body: bytes, content_type: str) -> None: ...

    @abstractmethod
    def _get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    def save(self, run: Run) -> str:
        """Store the run (JSON and TREC file); returns its id."""
        self._put(f"runs/{run.run_id}.trec", run.to_trec().encode(), "text/plain; charset=utf-8")
        # The JSON goes last: a run is listed only once both files exist.
        self._put(f"runs/{run.run_id}.json", run.to_json().encode(), "application/json")
        return run.run_id

    def load(self, run_id: str) -> Run:
        """The stored run with this id."""
        _check_run_id(run_id)
        body = self._get(f"runs/{run_id}.json")
        if body is None:
            raise RunNotFound(f"no run '{run_id}' in {self}", item_id=run_id)
        return Run.from_json(body)

    def run_ids(self) -> list[str]:
        """Ids of all stored runs, oldest first (ids start with their UTC time)."""
        return sorted(
            k.removeprefix("runs/").removesuffix(".json") for k in self._list("runs/") if k.endswith(".json")
        )

    def baseline(self, key: BaselineKey) -> Run | None:
        """The baseline run for (scope, ground truth), or None when none was set."""
        body = self._get(_baseline_path(key))
        if body is None:
            return None
        return self.load(json.loads(body)["run_id"])

    def set_baseline(self, key: BaselineKey, run_id: str) -> None:
        """Make a stored run the baseline for (scope, ground truth)."""
        self.load(run_id)  # refuse to point a baseline at a run that is not there
        scope, ground_truth = key
        record = {
            "scope": scope,
            "ground_truth": ground_truth,
            "run_id": run_id,
            "set_at": datetime.now(UTC).isoformat(),
        }
        self._put(_baseline_path(key), json.dumps(record).encode(), "application/json")


class LocalRunStore(RunStore):
    """Runs under a local directory."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a reader never sees half a run or half a baseline record.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _get(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def _list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return [f"{prefix}{p.name}" for p in base.iterdir() if p.is_file() and not p.name.startswith(".tmp-")]


class S3RunStore(RunStore):
    """Runs under s3://bucket/prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None):
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body, ContentType=content_type)

    def _get(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except self.client.exceptions.NoSuchKey:
            return None
        return bytes(response["Body"].read())

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys.extend(obj["Key"].removeprefix(self.prefix) for obj in page.get("Contents", []))
        return keys


def open_run_store(location: str, *, s3_client: Any = None) -> RunStore:
    """`s3://bucket/prefix` -> S3RunStore; anything else is a local directory."""
    if location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"no bucket in '{location}'")
        return S3RunStore(bucket, prefix, client=s3_client)
    return LocalRunStore(location)


def make_run(
    *,
    model_key: str,
    collection: str,
    ground_truth: str,
    results: Mapping[str, Sequence[tuple[str, float]]],
    per_query: dict[str, dict[str, float]],
    aggregate: dict[str, float],
    params: dict[str, Any] | None = None,
    irrelevant_hits: dict[str, list[tuple[str, int]]] | None = None,
    skipped: list[str] | None = None,
    created_at: datetime | None = None,
) -> Run:
    """Build a Run stamped now, with results in trec_eval order."""
    return Run(
        model_key=model_key,
        collection=collection,
        ground_truth=ground_truth,
        created_at=created_at or datetime.now(UTC),
        results={q: _in_trec_order(ranked) for q, ranked in results.items()},
        per_query=per_query,
        aggregate=aggregate,
        params=dict(params or {}),
        irrelevant_hits=dict(irrelevant_hits or {}),
        skipped=list(skipped or []),
    )


def _in_trec_order(ranked: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    items = [(doc_id, float(score)) for doc_id, score in ranked]
    order = rank(items)  # raises on a document listed twice
    scores = dict(items)
    return [(doc_id, scores[doc_id]) for doc_id in order]
