"""The local stack's Postgres: DATABASE_URL, the machine's server, or an embedded cluster, each path forced."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from embedsvc.adapters.postgres import ConnectionSettings
from embedsvc.errors import ConfigError, ContentStoreUnavailable
from embedsvc.local.postgres import resolve_local_database
from embedsvc.local.stack import free_port

SERVER_TEST_DB = "postgresql://postgres@127.0.0.1:5432/test"


def select_one(url: str) -> int:
    conn = ConnectionSettings.from_url(url).connect()
    try:
        return conn.run("SELECT 1")[0][0]
    finally:
        conn.close()


def server_databases() -> set[str]:
    conn = ConnectionSettings(database="postgres", host="127.0.0.1", port=5432, timeout=1.0).connect()
    try:
        return {row[0] for row in conn.run("SELECT datname FROM pg_database")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def machine_server() -> None:
    """The server this machine (and CI's) runs on 127.0.0.1:5432; a newcomer's machine may have none."""
    try:
        server_databases()
    except ContentStoreUnavailable:
        pytest.skip("no Postgres on 127.0.0.1:5432 (trust auth)")


def wait_exited(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_database_url_is_used_as_is_and_close_leaves_it(machine_server, tmp_path):
    # Given DATABASE_URL set, even with a server on 5432 that the next path would take
    env = {"DATABASE_URL": SERVER_TEST_DB}
    # When the local database is resolved
    db = resolve_local_database(tmp_path, env=env)
    # Then it is that URL, untouched, and close() drops nothing
    assert (db.kind, db.url) == ("env", SERVER_TEST_DB)
    assert select_one(db.url) == 1
    db.close()
    assert "test" in server_databases()
    assert not (tmp_path / "postgres").exists()


def test_forced_env_without_database_url_says_so(tmp_path):
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        resolve_local_database(tmp_path, env={"EMBEDSVC_LOCAL_PG": "env"})


def test_server_gets_a_fresh_database_of_ours_and_close_drops_it(machine_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="embedsvc.local.postgres")
    # Given no DATABASE_URL and the machine's server on 5432
    # When the local database is resolved (the server path forced: it would be taken anyway)
    db = resolve_local_database(tmp_path, env={"EMBEDSVC_LOCAL_PG": "server"})
    name = db.url.rsplit("/", 1)[1]
    # Then it is a new embedsvc_<8 hex> database on that server, and the log says which path was taken
    assert db.kind == "server"
    assert name.startswith("embedsvc_") and len(name) == len("embedsvc_") + 8
    assert name in server_databases()
    assert select_one(db.url) == 1
    assert f"using the server on 127.0.0.1:5432 (database {name})" in caplog.text
    # And close() drops it, even with a session still connected
    holder = ConnectionSettings.from_url(db.url).connect()
    db.close()
    assert name not in server_databases()
    with pytest.raises(Exception):  # noqa: B017 - the server terminated it; pg8000 raises one of several
        holder.run("SELECT 1")


def test_server_path_is_the_default_without_database_url(machine_server, tmp_path):
    with resolve_local_database(tmp_path, env={}, name=f"embedsvc_default_{os.getpid()}") as db:
        assert db.kind == "server"
        assert db.url == f"postgresql://postgres@127.0.0.1:5432/embedsvc_default_{os.getpid()}"
        assert select_one(db.url) == 1
    assert f"embedsvc_default_{os.getpid()}" not in server_databases()


def test_server_keep_leaves_the_named_database_and_a_second_resolve_reuses_it(machine_server, tmp_path):
    name = f"embedsvc_keep_{os.getpid()}"
    env = {"EMBEDSVC_LOCAL_PG": "server"}
    first = resolve_local_database(tmp_path, env=env, name=name, keep=True)
    conn = ConnectionSettings.from_url(first.url).connect()
    conn.run("CREATE TABLE marker (id int)")
    conn.close()
    first.close()
    assert name in server_databases()
    # The same name again: the database (and what is in it) is reused, and without keep it is dropped at close
    second = resolve_local_database(tmp_path, env=env, name=name)
    conn = ConnectionSettings.from_url(second.url).connect()
    assert conn.run("SELECT count(*) FROM marker") == [[0]]
    conn.close()
    second.close()
    assert name not in server_databases()


def test_forced_server_on_a_closed_port_errors_clearly(tmp_path):
    port = free_port()  # bound then released: nothing listens there
    env = {"EMBEDSVC_LOCAL_PG": "server", "EMBEDSVC_LOCAL_PG_PORT": str(port)}
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=f"EMBEDSVC_LOCAL_PG=server, but no Postgres .* on 127.0.0.1:{port}"
    ):
        resolve_local_database(tmp_path, env=env)
    assert time.monotonic() - started < 10  # refused at once, not a hang
    assert not (tmp_path / "postgres").exists()  # it did not fall back to an embedded cluster


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMBEDSVC_LOCAL_PG": "docker"}, "EMBEDSVC_LOCAL_PG must be one of env, server, embedded"),
        ({"EMBEDSVC_LOCAL_PG_PORT": "five"}, "EMBEDSVC_LOCAL_PG_PORT must be a TCP port"),
        ({"EMBEDSVC_LOCAL_PG": "server"}, "may not be named 'postgres'"),
    ],
)
def test_bad_settings_are_refused(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve_local_database(tmp_path, env=env, name="postgres" if "may not" in message else None)


def test_embedded_cluster_starts_on_a_socket_answers_and_stops_at_close(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="embedsvc.local.postgres")
    # Given the embedded path forced (DATABASE_URL and a server on 5432 notwithstanding)
    env = {"EMBEDSVC_LOCAL_PG": "embedded", "DATABASE_URL": SERVER_TEST_DB}
    # When the local database is resolved
    db = resolve_local_database(tmp_path, env=env, name="embedsvc_embedded")
    pgdata = tmp_path / "postgres"
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    socket_path = db.url.split("unix_sock=", 1)[1]
    try:
        # Then a cluster runs from tmp_path, reached through a Unix socket only, with our database in it
        assert db.kind == "embedded"
        assert db.url.startswith("postgresql://postgres@/embedsvc_embedded?unix_sock=")
        assert socket_path.endswith("/.s.PGSQL.5432") and Path(socket_path).is_socket()
        assert select_one(db.url) == 1
        conn = ConnectionSettings.from_url(db.url).connect()
        assert conn.run("SHOW listen_addresses") == [[""]]
        assert conn.run("SELECT current_database()") == [["embedsvc_embedded"]]
        conn.close()
        assert "postgres: embedded PostgreSQL 18." in caplog.text
    finally:
        db.close()
    # And close() stops it and removes the throwaway data directory
    assert wait_exited(pid)
    assert not Path(socket_path).exists()
    assert not pgdata.exists()
    with pytest.raises(ContentStoreUnavailable):
        select_one(db.url)


def test_embedded_is_the_fallback_and_keep_leaves_its_data_for_next_time(tmp_path):
    # Given no DATABASE_URL and nothing on the probe port
    env = {"EMBEDSVC_LOCAL_PG_PORT": str(free_port())}
    first = resolve_local_database(tmp_path, env=env, name="embedsvc_kept", keep=True)
    assert first.kind == "embedded"
    conn = ConnectionSettings.from_url(first.url).connect()
    conn.run("CREATE TABLE marker (id int)")
    conn.run("INSERT INTO marker VALUES (7)")
    conn.close()
    first.close()
    # The data directory stays, stopped; the next resolve starts it again with the data in place
    assert (tmp_path / "postgres" / "PG_VERSION").exists()
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()
    with resolve_local_database(tmp_path, env=env, name="embedsvc_kept") as second:
        conn = ConnectionSettings.from_url(second.url).connect()
        assert conn.run("SELECT id FROM marker") == [[7]]
        conn.close()
    assert not (tmp_path / "postgres").exists()
