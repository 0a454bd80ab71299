"""The content routes (/v1/documents, /v1/search) through the real handler: Postgres, Qdrant in memory, moto SQS.

Content types: `verse` (public) and `note` (private to the caller's tenant), both indexed by the cheap
8-dimension simulator model `small`. The simulator's vectors are hashes of the text, so a query equal to
a document's text finds that document first with score 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core import NotSet

from embedsvc.errors import VectorStoreUnavailable
from embedsvc.local.gateway import rest_event
from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.models.documents import Document, DocumentWriteResult, ImportResult, SearchResponse

VERSE = "verse_small"
NOTE = "note_small"


@dataclass
class Answer:
    status: int
    body: dict[str, Any]


@dataclass
class Docs:
    container: Any
    queue_url: str
    sim: Any

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        tenant: str | None = "tenant-a",
        headers: dict | None = None,
        raw: bool = False,
    ) -> Answer:
        """One request as API Gateway passes it after the authorizer let the tenant's key in."""
        from functions.api.app import lambda_handler

        authorizer = {"principalId": f"user-{tenant}", "user_id": f"user-{tenant}"}
        if tenant is not None:
            authorizer["tenant_id"] = tenant
        text = body if raw or body is None else json.dumps(body)
        event = rest_event(
            method, path, {"Content-Type": "application/json", **(headers or {})}, text, authorizer
        )
        answer = lambda_handler(event, LocalLambdaContext("api"))
        return Answer(answer["statusCode"], json.loads(answer["body"]))

    def put(
        self, content_type: str, doc_id: str, text: str, metadata: dict | None = None, **kwargs
    ) -> Answer:
        body: dict[str, Any] = {"text": text}
        if metadata is not None:
            body["metadata"] = metadata
        return self.call("PUT", f"/v1/documents/{content_type}/{doc_id}", body, **kwargs)

    def get(self, content_type: str, doc_id: str, **kwargs) -> Answer:
        return self.call("GET", f"/v1/documents/{content_type}/{doc_id}", **kwargs)

    def delete(self, content_type: str, doc_id: str, **kwargs) -> Answer:
        return self.call("DELETE", f"/v1/documents/{content_type}/{doc_id}", **kwargs)

    def search(
        self, query: str, content_type: str = "verse", *, tenant: str | None = "tenant-a", **fields
    ) -> Answer:
        return self.call(
            "POST", "/v1/search", {"query": query, "content_type": content_type, **fields}, tenant=tenant
        )

    def hits(self, query: str, content_type: str = "verse", **kwargs) -> list[dict]:
        answer = self.search(query, content_type, **kwargs)
        assert answer.status == 200, answer.body
        return answer.body["data"]

    def drain(self) -> list[dict]:
        """Every message on IndexQueue (and off it)."""
        from embedsvc.adapters.aws import client

        sqs = client("sqs")
        bodies = []
        while True:
            got = sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not got:
                return bodies
            for message in got:
                bodies.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])

    def row(self, content_type: str, doc_id: str, owner: str | None = None):
        return self.container.content_store().get(content_type, doc_id, owner_id=owner, include_deleted=True)


@pytest.fixture
def docs(service, content_db, sim, emf, monkeypatch) -> Docs:
    from embedsvc.adapters.aws import client
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder

    queue_url = client("sqs").create_queue(QueueName="test-index")["QueueUrl"]
    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"verse": ["small"], "note": ["small"]}))
    monkeypatch.setenv("INDEX_QUEUE_URL", queue_url)
    reset_settings()
    service.put("costs", CostRecorder(sink=emf.append))
    return Docs(service, queue_url, sim)


class VectorStoreDown:
    """Qdrant unreachable: every call fails as the adapter reports it."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise VectorStoreUnavailable(f"qdrant {name} failed: connection refused")

        return fail


def test_put_then_get_shows_the_version_indexed_in_each_collection(docs):
    put = docs.put(
        "verse", "gen_1_1", "In the beginning God created the heaven and the earth.", {"book": "Genesis"}
    )
    assert put.status == 200, put.body
    assert put.body["object"] == "document" and put.body["id"] == "gen_1_1"
    assert put.body["indexing"] == "indexed" and put.body["deleted"] is False
    assert put.body["collections"] == [VERSE]
    got = docs.get("verse", "gen_1_1")
    assert got.status == 200
    assert got.body["text"].startswith("In the beginning") and got.body["metadata"] == {"book": "Genesis"}
    assert got.body["version"] == put.body["version"] and got.body["updated_at"] == put.body["updated_at"]
    assert got.body["indexing"] == {VERSE: "indexed"}

    again = docs.put("verse", "gen_1_1", "In the beginning was the Word.")
    assert again.status == 200 and again.body["version"] > put.body["version"]
    got = docs.get("verse", "gen_1_1")
    assert got.body["text"] == "In the beginning was the Word." and got.body["metadata"] == {}
    assert got.body["version"] == again.body["version"] and got.body["indexing"] == {VERSE: "indexed"}
    assert docs.drain() == []  # indexed in the request: nothing was queued


def test_put_with_qdrant_down_commits_and_queues_an_index_request(docs):
    docs.container.put("vector_store", VectorStoreDown())
    put = docs.put("note", "n1", "a prayer for my sister", {"topic": "family"})
    assert put.status == 200, put.body
    assert put.body["indexing"] == "queued"
    row = docs.row("note", "n1", "tenant-a")
    assert row is not None and row.text == "a prayer for my sister" and row.version == put.body["version"]
    (message,) = docs.drain()
    assert message["content_type"] == "note" and message["id"] == "n1" and message["owner_id"] == "tenant-a"
    assert message["priority"] == "realtime" and message["source"] == "note_index"
    assert "text" not in message  # by id: the worker reads the row's current version
    got = docs.get("note", "n1")
    assert got.status == 200 and got.body["indexing"] == {NOTE: "unknown"}  # Qdrant did not answer


def test_put_with_qdrant_and_the_queue_down_is_pending_repair_and_the_row_is_kept(docs):
    from embedsvc.adapters.aws import client
    from embedsvc.adapters.index_queue import IndexQueue

    docs.container.put("vector_store", VectorStoreDown())
    docs.container.put("index_queue", IndexQueue(docs.queue_url + "-gone", client("sqs")))
    put = docs.put("verse", "ps_23_1", "The Lord is my shepherd; I shall not want.")
    assert put.status == 200, put.body
    assert put.body["indexing"] == "pending_repair"
    row = docs.row("verse", "ps_23_1")
    assert row is not None and not row.deleted and row.version == put.body["version"]
    assert docs.drain() == []

    # Qdrant and the queue are back: the hourly repair finds the row, the worker indexes it.
    from embedsvc.adapters.qdrant import VectorStore
    from embedsvc.services.indexing import Incoming, Indexer
    from embedsvc.services.repair import RepairJob

    vectors, queue = VectorStore.connect(), IndexQueue(docs.queue_url, client("sqs"))
    settings, store = docs.container.settings(), docs.container.content_store()
    assert RepairJob(store, vectors, queue, settings).run("verse").as_dict()["queued"] == 1
    indexer = Indexer(settings, docs.container.embedding_service(), vectors, lambda items: [], store=store)
    requests = [Incoming(f"m{i}", json.dumps(m)) for i, m in enumerate(docs.drain())]
    assert indexer.process(requests).indexed == 1
    payload = vectors.payloads("verse_small", [row.point_id])[row.point_id]
    assert (payload["version"], payload["content_hash"]) == (row.version, row.content_hash)


def test_delete_then_get_is_404_and_search_no_longer_finds_it(docs):
    text = "Jesus wept."
    docs.put("verse", "jn_11_35", text)
    docs.put("verse", "jn_3_16", "For God so loved the world.")
    assert docs.hits(text)[0]["id"] == "jn_11_35"
    deleted = docs.delete("verse", "jn_11_35")
    assert deleted.status == 200, deleted.body
    assert deleted.body["deleted"] is True and deleted.body["indexing"] == "indexed"
    got = docs.get("verse", "jn_11_35")
    assert got.status == 404 and got.body["error"]["code"] == "document_not_found"
    assert [h["id"] for h in docs.hits(text)] == ["jn_3_16"]
    again = docs.delete("verse", "jn_11_35")
    assert again.status == 404 and again.body["error"]["code"] == "document_not_found"
    assert docs.row("verse", "jn_11_35").deleted  # soft-deleted: the version is remembered


def test_import_commits_all_and_queues_one_by_id_request_each(docs, sim):
    documents = [{"id": f"v{i}", "text": f"verse number {i}", "metadata": {"n": i}} for i in range(12)]
    answer = docs.call("POST", "/v1/documents/verse:import", {"documents": documents})
    assert answer.status == 202, answer.body
    assert answer.body == {
        "object": "import",
        "content_type": "verse",
        "committed": 12,
        "queued": 12,
        "pending_repair": 0,
    }
    messages = docs.drain()
    assert sorted(m["id"] for m in messages) == sorted(d["id"] for d in documents)
    assert all(m["priority"] == "bulk" and m["content_type"] == "verse" and "text" not in m for m in messages)
    assert docs.row("verse", "v11").metadata == {"n": 11}
    assert sim.calls == 0  # indexing is the worker's, from the queue


def test_import_into_a_private_type_belongs_to_the_callers_tenant(docs):
    answer = docs.call("POST", "/v1/documents/note:import", {"documents": [{"id": "n1", "text": "mine"}]})
    assert answer.status == 202, answer.body
    (message,) = docs.drain()
    assert message["owner_id"] == "tenant-a"
    assert docs.get("note", "n1").status == 200
    assert docs.get("note", "n1", tenant="tenant-b").status == 404


def test_search_returns_the_matching_document_first_with_text_from_postgres(docs, content_db, monkeypatch):
    from embedsvc.adapters.content_store import ContentStore

    docs.put(
        "verse", "gen_1_1", "In the beginning God created the heaven and the earth.", {"book": "Genesis"}
    )
    docs.put("verse", "jn_1_1", "In the beginning was the Word.", {"book": "John"})
    docs.put("verse", "jn_11_35", "Jesus wept.", {"book": "John"})
    with content_db.connection() as conn:  # Postgres changes; Qdrant does not know (it holds no text)
        conn.run("UPDATE content SET text = 'Jesus wept (edited).' WHERE id = 'jn_11_35'")
    queries = []
    texts = ContentStore.texts
    monkeypatch.setattr(ContentStore, "texts", lambda self, *a: queries.append(a) or texts(self, *a))

    answer = docs.search("Jesus wept.", top_k=2, include=["text", "metadata"])
    assert answer.status == 200, answer.body
    body = answer.body
    assert body["object"] == "list" and body["content_type"] == "verse"
    assert body["model"] == "small-test-model" and body["collection"] == VERSE
    first, second = body["data"]
    assert first == {
        "id": "jn_11_35",
        "score": pytest.approx(1.0),
        "text": "Jesus wept (edited).",
        "metadata": {"book": "John"},
    }
    assert second["score"] < first["score"]
    assert len(queries) == 1  # every hit's text in one query

    plain = docs.hits("Jesus wept.", top_k=3)
    assert [set(h) for h in plain] == [{"id", "score"}] * 3  # nothing asked for, nothing returned
    assert len(queries) == 2  # still one query: the content store says which hits are live


def test_search_leaves_out_a_hit_whose_row_was_deleted_meanwhile(docs, content_db):
    docs.put("verse", "a", "alpha text")
    docs.put("verse", "b", "beta text")
    with content_db.connection() as conn:  # as if the delete's tombstone write had failed
        conn.run("UPDATE content SET deleted_at = clock_timestamp() WHERE id = 'a'")
    # The point is still live in Qdrant, but the content store is the truth, with or without `include`.
    assert [h["id"] for h in docs.hits("alpha text")] == ["b"]
    assert [h["id"] for h in docs.hits("alpha text", include=["text"])] == ["b"]


def test_search_filters_on_metadata(docs):
    docs.put("verse", "gen_1_1", "In the beginning God created", {"book": "Genesis", "chapter": 1})
    docs.put("verse", "jn_1_1", "In the beginning was the Word", {"book": "John", "chapter": 1})
    docs.put("verse", "jn_3_16", "For God so loved the world", {"book": "John", "chapter": 3})
    docs.put("verse", "ps_23_1", "The Lord is my shepherd", {"book": "Psalms", "chapter": 23})

    def ids(filters):
        return sorted(h["id"] for h in docs.hits("In the beginning God created", filters=filters))

    assert ids({"book": "John"}) == ["jn_1_1", "jn_3_16"]
    assert ids({"book": ["Genesis", "Psalms"]}) == ["gen_1_1", "ps_23_1"]
    assert ids({"book": "John", "chapter": 3}) == ["jn_3_16"]
    assert ids({"book": "Nahum"}) == []
    assert len(ids(None)) == 4


def test_a_content_type_with_nothing_indexed_has_no_hits_and_costs_no_query(docs, sim):
    answer = docs.search("anything", "note")
    assert answer.status == 200, answer.body
    assert answer.body["data"] == [] and answer.body["collection"] == NOTE
    assert sim.calls == 0


def test_percent_encoded_ids_are_decoded(docs):
    put = docs.put("verse", "John%203%3A16", "For God so loved the world.")
    assert put.status == 200 and put.body["id"] == "John 3:16"
    assert docs.get("verse", "John%203:16").body["id"] == "John 3:16"
    assert docs.hits("For God so loved the world.")[0]["id"] == "John 3:16"


def test_costs_are_attributed_to_indexing_and_to_the_query(docs, emf):
    docs.put("note", "n1", "my note")
    docs.put("verse", "v1", "a verse")
    docs.search("a verse")
    assert [(b["source"], b["tenant_id"]) for b in emf] == [
        ("note_index", "tenant-a"),
        ("verse_index", "tenant-a"),
        ("user_query", "tenant-a"),
    ]


# Tenant isolation: a private note is visible to its tenant only, on every route.


def test_another_tenant_cannot_read_delete_or_see_the_status_of_a_note(docs):
    docs.put("note", "n1", "tenant A's private prayer", {"mood": "hopeful"})
    for answer in (docs.get("note", "n1", tenant="tenant-b"), docs.delete("note", "n1", tenant="tenant-b")):
        assert answer.status == 404 and answer.body["error"]["code"] == "document_not_found"
        assert "private prayer" not in json.dumps(answer.body) and "tenant-a" not in json.dumps(answer.body)
    got = docs.get("note", "n1")
    assert got.status == 200 and got.body["text"] == "tenant A's private prayer"
    assert got.body["indexing"] == {NOTE: "indexed"}


def test_another_tenants_put_of_the_same_id_is_its_own_note(docs):
    a = docs.put("note", "n1", "tenant A's words")
    b = docs.put("note", "n1", "tenant B's words", tenant="tenant-b")
    assert a.status == b.status == 200
    assert docs.get("note", "n1").body["text"] == "tenant A's words"
    assert docs.get("note", "n1", tenant="tenant-b").body["text"] == "tenant B's words"
    assert docs.row("note", "n1", "tenant-a").version == a.body["version"]  # A's row untouched
    docs.delete("note", "n1", tenant="tenant-b")
    assert docs.get("note", "n1").status == 200
    assert [h["text"] for h in docs.hits("tenant A's words", "note", include=["text"])][:1] == [
        "tenant A's words"
    ]


def test_search_never_returns_another_tenants_notes(docs):
    docs.put("note", "a1", "grief after my father died")
    docs.put("note", "a2", "thankful for the harvest")
    docs.put("note", "b1", "a note of tenant B", tenant="tenant-b")
    for query in ("grief after my father died", "thankful for the harvest", "a note of tenant B"):
        b_hits = docs.hits(query, "note", tenant="tenant-b", include=["text"])
        assert [(h["id"], h["text"]) for h in b_hits] == [("b1", "a note of tenant B")]
    assert sorted(h["id"] for h in docs.hits("grief after my father died", "note")) == ["a1", "a2"]


def test_public_verses_are_shared_by_every_tenant(docs):
    docs.put("verse", "ps_23_1", "The Lord is my shepherd.")
    got = docs.get("verse", "ps_23_1", tenant="tenant-b")
    assert got.status == 200 and got.body["text"] == "The Lord is my shepherd."
    assert docs.hits("The Lord is my shepherd.", tenant="tenant-b")[0]["id"] == "ps_23_1"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/documents/note/n1", {"text": "x"}),
        ("GET", "/v1/documents/note/n1", None),
        ("DELETE", "/v1/documents/note/n1", None),
        ("POST", "/v1/documents/note:import", {"documents": [{"id": "n1", "text": "x"}]}),
        ("POST", "/v1/search", {"query": "x", "content_type": "note"}),
    ],
)
def test_a_key_without_a_tenant_gets_no_private_content(docs, sim, method, path, body):
    docs.put("note", "n1", "tenant A's note")
    calls = sim.calls
    answer = docs.call(method, path, body, tenant=None)
    assert answer.status == 400, answer.body
    assert "private" in answer.body["error"]["message"]
    assert sim.calls == calls  # and certainly no search over every tenant's notes


# Bad requests: 4xx in OpenAI's shape, before any provider call.


def assert_refused(sim, answer: Answer, calls: int, status: int, param: str, fragment: str) -> None:
    assert answer.status == status, answer.body
    error = answer.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert fragment in error["message"], error
    assert sim.calls == calls


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "fragment"),
    [
        ("verse/x", {"text": ""}, 400, "text", "empty"),
        ("verse/x", {"text": "  \n"}, 400, "text", "empty"),
        ("verse/x", {}, 400, "text", "text"),
        ("verse/x", {"text": 5}, 400, "text", "string"),
        ("verse/x", {"text": "a\x00b"}, 400, "text", "NUL"),
        ("verse/x", {"text": "\ud800 half an emoji"}, 400, "text", "not valid Unicode"),
        ("verse/x", {"text": "x" * 100_001}, 400, "text", "at most 100000"),
        ("verse/x", {"text": "ok", "metadata": {"k": "a\x00"}}, 400, "metadata", "NUL"),
        ("verse/x", {"text": "ok", "metadata": {"k": "v" * 9000}}, 400, "metadata", "8192"),
        ("verse/x", {"text": "ok", "metadata": [1]}, 400, "metadata", "dictionary"),
        ("verse/x", {"text": "ok", "metadata": {"x": [NAN]}}, 400, "metadata", "NaN"),
        ("verse/x", {"text": "ok", "metadata": {"x": INF}}, 400, "metadata", "NaN"),
        ("verse/x", {"text": "ok", "metdata": {}}, 400, "metdata", "Extra"),
        ("verse/" + "i" * 513, {"text": "ok"}, 400, "document_id", "at most 512"),
        ("verse/%FF", {"text": "ok"}, 400, "document_id", "UTF-8"),
        ("verse/a%00b", {"text": "ok"}, 400, "document_id", "NUL"),
        ("Verse/x", {"text": "ok"}, 400, "content_type", "pattern"),
        ("widget/x", {"text": "ok"}, 404, "content_type", "unknown content type"),
    ],
)
def test_bad_puts_are_refused(docs, sim, path, body, status, param, fragment):
    answer = docs.call("PUT", f"/v1/documents/{path}", body)
    assert_refused(sim, answer, 0, status, param, fragment)
    assert docs.container.content_store().count("verse", include_deleted=True) == 0


@pytest.mark.parametrize(
    ("method", "path", "param", "fragment"),
    [
        ("GET", "widget/x", "content_type", "unknown content type"),
        ("DELETE", "widget/x", "content_type", "unknown content type"),
        ("GET", "verse/absent", "id", "no verse"),
        ("DELETE", "verse/absent", "id", "no verse"),
        ("GET", "note/absent", "id", "no note"),
    ],
)
def test_reads_and_deletes_of_nothing_are_404(docs, sim, method, path, param, fragment):
    assert_refused(sim, docs.call(method, f"/v1/documents/{path}"), 0, 404, param, fragment)


@pytest.mark.parametrize(
    ("content_type", "documents", "status", "param", "fragment"),
    [
        ("widget", [{"id": "a", "text": "t"}], 404, "content_type", "widget"),
        ("verse", [], 400, "documents", "empty"),
        ("verse", [{"id": "a", "text": "t"}] * 2, 400, "documents", "repeat"),
        ("verse", [{"id": "", "text": "t"}], 400, "documents", "at least 1"),
        ("verse", [{"id": "a", "text": "t", "meta": {}}], 400, "documents", "Extra"),
        ("verse", [{"id": "a", "text": "t"}, {"id": "b", "text": " "}], 400, "text", "empty"),
    ],
)
def test_bad_imports_are_refused_and_commit_nothing(
    docs, sim, content_type, documents, status, param, fragment
):
    answer = docs.call("POST", f"/v1/documents/{content_type}:import", {"documents": documents})
    assert_refused(sim, answer, 0, status, param, fragment)
    assert docs.container.content_store().count("verse", include_deleted=True) == 0
    assert docs.drain() == []


@pytest.mark.parametrize(
    ("fields", "status", "param", "fragment"),
    [
        ({"content_type": "widget"}, 404, "content_type", "widget"),
        ({"content_type": "Verse"}, 400, "content_type", "pattern"),
        ({"query": ""}, 400, "query", "at least 1"),
        ({"query": " \t"}, 400, "query", "blank"),
        ({"query": "x" * 8193}, 400, "query", "8192"),
        ({"query": None}, 400, "query", "string"),
        ({"top_k": 0}, 400, "top_k", "greater than"),
        ({"top_k": 101}, 400, "top_k", "less than"),
        ({"top_k": "5"}, 400, "top_k", "integer"),
        ({"include": ["vector"]}, 400, "include", "'text' or 'metadata'"),
        ({"filters": {"a-b": 1}}, 400, "filters", "pattern"),
        ({"filters": {"a": []}}, 400, "filters", "one or more"),
        ({"filters": {"a": {"b": 1}}}, 400, "filters", "filter 'a' must be"),
        ({"filters": {"a": NAN}}, 400, "filters", "finite"),
        ({"filters": {f"k{i}": 1 for i in range(17)}}, 400, "filters", "16"),
        ({"model": "te3s"}, 400, "model", "Extra"),
    ],
)
def test_bad_searches_are_refused(docs, sim, fields, status, param, fragment):
    docs.put("verse", "v1", "a verse")  # a collection to search: no check may hide behind "nothing indexed"
    calls = sim.calls
    answer = docs.call("POST", "/v1/search", {"query": "x", "content_type": "verse", **fields})
    assert_refused(sim, answer, calls, status, param, fragment)


def test_an_import_of_too_many_documents_is_a_400_and_commits_nothing(docs):
    from embedsvc.services.documents import MAX_IMPORT_DOCUMENTS

    documents = [{"id": f"v{i}", "text": "t"} for i in range(MAX_IMPORT_DOCUMENTS + 1)]
    answer = docs.call("POST", "/v1/documents/verse:import", {"documents": documents})
    assert answer.status == 400 and answer.body["error"]["param"] == "documents"
    assert str(MAX_IMPORT_DOCUMENTS) in answer.body["error"]["message"]
    assert docs.container.content_store().count("verse", include_deleted=True) == 0
    assert docs.drain() == []


def test_an_unknown_method_on_a_document_is_a_404_in_openai_shape(docs):
    answer = docs.call("POST", "/v1/documents/verse/x", {"text": "t"})
    assert answer.status == 404 and "Unknown route" in answer.body["error"]["message"]


# A property-based fuzz of the content routes from openapi.json, as tests/integration/test_api_fuzz.py does
# for the embeddings route: valid and schema-breaking requests, for known and unknown content types, as
# tenant A, tenant B and a key without a tenant.

OPENAPI = json.loads((Path(__file__).resolve().parents[2] / "openapi.json").read_text())
SCHEMA = schemathesis.openapi.from_dict(OPENAPI)
DOCUMENT = "/v1/documents/{content_type}/{document_id}"
CONTENT_OPERATIONS = [
    *(SCHEMA[DOCUMENT][method] for method in ("PUT", "GET", "DELETE")),
    SCHEMA["/v1/documents/{content_type}:import"]["POST"],
    SCHEMA["/v1/search"]["POST"],
]
CONTENT_CASES = st.one_of(
    *(
        operation.as_strategy(generation_mode=mode)
        for operation in CONTENT_OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    )
)
CONTENT_REQUESTS = st.tuples(
    CONTENT_CASES,
    st.sampled_from(["verse", "note"]) | st.none(),  # a generated content type is almost always unknown
    st.just("d1") | st.none(),  # an id that earlier examples write, so that GET and DELETE find something
    st.sampled_from(["tenant-a", "tenant-b", None]),
)
ANSWER_MODELS = {
    ("PUT", DOCUMENT): DocumentWriteResult,
    ("GET", DOCUMENT): Document,
    ("DELETE", DOCUMENT): DocumentWriteResult,
    ("POST", "/v1/documents/{content_type}:import"): ImportResult,
    ("POST", "/v1/search"): SearchResponse,
}


@settings(
    max_examples=300,
    derandomize=True,  # the same examples every run: a fuzz in `make test` must not flake
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(request=CONTENT_REQUESTS)
def test_the_content_routes_answer_every_generated_request_in_documented_shapes(docs, sim, request):
    case, content_type, doc_id, tenant = request
    if case.path_parameters and "content_type" in case.path_parameters:
        overrides = {"content_type": content_type, "document_id": doc_id}
        case.path_parameters = {
            **case.path_parameters,
            **{k: v for k, v in overrides.items() if v is not None and k in case.path_parameters},
        }
    elif content_type is not None and isinstance(case.body, dict):
        case.body = {**case.body, "content_type": content_type}
    if isinstance(case.body, NotSet):
        text = None
    elif isinstance(case.body, bytes):
        text = case.body.decode("utf-8", errors="replace")
    else:
        text = json.dumps(case.body)
    headers = {"Content-Type": case.media_type} if case.media_type else {}
    calls = sim.calls
    answer = docs.call(case.method, case.formatted_path, text, tenant=tenant, headers=headers, raw=True)
    event(f"{case.method} {case.path} {answer.status}")
    operation = OPENAPI["paths"][case.path][case.method.lower()]
    assert answer.status < 500, answer.body
    assert str(answer.status) in operation["responses"], (answer.status, answer.body)
    if answer.status >= 400:
        assert set(answer.body) == {"error"} and set(answer.body["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        assert answer.body["error"]["message"]
        assert sim.calls == calls, "a rejected request reached the provider"
    else:
        ANSWER_MODELS[(case.method, case.path)].model_validate(answer.body)


def test_shared_content_is_written_only_by_its_writers(docs, monkeypatch):
    from embedsvc.container import reset_settings

    monkeypatch.setenv(
        "CONTENT_TYPES",
        json.dumps({"verse": {"private": False, "writers": ["admin"]}, "note": {"private": True}}),
    )
    from embedsvc.observability import CostRecorder

    reset_settings()
    docs.container.put("costs", CostRecorder(sink=lambda blob: None))
    assert docs.put("verse", "v1", "In the beginning", tenant="admin").status == 200
    provider_calls = len(docs.sim.records)
    for answer in (
        docs.put("verse", "v1", "vandalised", tenant="tenant-a"),
        docs.delete("verse", "v1", tenant="tenant-a"),
        docs.call("POST", "/v1/documents/verse:import", {"documents": [{"id": "v2", "text": "x"}]}),
    ):
        assert answer.status == 403 and answer.body["error"]["code"] == "permission_denied", answer.body
    assert docs.get("verse", "v1", tenant="tenant-a").body["text"] == "In the beginning"  # readable by all
    assert len(docs.sim.records) == provider_calls  # a refused write embeds nothing
    assert (
        docs.put("note", "n1", "my own note", tenant="tenant-a").status == 200
    )  # private: always its owner's


def test_every_mutation_reaches_the_active_and_the_shadow_collection(docs, monkeypatch):
    """During a migration a content type writes two collections: saves and deletes reach both."""
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder

    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"verse": ["small", "te3s"], "note": ["small"]}))
    reset_settings()
    docs.container.put("costs", CostRecorder(sink=lambda blob: None))
    saved = docs.put("verse", "v1", "In the beginning")
    assert saved.status == 200 and saved.body["collections"] == ["verse_small", "verse_te3s"]
    assert saved.body["indexing"] == "indexed"
    status = docs.get("verse", "v1").body["indexing"]
    assert status == {"verse_small": "indexed", "verse_te3s": "indexed"}
    assert docs.delete("verse", "v1").status == 200
    vectors = docs.container.vector_store()
    pid = docs.row("verse", "v1").point_id
    for collection in ("verse_small", "verse_te3s"):
        assert vectors.payloads(collection, [pid])[pid]["deleted"] is True


def test_concurrent_saves_of_one_document_leave_the_newest_vector(docs):
    """Eight threads save one verse: whatever order their vector writes land in, the newest version wins."""
    import threading

    answers: list[Answer] = []
    lock = threading.Lock()

    def save(n: int) -> None:
        for k in range(3):
            answer = docs.put("verse", "hot", f"version {n}-{k} of the verse")
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(a.status == 200 for a in answers)
    assert sorted(a.body["version"] for a in answers) == list(range(1, 25))
    row = docs.row("verse", "hot")
    payload = docs.container.vector_store().payloads("verse_small", [row.point_id])[row.point_id]
    assert (
        (payload["version"], payload["content_hash"])
        == (row.version, row.content_hash)
        == (24, row.content_hash)
    )


def test_searches_read_the_content_types_alias(docs):
    """The first save creates the alias `verse` -> the active collection; a search names the collection it read."""
    docs.put("verse", "v1", "In the beginning")
    vectors = docs.container.vector_store()
    assert vectors.alias_target("verse") == "verse_small"
    vectors.ensure_alias("verse", "verse_other")  # never moves an alias that exists
    assert vectors.alias_target("verse") == "verse_small"
    assert docs.search("In the beginning").body["collection"] == "verse_small"
