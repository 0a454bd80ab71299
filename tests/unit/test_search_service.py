"""The search service: who pays for the query embedding, owner filtering, and what `resolve` picks to search.

Qdrant runs in memory; the embedding service is a fake that records how it was called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from qdrant_client import models

from embedsvc.adapters.qdrant import Point, VectorStore, point_id
from embedsvc.config import DEFAULT_REGISTRY, Registry, Settings
from embedsvc.observability import CallContext
from embedsvc.services.ratelimit import Lane
from embedsvc.services.search import CollectionNotFound, InvalidSearchTarget, SearchService, SearchTarget

DIMS = {"minilm": 384, "te3s": 1536}


@dataclass
class _Embedded:
    vectors: np.ndarray


class FakeEmbeddings:
    """Embeds text t as the unit vector on axis len(t) % dims; records every call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def embed(self, texts, model, *, context, lane, truncate):
        self.calls.append(
            {"texts": texts, "model": model, "context": context, "lane": lane, "truncate": truncate}
        )
        dims = DIMS[model]
        return _Embedded(np.stack([axis(len(t) % dims, dims) for t in texts]))


def axis(i: int, dims: int) -> np.ndarray:
    vector = np.zeros(dims, dtype=np.float32)
    vector[i] = 1.0
    return vector


@pytest.fixture
def store():
    store = VectorStore.connect()
    yield store
    store.close()


@pytest.fixture
def embeddings() -> FakeEmbeddings:
    return FakeEmbeddings()


@pytest.fixture
def search(store, embeddings) -> SearchService:
    settings = Settings(
        registry=Registry.model_validate(DEFAULT_REGISTRY), content_models={"verse": ["te3s"]}
    )
    return SearchService(embeddings, store, settings)  # type: ignore[arg-type]


def add(
    store: VectorStore, collection: str, content_type: str, docs: dict[str, tuple[int, str | None]]
) -> None:
    """Points of content `id -> (axis, owner)` in a new collection."""
    dims = DIMS[collection.rsplit("_", 1)[-1]]
    store.ensure_collection(collection, dims)
    points = []
    for doc_id, (i, owner) in docs.items():
        payload = {"id": doc_id, "owner_id": owner}  # the worker writes owner_id None for shared content
        points.append(Point(point_id(content_type, doc_id), axis(i, dims), payload))
    store.upsert(collection, points)


def alias(store: VectorStore, name: str, collection: str) -> None:
    store.client.update_collection_aliases(
        change_aliases_operations=[
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=name)
            )
        ]
    )


def test_search_embeds_as_the_caller_says_and_filters_by_owner(search, store, embeddings):
    add(store, "note_minilm", "note", {"mine": (3, "t1"), "theirs": (3, "t2"), "shared": (4, None)})
    context = CallContext(source="user_query", tenant_id="t1")
    hits = search.search("minilm", "note_minilm", ["abc", "abcd"], 2, context=context, owner_id="t1")
    assert [[h.id for h in ranked] for ranked in hits] == [["mine", "shared"], ["shared", "mine"]]
    assert embeddings.calls[-1]["context"] is context and embeddings.calls[-1]["lane"] is Lane.REALTIME
    assert embeddings.calls[-1]["truncate"] is True

    evaluation = CallContext(source="evaluation", task_id="t")
    hits = search.search("minilm", "note_minilm", ["abc"], 3, context=evaluation, lane=Lane.BULK)
    assert {h.id for h in hits[0]} == {"mine", "theirs", "shared"}  # no owner: everything
    assert embeddings.calls[-1]["lane"] is Lane.BULK and embeddings.calls[-1]["context"] is evaluation


def test_search_through_an_alias_and_of_nothing(search, store, embeddings):
    add(store, "note_minilm", "note", {"a": (3, None)})
    alias(store, "note", "note_minilm")
    assert search.alias_target("note") == "note_minilm" and search.alias_target("verse") is None
    assert [h.id for h in search.search("minilm", "note", ["abc"], 1, context=CallContext())[0]] == ["a"]
    assert search.search("minilm", "note", [], 1, context=CallContext()) == []
    calls = len(embeddings.calls)
    with pytest.raises(CollectionNotFound, match="'note_te3s' does not exist"):
        search.search("te3s", "note_te3s", ["abc"], 1, context=CallContext())
    assert len(embeddings.calls) == calls  # nothing is embedded (or paid for) for a missing collection


def test_resolve_picks_the_named_collection_the_model_the_alias_or_the_active_model(search, store):
    add(store, "verse_te3s", "verse", {"a": (1, None)})
    add(store, "verse_minilm", "verse", {"a": (1, None)})
    assert search.resolve("verse") == SearchTarget("te3s", "verse_te3s", "verse_te3s")  # the active model
    assert search.resolve("verse", model="all-MiniLM-L6-v2") == SearchTarget(
        "minilm", "verse_minilm", "verse_minilm"
    )
    assert search.resolve("verse", collection="verse_minilm").model_key == "minilm"
    alias(store, "verse", "verse_minilm")
    assert search.resolve("verse") == SearchTarget("minilm", "verse", "verse_minilm")  # the alias's model


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"collection": "note_te3s"}, InvalidSearchTarget, "does not belong to content type 'verse'"),
        ({"model": "minilm"}, CollectionNotFound, "'verse_minilm' for content type 'verse' does not exist"),
        ({"model": "minilm", "collection": "verse_te3s"}, InvalidSearchTarget, "is neither the alias"),
        ({"model": "minilm", "collection": "verse"}, InvalidSearchTarget, "made by 'te3s', not 'minilm'"),
        ({"collection": "verse_custom"}, InvalidSearchTarget, "cannot tell which model made 'verse_custom'"),
    ],
)
def test_resolve_refuses_what_does_not_fit_together(search, store, kwargs, error, message):
    add(store, "verse_te3s", "verse", {"a": (1, None)})
    store.ensure_collection("verse_custom", 8)
    alias(store, "verse", "verse_te3s")
    with pytest.raises(error, match=message):
        search.resolve("verse", **kwargs)


def test_resolve_refuses_a_collection_of_another_vector_size(search, store):
    store.ensure_collection("verse_te3s", 384)  # made by something else than te3s
    assert store.vector_size("verse_te3s") == 384
    with pytest.raises(InvalidSearchTarget, match="holds 384-dimensional vectors; model 'te3s' makes 1536"):
        search.resolve("verse")


def test_the_evaluation_reports_a_bad_target_under_its_own_error_name(search, store):
    from embedsvc.services.evaluation.errors import InvalidEvaluationRequest
    from embedsvc.services.evaluation.job import resolve_target

    add(store, "verse_te3s", "verse", {"a": (1, None)})
    with pytest.raises(InvalidEvaluationRequest, match="does not belong to content type 'note'") as caught:
        resolve_target("note", collection="verse_te3s", service=search)
    assert caught.value.param == "collection"
    assert resolve_target("verse", service=search).resolved == "verse_te3s"
