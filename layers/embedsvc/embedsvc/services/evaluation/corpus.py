"""Indexing an evaluation corpus through the worker path, so the evaluation measures what users search.

`index_corpus` turns documents into IndexQueue messages (batches of 100, priority bulk, source
`evaluation`) and runs them through the worker's `Indexer.process`, retrying what it says to retry;
only documents the collection lacks (or holds with other text) are sent.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from embedsvc.errors import VectorStoreUnavailable
from embedsvc.models.names import CONTENT_TYPE, CONTENT_TYPE_PATTERN
from embedsvc.services.evaluation.errors import IndexingFailed, IndexingIncomplete, InvalidEvaluationRequest
from embedsvc.services.evaluation.retrieval import SOURCE
from embedsvc.services.evaluation.runner import ProgressFn
from embedsvc.services.evaluation.runs import content_type_of

if TYPE_CHECKING:
    from embedsvc.adapters.qdrant import VectorStore
    from embedsvc.services.indexing import BatchOutcome

INDEX_BATCH = 100  # the IndexQueue event source's batch size
INDEX_ATTEMPTS = 5  # tries per batch before transient failures are given up on
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
_PAYLOAD_PAGE = 1000

InfoFn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class IndexReport:
    """What `index_corpus` did."""

    collection: str
    documents: int
    already_indexed: int
    indexed: int = 0
    unchanged: int = 0
    extra_points: int = 0  # points in the collection that are not in the corpus (they compete in search)
    retried: int = 0
    seconds: float = 0.0


def indexable_content_type(collection: str, model_key: str) -> str:
    """The content type of a `{content_type}_{model_key}` collection, or InvalidEvaluationRequest.

    The worker writes only such collections, so a corpus can be indexed only into one of them.
    """
    content_type = content_type_of(collection, model_key)
    if content_type == collection or not CONTENT_TYPE.match(content_type):
        raise InvalidEvaluationRequest(
            f"cannot index into collection '{collection}': the worker writes collections named "
            f"<content_type>_{model_key}, where the content type matches {CONTENT_TYPE_PATTERN} "
            f"(e.g. scifact_{model_key}); rename --collection",
            param="collection",
        )
    return content_type


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _message(content_type: str, doc_id: str, text: str, model_key: str, task_id: str) -> str:
    return json.dumps(
        {
            "schema_version": 1,
            "content_type": content_type,
            "id": doc_id,
            "text": text,
            "source": SOURCE,
            "task_id": task_id,
            "priority": "bulk",
            "models": [model_key],
        },
        ensure_ascii=False,
    )


def _evaluation_indexer() -> Any:
    """The worker's Indexer on the container's components, with a dead-letter that keeps reasons here.

    Evaluation documents that the worker refuses are the evaluator's input errors: they are reported
    to the caller, not sent to the service's DLQ (where a redrive would index them for real).
    """
    from embedsvc import container
    from embedsvc.services.indexing import Indexer

    return Indexer(
        container.settings(),
        container.embedding_service(),
        container.vector_store(),
        dead_letter=lambda items: [],
    )


def missing_documents(
    store: VectorStore, collection: str, content_type: str, docs: Mapping[str, str]
) -> tuple[list[str], int]:
    """Corpus ids the collection lacks or holds with another text, and how many corpus ids it holds."""
    from embedsvc.adapters.qdrant import point_id
    from embedsvc.services.indexing import content_hash

    if not store.exists(collection):
        return list(docs), 0
    ids = list(docs)
    stored: dict[str, dict[str, Any]] = {}
    for chunk in _chunks([point_id(content_type, d) for d in ids], _PAYLOAD_PAGE):
        stored.update(store.payloads(collection, chunk))
    todo: list[str] = []
    present = 0
    for doc_id in ids:
        payload = stored.get(point_id(content_type, doc_id))
        if payload is not None:
            present += 1
        if payload is None or payload.get("content_hash") != content_hash(docs[doc_id]):
            todo.append(doc_id)
    return todo, present


def index_corpus(
    model_key: str,
    collection: str,
    docs: Mapping[str, str],
    progress: ProgressFn | None = None,
    *,
    indexer: Any = None,
    store: VectorStore | None = None,
    info: InfoFn = _stderr,
    attempts: int = INDEX_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
    task_id: str | None = None,
) -> IndexReport:
    """Index the documents the collection lacks through the worker path; returns what was done.

    Documents are sent as IndexQueue messages (batches of 100, priority bulk, source `evaluation`)
    to `Indexer.process`; messages it asks to retry are retried with exponential backoff up to
    `attempts` times per batch. A dead-lettered message raises IndexingFailed; messages still failing
    after the retries raise IndexingIncomplete (what was indexed stays: a new run resumes).
    """
    from embedsvc import container
    from embedsvc.services.indexing import Incoming

    started = time.perf_counter()
    spec = container.settings().registry.model(model_key)
    if spec.key != model_key:
        raise InvalidEvaluationRequest(f"use the model key '{spec.key}', not its name", param="model")
    content_type = indexable_content_type(collection, model_key)
    store = store if store is not None else container.vector_store()
    if store.exists(collection):
        size = None
        # Only for a clearer message than Qdrant's: when it cannot answer, the indexing will say why.
        with contextlib.suppress(VectorStoreUnavailable):
            size = store.vector_size(collection)
        if size is not None and size != spec.dimensions:
            raise InvalidEvaluationRequest(
                f"collection '{collection}' holds {size}-dimensional vectors; model '{model_key}' "
                f"makes {spec.dimensions}",
                param="collection",
            )
    todo, present = missing_documents(store, collection, content_type, docs)
    count = store.count(collection) if store.exists(collection) else 0
    report = IndexReport(
        collection=collection,
        documents=len(docs),
        already_indexed=len(docs) - len(todo),
        extra_points=max(0, count - present),
    )
    if report.extra_points:
        info(
            f"warning: {collection} holds {report.extra_points} points that are not in the corpus; "
            "they take part in the search"
        )
    if not todo:
        info(f"{collection} already holds all {len(docs)} documents: nothing to index")
        report.seconds = time.perf_counter() - started
        return report
    if report.already_indexed:
        info(f"{collection} holds {report.already_indexed} of them; indexing the other {len(todo)}")
    indexer = indexer if indexer is not None else _evaluation_indexer()
    task_id = task_id or f"eval-{collection}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    done = 0
    if progress is not None:
        progress(0, len(todo))
    for number, chunk in enumerate(_chunks(todo, INDEX_BATCH)):
        pending = {
            f"eval-{number}-{i}": _message(content_type, doc_id, docs[doc_id], model_key, task_id)
            for i, doc_id in enumerate(chunk)
        }
        ids = {f"eval-{number}-{i}": doc_id for i, doc_id in enumerate(chunk)}
        for attempt in range(1, attempts + 1):
            batch = [Incoming(message_id, body) for message_id, body in pending.items()]
            outcome = indexer.process(batch)
            _raise_dead_lettered(outcome, ids, collection)
            report.indexed += outcome.indexed
            report.unchanged += outcome.unchanged
            retry = set(outcome.retry)
            pending = {m: b for m, b in pending.items() if m in retry}
            if not pending:
                break
            report.retried += len(pending)
            if attempt < attempts:
                delay = min(RETRY_BASE_SECONDS * 2 ** (attempt - 1), RETRY_MAX_SECONDS)
                info(f"{len(pending)} documents failed transiently; retrying in {delay:g}s")
                sleep(delay)
        if pending:
            failing = ", ".join(sorted(ids[m] for m in pending)[:5])
            raise IndexingIncomplete(
                f"{len(pending)} documents of {collection} still failed after {attempts} attempts "
                f"(e.g. {failing}; the worker's log says why); {done + len(chunk) - len(pending)} of "
                f"{len(todo)} were indexed this run: run again to resume"
            )
        done += len(chunk)
        if progress is not None:
            progress(done, len(todo))
    report.seconds = time.perf_counter() - started
    info(
        f"indexed {report.indexed} documents into {collection} in {report.seconds:.1f}s"
        + (f" ({report.unchanged} unchanged)" if report.unchanged else "")
    )
    return report


def _raise_dead_lettered(outcome: BatchOutcome, ids: Mapping[str, str], collection: str) -> None:
    if not outcome.dead_lettered:
        return
    first_id, reason = next(iter(outcome.dead_lettered.items()))
    more = len(outcome.dead_lettered) - 1
    raise IndexingFailed(
        f"the worker refused document '{ids.get(first_id, first_id)}' for {collection}: {reason}"
        + (f" ({more} more refused)" if more else "")
    )
