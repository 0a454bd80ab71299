"""Repair and audit against the real Postgres, Qdrant local mode and moto SQS/S3.

Given seeded inconsistencies (missing, stale, orphaned points, tombstones, deleted rows), the jobs must
count each exactly, ask for exactly the right index requests, delete only what has no row, and leave
their bookkeeping (repair checkpoints, first-seen times of gaps) right when a dependency fails.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from embedsvc.adapters.content_store import ContentRow, ContentStore, content_point_id
from embedsvc.adapters.index_queue import IndexQueue
from embedsvc.adapters.qdrant import Point, VectorStore
from embedsvc.errors import VectorStoreUnavailable
from embedsvc.services.audit import AuditJob, S3AuditReports
from embedsvc.services.index_points import live_payload, tombstone_payload
from embedsvc.services.repair import RepairJob
from tests.conftest import sim_registry

VERSE = "verse_small"
NOTE = "note_small"
DIMS = 8


class Env:
    """The pieces a test needs: settings, the store, Qdrant in memory, IndexQueue on moto, captured EMF."""

    def __init__(self, container, queue_url: str):
        from embedsvc.adapters.aws import client

        self.container = container
        self.settings = container.settings()
        self.store: ContentStore = container.content_store()
        self.vectors = VectorStore.connect()
        self.sqs = client("sqs")
        self.queue_url = queue_url
        self.queue = IndexQueue(queue_url, self.sqs)
        self.emf: list[dict] = []
        self.metrics = _Metrics(self.emf)
        for name in (VERSE, NOTE):
            self.vectors.ensure_collection(name, DIMS)

    def put(
        self, content_id: str, text: str | None = None, *, content_type: str = "verse", owner=None
    ) -> ContentRow:
        return self.store.put(
            content_type, content_id, text=text or f"text of {content_id}", metadata={}, owner_id=owner
        )

    def index(self, row: ContentRow, collection: str = VERSE, **overrides) -> None:
        payload = {**live_payload(row, "small", 0), **overrides}
        self.vectors.upsert(collection, [Point(row.point_id, [1.0] * DIMS, payload)])

    def tombstone(self, row: ContentRow, collection: str = VERSE) -> None:
        self.vectors.upsert(
            collection, [Point(row.point_id, [1.0] + [0.0] * (DIMS - 1), tombstone_payload(row, "small", 0))]
        )

    def stray(self, content_id: str, *, tombstone: bool = False, collection: str = VERSE) -> str:
        """A point whose content has no row at all."""
        pid = content_point_id("verse", content_id, None)
        payload = {
            "id": content_id,
            "content_hash": None if tombstone else "x",
            "version": 3,
            "deleted": tombstone,
        }
        self.vectors.upsert(collection, [Point(pid, [1.0] * DIMS, payload)])
        return pid

    def drain(self) -> list[dict]:
        """Every message on IndexQueue (received and deleted)."""
        bodies = []
        while True:
            got = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get(
                "Messages", []
            )
            if not got:
                return bodies
            for m in got:
                bodies.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=m["ReceiptHandle"])

    def repair(self, **kwargs) -> RepairJob:
        kwargs.setdefault("metrics", self.metrics)
        return RepairJob(
            kwargs.pop("store", self.store),
            kwargs.pop("vectors", self.vectors),
            kwargs.pop("queue", self.queue),
            self.settings,
            **kwargs,
        )

    def audit(self, **kwargs) -> AuditJob:
        return AuditJob(
            kwargs.pop("store", self.store),
            kwargs.pop("vectors", self.vectors),
            kwargs.pop("queue", self.queue),
            kwargs.pop("reports", None),
            self.settings,
            self.metrics,
            **kwargs,
        )

    def metric(self, name: str, **dimensions) -> list[float]:
        return [
            blob[name]
            for blob in self.emf
            if name in blob
            and {d for ds in blob["_aws"]["CloudWatchMetrics"] for d in ds["Dimensions"][0]}
            == set(dimensions)
            and all(blob.get(k) == v for k, v in dimensions.items())
        ]


class _Metrics:
    namespace = "EmbeddingServiceTest"

    def __init__(self, blobs: list[dict]):
        self.sink = blobs.append


@pytest.fixture
def e(aws, sim, content_db, monkeypatch) -> Env:
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.container import reset_settings

    queue_url = client("sqs").create_queue(QueueName="test-index")["QueueUrl"]
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(sim_registry(sim)))
    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"verse": ["small"], "note": ["small"]}))
    monkeypatch.setenv("COST_SOURCES", "user_query,note_index,verse_index,reindex,backfill,repair")
    monkeypatch.setenv("INDEX_QUEUE_URL", queue_url)
    reset_settings()
    return Env(container, queue_url)


def seed_inconsistencies(e: Env) -> dict[str, list[str]]:
    """Verses in every state the audit distinguishes; returns content ids by expected outcome."""
    for i in range(5):  # consistent
        e.index(e.put(f"ok{i}"))
    for i in range(3):  # missing: a live row, no point
        e.put(f"missing{i}")
    back = e.put("back")  # missing: deleted (tombstoned), then written again
    e.tombstone(e.store.delete("verse", "back", owner_id=None))
    back = e.put("back", "text again")
    assert back.version == 3
    e.index(e.put("edited", "old words"))  # stale: other text
    e.put("edited", "new words")
    e.index(e.put("touched"))  # stale: the same text written again, a newer version
    e.put("touched")
    for i in range(2):  # orphaned: a deleted row whose point is still live
        e.index(e.put(f"gone{i}"))
        e.store.delete("verse", f"gone{i}", owner_id=None)
    e.stray("stray0")  # orphaned: no row at all
    e.stray("stray1")
    e.stray("garbage", tombstone=True)  # a tombstone with no row
    e.tombstone(e.store.delete("verse", e.put("buried").id, owner_id=None))  # deleted + tombstone: fine
    e.put("vanished")  # deleted + no point: fine
    e.store.delete("verse", "vanished", owner_id=None)
    return {
        "index": ["missing0", "missing1", "missing2", "back", "edited", "touched"],
        "tombstone": ["gone0", "gone1"],
    }


EXPECTED = {"content": 11, "points": 11, "missing": 4, "stale": 2, "orphaned": 4, "tombstones": 1}


def counts_of(report, name: str = VERSE) -> dict:
    found = report.as_dict()["collections"][name]
    return {k: found[k] for k in EXPECTED}


def test_the_audit_counts_each_kind_exactly_and_a_dry_run_changes_nothing(e):
    seed_inconsistencies(e)
    before = e.vectors.count(VERSE, include_tombstones=True)
    report = e.audit(orphan_max_share=0.5).run("verse", dry_run=True)
    assert counts_of(report) == EXPECTED
    assert report.as_dict()["collections"][VERSE]["deleted_content"] == 4
    assert (report.queued, report.deleted, report.dry_run) == (0, 0, True)
    assert e.drain() == []
    assert e.vectors.count(VERSE, include_tombstones=True) == before
    assert not report.safety_valve_tripped


def test_the_audit_queues_missing_and_stale_and_removes_orphans(e):
    expected = seed_inconsistencies(e)
    report = e.audit(orphan_max_share=0.5).run("verse")
    assert counts_of(report) == EXPECTED
    audit = report.collections[VERSE]
    assert (audit.queued, audit.tombstone_requests, audit.deleted) == (6, 2, 3)
    assert (report.queued, report.deleted, report.ok) == (6, 5, True)
    messages = e.drain()
    assert sorted(m["id"] for m in messages) == sorted(expected["index"] + expected["tombstone"])
    assert {(m["source"], m["priority"], tuple(m["models"]), m["content_type"]) for m in messages} == {
        ("repair", "bulk", ("small",), "verse")
    }
    assert all("text" not in m for m in messages)  # by id: the worker reads the row
    strays = [content_point_id("verse", i, None) for i in ("stray0", "stray1", "garbage")]
    assert e.vectors.payloads(VERSE, strays) == {}  # points of no row are gone
    gone = [content_point_id("verse", i, None) for i in expected["tombstone"]]
    assert len(e.vectors.payloads(VERSE, gone)) == 2  # left for the worker to tombstone, not deleted


def test_metrics_per_collection_and_their_maximum_without_dimensions(e):
    seed_inconsistencies(e)
    e.put("n1", content_type="note", owner="tenant-a")  # one missing note
    e.audit(orphan_max_share=0.5).run(dry_run=True)
    assert e.metric("ConsistencyMissing", Collection=VERSE) == [4]
    assert e.metric("ConsistencyMissing", Collection=NOTE) == [1]
    assert e.metric("ConsistencyOrphaned", Collection=NOTE) == [0]
    assert e.metric("ConsistencyMissing") == [4]  # the maximum over collections
    assert e.metric("ConsistencyOrphaned") == [4]
    assert e.metric("ConsistencyStale") == [2]
    assert e.metric("AuditSafetyValveTripped") == [0]
    (gap,) = e.metric("ConsistencyOldestGapSeconds")
    assert 0 <= gap < 60
    units = {m["Name"]: m["Unit"] for b in e.emf for m in b["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert units["ConsistencyOldestGapSeconds"] == "Seconds" and units["ConsistencyMissing"] == "Count"


def first_seen(e: Env) -> dict[str, object]:
    with e.store.db.connection() as conn:
        return {str(p): t for p, t in conn.run("SELECT point_id::text, first_seen FROM consistency_gaps")}


def test_a_gap_keeps_its_first_sighting_and_a_resolved_one_is_forgotten(e):
    old = e.put("old")  # missing
    e.put("new")  # missing too
    e.audit().run("verse", dry_run=True)
    first = first_seen(e)
    assert set(first) == {old.point_id, content_point_id("verse", "new", None)}
    with e.store.db.connection() as conn:  # as if the first audit had run an hour ago
        conn.run(
            "UPDATE consistency_gaps SET first_seen = first_seen - interval '1 hour' WHERE point_id = CAST(:p AS uuid)",
            p=old.point_id,
        )
    report = e.audit().run("verse", dry_run=True)
    assert report.collections[VERSE].oldest_gap_seconds >= 3600
    again = first_seen(e)
    assert again[old.point_id] == first[old.point_id] - timedelta(hours=1)  # kept, not refreshed
    assert again[content_point_id("verse", "new", None)] == first[content_point_id("verse", "new", None)]
    e.index(old)  # the old gap is resolved
    report = e.audit().run("verse", dry_run=True)
    assert set(first_seen(e)) == {content_point_id("verse", "new", None)}
    assert 0 <= report.collections[VERSE].oldest_gap_seconds < 3600
    e.index(e.store.get("verse", "new", owner_id=None))
    report = e.audit().run("verse", dry_run=True)
    assert first_seen(e) == {} and report.collections[VERSE].oldest_gap_seconds == 0


def test_the_safety_valve_deletes_nothing_when_the_content_table_is_empty(e):
    for i in range(20):
        e.stray(f"s{i}")
    report = e.audit().run("verse")
    audit = report.collections[VERSE]
    assert (audit.counts.orphaned, audit.counts.points, audit.deleted) == (20, 20, 0)
    assert report.safety_valve_tripped and not report.ok
    assert "deleted nothing" in audit.safety_valve
    assert report.as_dict()["safety_valve"]["reasons"] == [audit.safety_valve]
    assert e.vectors.count(VERSE) == 20
    assert e.metric("AuditSafetyValveTripped", Collection=VERSE) == [1]
    assert e.metric("AuditSafetyValveTripped") == [1]


def test_orphans_within_the_share_are_deleted(e):
    for i in range(40):
        e.index(e.put(f"v{i}"))
    e.stray("s0")
    e.stray("s1")  # 2 of 42 live points: under 5%
    report = e.audit().run("verse")
    assert (report.collections[VERSE].deleted, report.safety_valve_tripped) == (2, False)
    assert e.vectors.count(VERSE) == 40


def test_more_orphans_than_held_in_memory_are_deleted_by_a_second_walk(e):
    e.index(e.put("kept"))
    for i in range(7):
        e.stray(f"s{i}")
    report = e.audit(orphan_max_share=1.0, max_pending_orphans=2, rows_page=3, points_page=3).run("verse")
    audit = report.collections[VERSE]
    assert audit.second_walk and audit.deleted == 7
    assert audit.counts.orphaned == 7 and audit.counts.points == 8  # the first walk's counts stand
    assert e.vectors.count(VERSE) == 1


def test_a_row_written_after_the_walk_saves_its_point(e):
    pid = e.stray("late")  # looks orphaned during the walk...

    class RowArrives:  # ...but its row commits before the audit acts
        def __init__(self, store):
            self.store = store

        def __getattr__(self, name):
            return getattr(self.store, name)

        def rows_by_point(self, content_type, point_ids):
            e.put("late")
            return self.store.rows_by_point(content_type, point_ids)

    report = e.audit(store=RowArrives(e.store), orphan_max_share=1.0).run("verse")
    assert report.collections[VERSE].counts.orphaned == 1 and report.collections[VERSE].deleted == 0
    assert pid in e.vectors.payloads(VERSE, [pid])


def test_the_report_is_stored_in_s3(e):
    from embedsvc.adapters.aws import client

    s3 = client("s3")
    s3.create_bucket(Bucket="audit-reports")
    e.put("m")
    report = e.audit(reports=S3AuditReports("audit-reports", s3)).run("verse", dry_run=True)
    assert report.report_uri and report.report_uri.startswith("s3://audit-reports/audits/")
    key = report.report_uri.removeprefix("s3://audit-reports/")
    stored = json.loads(s3.get_object(Bucket="audit-reports", Key=key)["Body"].read())
    assert stored["collections"][VERSE]["missing"] == 1 and stored["dry_run"] is True
    unstored = e.audit().run("verse", dry_run=True)
    assert unstored.report_uri is None and any("AUDIT_REPORTS_BUCKET" in n for n in unstored.notes)


def test_a_collection_never_written_has_every_live_row_missing(e):
    e.vectors.client.delete_collection(NOTE)
    e.put("n1", content_type="note", owner="tenant-a")
    e.put("n2", content_type="note", owner="tenant-b")
    report = e.audit().run("note")
    assert (report.collections[NOTE].counts.missing, report.queued) == (2, 2)
    assert sorted((m["id"], m["owner_id"]) for m in e.drain()) == [("n1", "tenant-a"), ("n2", "tenant-b")]


# Repair


def test_the_first_repair_checks_everything_and_a_second_queues_nothing_once_fixed(e):
    rows = [e.put(f"v{i}") for i in range(7)]
    e.index(rows[0])
    job = e.repair(page=3)  # several pages
    report = job.run("verse")
    assert report.as_dict()["content_types"]["verse"]["since"] is None  # no checkpoint yet: everything
    assert report.content_types["verse"].collections[VERSE].as_dict() == {
        "checked": 7,
        "queued": 6,
        "deleted": 0,
        "failed": 0,
    }
    assert report.ok and e.store.repair_checkpoint("verse") == report.content_types["verse"].until
    assert sorted(m["id"] for m in e.drain()) == [f"v{i}" for i in range(1, 7)]
    for row in rows[1:]:  # the worker did its job
        e.index(row)
    second = e.repair(page=3).run("verse")
    assert second.content_types["verse"].collections[VERSE].checked == 7  # within the overlap: checked again
    assert second.as_dict()["queued"] == 0 and e.drain() == []
    assert e.store.repair_checkpoint("verse") == second.content_types["verse"].until
    assert e.metric("RepairQueued", ContentType="verse") == [6, 0]
    assert e.metric("RepairQueued") == [6, 0]


def test_repair_finds_stale_points_and_live_points_of_deleted_rows(e):
    e.index(e.put("edited", "old"))
    e.put("edited", "new")
    e.index(e.put("gone"))
    e.store.delete("verse", "gone", owner_id=None)
    e.tombstone(e.store.delete("verse", e.put("buried").id, owner_id=None))
    e.index(e.put("fine"))
    report = e.repair().run("verse")
    assert report.content_types["verse"].collections[VERSE].as_dict() == {
        "checked": 4,
        "queued": 1,
        "deleted": 1,
        "failed": 0,
    }
    assert sorted(m["id"] for m in e.drain()) == ["edited", "gone"]
    assert e.metric("RepairDeleted", ContentType="verse") == [1]


def test_repair_rechecks_the_overlap_before_the_checkpoint(e):
    row = e.put("late-commit")
    e.store.set_repair_checkpoint("verse", row.updated_at + timedelta(minutes=5))
    assert e.repair(overlap=timedelta(0)).run("verse").as_dict()["checked"] == 0
    e.store.set_repair_checkpoint("verse", row.updated_at + timedelta(minutes=5))
    assert e.repair().run("verse").as_dict()["queued"] == 1  # the default 10 minutes reach back to it


def test_repair_sends_private_rows_with_their_owner_and_every_collection_they_lack(e, monkeypatch):
    from embedsvc.container import reset_settings

    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"note": ["small", "te3s"], "verse": ["small"]}))
    reset_settings()
    e.settings = e.container.settings()
    row = e.put("n1", content_type="note", owner="tenant-a")
    e.index(row, NOTE)  # in the active collection, not yet in the shadow one
    e.put("n2", content_type="note", owner="tenant-b")
    report = e.repair().run("note")
    collections = report.content_types["note"].collections
    assert (collections[NOTE].queued, collections["note_te3s"].queued) == (1, 2)
    messages = sorted(e.drain(), key=lambda m: m["id"])
    assert [(m["id"], m["owner_id"], m["models"]) for m in messages] == [
        ("n1", "tenant-a", ["te3s"]),
        ("n2", "tenant-b", ["small", "te3s"]),
    ]


class QdrantDown:
    def exists(self, name):
        return True

    def payloads(self, collection, point_ids):
        raise VectorStoreUnavailable("qdrant retrieve failed: connection refused")


class QueueDown:
    def __init__(self):
        self.calls = 0

    def send(self, messages):
        self.calls += 1
        return list(range(len(messages)))


@pytest.mark.parametrize("broken", ["qdrant", "queue", "deleted queue"])
def test_a_failed_repair_leaves_the_checkpoint(e, broken):
    first = e.repair().run("verse")  # an empty run sets a checkpoint
    checkpoint = e.store.repair_checkpoint("verse")
    assert first.ok and checkpoint is not None
    for i in range(5):
        e.put(f"v{i}")
    queue = QueueDown()
    if broken == "qdrant":
        job = e.repair(vectors=QdrantDown())
    elif broken == "queue":
        job = e.repair(queue=queue, page=2)
    else:
        e.sqs.delete_queue(QueueUrl=e.queue_url)
        job = e.repair()
    report = job.run("verse")
    result = report.content_types["verse"]
    assert not report.ok and not result.checkpoint_advanced and result.error
    assert e.store.repair_checkpoint("verse") == checkpoint
    if broken == "queue":
        assert queue.calls == 1  # it stopped at the first page the queue refused
        assert result.collections[VERSE].failed == 2
    if broken != "qdrant":
        assert e.metric("RepairErrors", ContentType="verse")[-1] == 1
    # Once things work again, the same window is checked and the rows are queued.
    if broken == "deleted queue":
        e.sqs.create_queue(QueueName="test-index")
    retry = e.repair().run("verse")
    assert retry.ok and retry.as_dict()["queued"] == 5


def test_without_repair_in_cost_sources_requests_go_as_reindex(e, monkeypatch):
    from embedsvc.container import reset_settings

    monkeypatch.setenv("COST_SOURCES", "user_query,note_index,verse_index,reindex")  # a deployment's own list
    reset_settings()
    e.settings = e.container.settings()
    e.put("v")
    e.repair().run("verse")
    assert [m["source"] for m in e.drain()] == ["reindex"]


def test_what_the_jobs_queue_the_worker_fixes(e):
    """The real worker takes the requests: afterwards the audit finds every collection consistent."""
    from embedsvc.services.indexing import Incoming

    seed_inconsistencies(e)
    e.container.put("vector_store", e.vectors)
    e.audit(orphan_max_share=0.5).run("verse")
    e.repair().run("verse")
    bodies = [json.dumps(m) for m in e.drain()]
    outcome = e.container.indexer().process([Incoming(f"m{i}", b) for i, b in enumerate(bodies)])
    assert outcome.retry == [] and not outcome.dead_lettered
    report = e.audit().run("verse", dry_run=True)
    assert counts_of(report) | {"points": 0} == {
        "content": 11,
        "points": 0,
        "missing": 0,
        "stale": 0,
        "orphaned": 0,
        "tombstones": 0,
    }
    assert report.collections[VERSE].counts.points == 11


# The CLI


def test_cli_audit_and_repair_print_the_report_as_the_last_json_line(e, capsys):
    import argparse

    from embedsvc.cli.consistency import add_consistency_parsers

    e.container.put("vector_store", e.vectors)
    e.put("m1")
    parser = argparse.ArgumentParser()
    add_consistency_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "--content-type", "verse", "--dry-run", "--format", "json"])
    assert args.func(args) == 0
    audit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert audit["collections"][VERSE]["missing"] == 1 and audit["queued"] == 0 and audit["dry_run"]
    args = parser.parse_args(["repair", "--format", "json"])
    assert args.func(args) == 0
    repair = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert repair["queued"] == 1 and set(repair["content_types"]) == {"verse", "note"}
    args = parser.parse_args(["audit", "--content-type", "verse"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "missing" in table and VERSE in table


def test_a_repair_out_of_time_resumes_where_it_got(e):
    """A backlog bigger than one run: each run checkpoints its last page, the next goes on from there."""
    import time

    for i in range(7):
        e.put(f"v{i}")  # none indexed: all missing
    queued, runs = 0, 0
    while True:
        runs += 1
        report = e.repair(page=3).run("verse", deadline=time.monotonic() - 1)  # out of time after a page
        verse = report.content_types["verse"]
        assert verse.checkpoint_advanced
        queued += report.as_dict()["queued"]
        if verse.complete:
            break
        assert runs < 10, "the repair does not make progress"
    # Pages of 3 from where the last run got, the boundary row checked twice: 0-2, 2-4, 4-6, then 6 alone.
    assert runs == 4 and queued == 10
    assert sorted({m["id"] for m in e.drain()}) == [f"v{i}" for i in range(7)]
    assert e.store.repair_progress("verse")[1] is True  # the last run was complete: the overlap applies again
