"""A save embeds while Postgres commits: proved with events, not a clock."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from embedsvc.adapters.content_store import ContentRow, content_hash, content_point_id
from embedsvc.config import ContentTypeSpec, Settings
from embedsvc.errors import ContentStoreUnavailable
from embedsvc.observability import CallContext
from embedsvc.services.documents import DocumentService

WAIT = 10.0  # only a broken (sequential) service waits this long: the test then fails


@dataclass
class Result:
    vectors: list
    errors: dict


class Store:
    """Commits only once the embedding has started: a service that embeds after the commit deadlocks here."""

    content_types = {"verse": ContentTypeSpec(private=False)}

    def __init__(self, embedding_started: threading.Event, fail: bool = False):
        self.embedding_started = embedding_started
        self.fail = fail

    def is_private(self, content_type: str) -> bool:
        return False

    def put(self, content_type, content_id, *, text, metadata, owner_id):
        assert self.embedding_started.wait(WAIT), "the embedding did not start while the commit ran"
        if self.fail:
            raise ContentStoreUnavailable("injected")
        return ContentRow(
            content_type,
            content_id,
            None,
            text,
            metadata,
            content_hash(text),
            1,
            datetime.now(UTC),
            None,
            content_point_id(content_type, content_id, None),
        )


class Embeddings:
    def __init__(self, started: threading.Event):
        self.started = started

    def embed_partial(self, texts, model, **kwargs):
        self.started.set()
        return Result([[1.0, 0.0]], {})


class Vectors:
    def __init__(self):
        self.written: list = []

    def ensure_collection(self, name, dimensions):
        pass

    def ensure_alias(self, alias, collection):
        pass

    def upsert_if_newer(self, collection, points):
        self.written.append((collection, points[0].payload["version"]))


class Queue:
    def send(self, messages):
        return []


def test_the_embedding_runs_while_the_content_commits():
    started = threading.Event()
    vectors = Vectors()
    svc = build(Store(started), Embeddings(started), vectors)
    result = svc.put("verse", "v1", text="In the beginning", metadata={}, context=CallContext())
    assert result.indexing == "indexed" and vectors.written == [("verse_small", 1)]


def test_a_failed_commit_writes_no_vector():
    started = threading.Event()
    vectors = Vectors()
    svc = build(Store(started, fail=True), Embeddings(started), vectors)
    with pytest.raises(ContentStoreUnavailable):
        svc.put("verse", "v1", text="In the beginning", metadata={}, context=CallContext())
    assert vectors.written == []


def build(store, embeddings, vectors) -> DocumentService:
    small = {
        "key": "small",
        "name": "small-test-model",
        "dimensions": 2,
        "max_input_tokens": 50,
        "max_inputs_per_request": 4,
        "max_tokens_per_request": 200,
        "price_per_million_tokens": 1.0,
        "tokenizer": "estimate",
        "endpoints": [{"provider": "p", "model_name": "small-test-model"}],
    }
    registry = {
        "default_model": "small",
        "providers": {
            "p": {"key": "p", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "X"}
        },
        "models": {"small": small},
    }
    settings = Settings.model_validate({"registry": registry})
    return DocumentService(settings, store, embeddings, vectors, Queue())
