"""The content store against the real Postgres: versions, soft deletes, owners, keyset orders, migrations."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest

from embedsvc.adapters.content_store import ContentStore, NewContent, UnknownContentType, content_point_id
from embedsvc.adapters.postgres import ConnectionSettings, Database
from embedsvc.config import ContentTypeSpec
from embedsvc.db.migrations import applied, available, upgrade
from embedsvc.errors import ConfigError, ContentStoreUnavailable, InvalidRequest

TYPES = {"verse": ContentTypeSpec(private=False), "note": ContentTypeSpec(private=True)}


@pytest.fixture
def store(content_db) -> ContentStore:
    return ContentStore(content_db, TYPES)


def test_upgrade_is_recorded_and_idempotent(content_db):
    assert upgrade(content_db) == []  # the session fixture applied everything already
    assert set(applied(content_db)) == {m.version for m in available()}


def test_an_applied_migration_that_changed_is_refused(content_db):
    with content_db.connection() as conn:
        conn.run("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    try:
        with pytest.raises(ConfigError, match="changed after it was applied"):
            upgrade(content_db)
    finally:
        with content_db.connection() as conn:
            conn.run(
                "UPDATE schema_migrations SET checksum = :c WHERE version = 1", c=available()[0].checksum
            )


def test_postgres_versions_every_write_with_its_own_clock(store):
    first = store.put("verse", "John 3:16", text="For God so loved", metadata={"book": "John"}, owner_id=None)
    second = store.put("verse", "John 3:16", text="For God so loved the world", metadata={}, owner_id=None)
    assert (first.version, second.version) == (1, 2)
    assert second.updated_at > first.updated_at
    assert second.point_id == first.point_id == content_point_id("verse", "John 3:16", None)
    deleted = store.delete("verse", "John 3:16", owner_id=None)
    assert deleted is not None and deleted.version == 3 and deleted.deleted
    assert store.get("verse", "John 3:16", owner_id=None) is None
    assert store.get("verse", "John 3:16", owner_id=None, include_deleted=True).version == 3
    assert store.delete("verse", "John 3:16", owner_id=None) is None  # nothing live left to delete
    back = store.put("verse", "John 3:16", text="again", metadata={}, owner_id=None)
    assert back.version == 4 and not back.deleted


def test_private_content_is_scoped_to_its_owner(store):
    alice = store.put("note", "n1", text="alice's note", metadata={}, owner_id="alice")
    bob = store.put("note", "n1", text="bob's note", metadata={}, owner_id="bob")
    assert alice.point_id != bob.point_id  # the same id, two rows, two points
    assert store.get("note", "n1", owner_id="alice").text == "alice's note"
    assert store.delete("note", "n1", owner_id="bob").text == "bob's note"
    assert store.get("note", "n1", owner_id="alice").text == "alice's note"  # untouched
    with pytest.raises(InvalidRequest, match="private"):
        store.get("note", "n1", owner_id=None)


def test_unknown_content_types_are_refused(store):
    with pytest.raises(UnknownContentType):
        store.put("sermon", "s1", text="x", metadata={}, owner_id=None)


def test_a_bulk_write_is_all_or_nothing(store):
    import pg8000.exceptions

    with pytest.raises(pg8000.exceptions.DatabaseError):  # Postgres refuses NUL in text
        store.put_many(
            "verse", [NewContent("a", "text a", {}), NewContent("b", "bad\x00text", {})], owner_id=None
        )
    assert store.count("verse") == 0


def test_point_states_come_in_uuid_order_across_pages(store):
    ids = [f"id-{i}" for i in range(23)]
    store.put_many("verse", [NewContent(i, f"text {i}", {}) for i in ids], owner_id=None)
    states = list(store.iter_point_states("verse", page=5))
    assert [s.point_id for s in states] == sorted(content_point_id("verse", i, None) for i in ids)
    assert [uuid.UUID(s.point_id).int for s in states] == sorted(uuid.UUID(s.point_id).int for s in states)
    assert sorted(s.id for s in states) != [s.id for s in states]  # text order differs from point order


def test_changed_rows_come_in_pages_within_the_window(store):
    start = store.now()
    store.put_many("verse", [NewContent(f"v{i}", "t", {}) for i in range(7)], owner_id=None)
    store.delete("verse", "v3", owner_id=None)
    until = store.now()
    store.put("verse", "late", text="after the window", metadata={}, owner_id=None)
    pages = list(store.iter_changed("verse", start, until, page=3))
    assert [len(p) for p in pages] == [3, 3, 1]
    seen = [s.id for p in pages for s in p]
    assert sorted(seen) == [f"v{i}" for i in range(7)]
    assert next(s for p in pages for s in p if s.id == "v3").deleted
    assert list(store.iter_changed("verse", until + timedelta(hours=1), until + timedelta(hours=2))) == []


def test_gaps_keep_their_first_seen_time_until_resolved(store):
    pid = content_point_id("verse", "x", None)
    store.record_gaps("verse_minilm", {pid: "missing"})
    first = store.oldest_gap("verse_minilm")
    store.record_gaps("verse_minilm", {pid: "stale"})
    assert store.oldest_gap("verse_minilm") == first
    store.resolve_gaps("verse_minilm", seen_since=store.now())
    assert store.oldest_gap("verse_minilm") is None


def test_concurrent_writes_each_get_their_own_version(store):
    versions: list[int] = []
    lock = threading.Lock()

    def write(n: int) -> None:
        row = store.put("verse", "hot", text=f"text {n}", metadata={}, owner_id=None)
        with lock:
            versions.append(row.version)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 9))


def test_an_unreachable_database_is_a_transient_error():
    db = Database(ConnectionSettings(database="x", host="127.0.0.1", port=1, timeout=1))
    with pytest.raises(ContentStoreUnavailable, match="cannot connect"), db.connection():
        pass


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p%40ss@db.example:6543/app", ("app", "u", "p@ss", "db.example", 6543, None)),
        (
            "postgresql://postgres@/x?unix_sock=/tmp/pg/.s.PGSQL.5432",
            ("x", "postgres", None, None, 5432, "/tmp/pg/.s.PGSQL.5432"),
        ),
    ],
)
def test_urls_parse(url, expected):
    s = ConnectionSettings.from_url(url)
    assert (s.database, s.user, s.password, s.host, s.port, s.unix_sock) == expected


def test_a_secret_without_credentials_is_a_config_error():
    with pytest.raises(ConfigError, match="password"):
        ConnectionSettings.from_secret({"host": "h", "username": "u"})


def test_a_connection_idle_too_long_is_checked_and_replaced(content_db):
    """RDS Proxy closes idle client connections: the pool pings an old one and opens another instead."""
    import time

    from embedsvc.adapters.postgres import IDLE_CHECK_SECONDS

    with content_db.connection() as conn:
        conn.run("SELECT 1")
    _, stale = content_db._idle.get_nowait()
    stale.close()  # what the proxy did while the container slept
    content_db._idle.put((time.monotonic() - IDLE_CHECK_SECONDS - 1, stale))
    with content_db.connection() as conn:
        assert conn is not stale and conn.run("SELECT 1") == [[1]]


def test_a_gap_is_at_least_as_old_as_its_rows_last_change(store):
    """A row changed two hours ago whose point never followed has lagged for two hours, not since the audit."""
    pid = content_point_id("verse", "late", None)
    now = store.now()
    store.record_gaps("verse_minilm", {pid: "stale"}, {pid: now - timedelta(hours=2)})
    assert store.oldest_gap("verse_minilm") == now - timedelta(hours=2)
    store.record_gaps("verse_minilm", {pid: "stale"}, {pid: now - timedelta(minutes=5)})  # seen again
    assert store.oldest_gap("verse_minilm") == now - timedelta(hours=2)  # the earliest stands
