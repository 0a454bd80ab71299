"""The demo's content-store steps: write-through documents, private notes, and a gap opened and closed.

Everything goes through the HTTP API as a client would (httpx with an API key), except the damage in
`break_and_heal`, which is done behind the service's back on purpose: points dropped and invented in
Qdrant, a verse corrected directly in Postgres, saves made while Qdrant (and once the queue too) fail.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import httpx

from embedsvc.local.stack import LocalStack

if TYPE_CHECKING:
    from embedsvc.adapters.index_queue import IndexQueue
    from embedsvc.adapters.qdrant import VectorStore

IMPORT_CHUNK = 1000
NOTES = (
    ("n1", "Prayer list for the week: healing for Anna, a job for Ben", {"topic": "prayer"}),
    ("n2", "Psalm 23 comforted me in the hospital waiting room", {"topic": "comfort"}),
    ("n3", "Questions for Sunday: what does Romans 8 mean by 'groaning'?", {"topic": "study"}),
)


def api_client(stack: LocalStack, api_key: str | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {api_key or stack.api_key}"}, timeout=120
    )


def _ok(answer: httpx.Response) -> dict[str, Any]:
    if answer.status_code >= 400:
        raise RuntimeError(
            f"{answer.request.method} {answer.request.url.path}: {answer.status_code} {answer.text}"
        )
    return answer.json()


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def verse_document(verse: dict) -> dict:
    return {
        "id": verse["id"],
        "text": verse["text"],
        "metadata": {
            "book": verse["book"],
            "chapter": verse["chapter"],
            "verse": verse["verse"],
            "translation": "BSB",
        },
    }


def import_verses(stack: LocalStack, verses: list[dict], bar: Any) -> dict[str, int]:
    """Commit the verses through `POST /v1/documents/verse:import`, then let the worker index them."""
    totals = {"committed": 0, "queued": 0}
    poller = stack.make_poller()
    with api_client(stack) as api:
        # Imports of one worker batch each: moto's SQS receive costs grow with the queue's depth (each
        # receive recomputes every message's attributes; real SQS's do not), so the local queue stays short.
        for chunk in _chunks(verses, min(IMPORT_CHUNK, poller.batch_size)):
            answer = _ok(
                api.post("/documents/verse:import", json={"documents": [verse_document(v) for v in chunk]})
            )
            totals["committed"] += answer["committed"]
            totals["queued"] += answer["queued"]
            # Drain as we go (moto's SQS receive slows with queue depth; real SQS's does not), and stop at
            # the chunk's size instead of polling an empty queue for a whole batching window.
            delivered = 0
            while delivered < answer["queued"] and (count := poller.poll_once()) > 0:
                delivered += count
                bar.update(min(count, bar.total - bar.n))
    poller.drain(idle_polls=1)
    totals["worker_batches"] = poller.batches
    return totals


def private_notes(stack: LocalStack) -> dict[str, int]:
    """The local user writes notes; another tenant's key finds none of them, the owner finds them."""
    from embedsvc import container

    other_key = container.api_keys().create(tenant_id="other-tenant", user_id="mallory", name="demo-other")
    with api_client(stack) as mine, api_client(stack, other_key) as theirs:
        for note_id, text, metadata in NOTES:
            answer = _ok(mine.put(f"/documents/note/{note_id}", json={"text": text, "metadata": metadata}))
            print(f"   PUT note/{note_id}: version {answer['version']}, indexing {answer['indexing']}")
        query = {"query": "hospital psalm comfort", "content_type": "note", "top_k": 5, "include": ["text"]}
        own = _ok(mine.post("/search", json=query))["data"]
        foreign = _ok(theirs.post("/search", json=query))["data"]
        peek = theirs.get("/documents/note/n2")
        overwrite = _ok(theirs.put("/documents/note/n2", json={"text": "mallory's own n2", "metadata": {}}))
        still_mine = _ok(mine.get("/documents/note/n2"))["text"]
    print(
        f'   owner searches "{query["query"]}": {len(own)} hits, best {own[0]["id"]!r}: {own[0]["text"][:60]}'
    )
    print(f"   another tenant's search: {len(foreign)} hits; its GET note/n2: {peek.status_code}")
    print(
        f"   its PUT note/n2 made its own document (version {overwrite['version']}); "
        f"the owner's n2 still reads {still_mine[:40]!r}"
    )
    return {"own_hits": len(own), "foreign_hits": len(foreign), "foreign_get_status": peek.status_code}


class _FailingVectors:
    """The vector store with writes failing: Qdrant down during a save."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        from embedsvc.errors import VectorStoreUnavailable

        if name in ("upsert", "upsert_if_newer", "ensure_collection", "overwrite_payloads_if_newer"):

            def fail(*args: Any, **kwargs: Any) -> None:
                raise VectorStoreUnavailable("qdrant upsert failed: demo outage")

            return fail
        return getattr(self._inner, name)


class _FailingQueue:
    def send(self, messages: Any) -> list[int]:
        return list(range(len(messages)))


def _print_audit(report: dict[str, Any], title: str) -> None:
    print(f"   {title}")
    print(
        f"     {'collection':<16}{'content':>9}{'points':>9}{'missing':>9}{'orphaned':>9}{'stale':>7}{'oldest gap':>12}"
    )
    for name, c in report["collections"].items():
        print(
            f"     {name:<16}{c['content']:>9,}{c['points']:>9,}{c['missing']:>9}{c['orphaned']:>9}"
            f"{c['stale']:>7}{c['oldest_gap_seconds']:>11.1f}s"
        )
    print(f"     queued {report['queued']}, deleted {report['deleted']}")


def break_and_heal(stack: LocalStack, verses: list[dict], rng: random.Random) -> dict[str, Any]:
    """Open every kind of gap on purpose, then let the audit, the repair and the worker close them."""
    from embedsvc import container
    from embedsvc.adapters.content_store import content_point_id
    from embedsvc.adapters.qdrant import Point
    from embedsvc.services.documents import DocumentService

    settings = container.settings()
    collection = f"verse_{container.model_config().get('verse').active}"
    vectors, db = container.vector_store(), container.database()
    sample = rng.sample(verses, min(len(verses), 30))
    dropped, corrected, saved_down, saved_dark = sample[:20], sample[20:25], sample[25:28], sample[28:30]
    # Fewer orphans than the audit's safety valve allows (5% of the points), or it would rightly delete none.
    orphans = max(1, min(10, len(verses) // 40))
    vectors.delete(collection, [content_point_id("verse", v["id"], None) for v in dropped])
    dimensions = settings.registry.models[container.model_config().get("verse").active].dimensions
    invented = [
        Point(
            str(uuid.UUID(int=rng.getrandbits(128), version=5)),
            [rng.random() for _ in range(dimensions)],
            {
                "id": f"ghost-{i}",
                "content_type": "verse",
                "content_hash": "0" * 64,
                "version": 1,
                "deleted": False,
            },
        )
        for i in range(orphans)
    ]
    vectors.upsert(collection, invented)
    with db.connection() as conn:  # a translation fix made straight in the database, bypassing the API
        conn.run(
            "UPDATE content SET text = text || ' [corrected]', content_hash = encode(sha256(convert_to("
            "text || ' [corrected]', 'UTF8')), 'hex') WHERE content_type = 'verse' AND id = ANY(:ids)",
            ids=[v["id"] for v in corrected],
        )
    service = container.document_service()
    # Duck-typed stand-ins for an outage: they fail the writes and pass every read through.
    failing_vectors = cast("VectorStore", _FailingVectors(vectors))
    down = DocumentService(settings, service.store, service.embeddings, failing_vectors, service.queue)
    dark = DocumentService(
        settings, service.store, service.embeddings, failing_vectors, cast("IndexQueue", _FailingQueue())
    )
    outcomes = []
    logging.disable(logging.ERROR)  # the outage's warnings and errors are the point here, not news
    try:
        for service_down, group in ((down, saved_down), (dark, saved_dark)):
            for verse in group:
                saved = service_down.put(
                    "verse",
                    verse["id"],
                    text=verse["text"] + " (edited)",
                    metadata={},
                    context=_demo_context(),
                )
                outcomes.append(saved.indexing)
    finally:
        logging.disable(logging.NOTSET)
    print(
        f"   dropped {len(dropped)} vectors, invented {len(invented)} orphan points, corrected {len(corrected)} "
        f"verses in Postgres, saved {len(saved_down) + len(saved_dark)} with Qdrant down: {', '.join(outcomes)}"
    )
    # The queued saves are left on the queue for now, as if the worker were slow: the audit sees them too.
    audit_job = container.audit_job()
    before = audit_job.run(content_type="verse").as_dict()
    _print_audit(before, "weekly audit (it queues the missing and stale, deletes the orphans):")
    repair = container.repair_job().run().as_dict()
    print(f"   hourly repair: {_repair_summary(repair)}")
    poller = stack.make_poller()
    poller.drain(idle_polls=1)
    print(f"   worker: {poller.batches} batches from the queue")
    after = audit_job.run(content_type="verse").as_dict()
    _print_audit(after, "audit again:")
    gaps = sum(c["missing"] + c["orphaned"] + c["stale"] for c in after["collections"].values())
    print(f"   gap closed: {gaps == 0}")
    return {"before": before, "after": after, "gaps_after": gaps}


def _repair_summary(report: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in report.items() if isinstance(v, int)) or str(report)


def _demo_context():
    from embedsvc.observability import CallContext

    return CallContext(source="verse_index", user_id="local-user", tenant_id="local", task_id="demo-edits")
