"""Postgres through pg8000: connection settings from a URL or an RDS secret, and a small connection pool.

pg8000 connections are not thread-safe, and the local API serves requests on threads, so each
caller borrows a connection for one unit of work (`with db.connection() as conn`) or one
transaction (`with db.transaction() as conn`). A Lambda container uses one at a time; behind RDS
Proxy that is what the proxy multiplexes. A connection that failed is closed, never returned.
"""

from __future__ import annotations

import contextlib
import queue
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from embedsvc.errors import ConfigError, ContentStoreUnavailable, EmbedServiceError

SSL_MODES = ("disable", "require", "verify-full")
IDLE_CHECK_SECONDS = 60.0


@dataclass(frozen=True)
class ConnectionSettings:
    database: str
    user: str = "postgres"
    password: str | None = field(default=None, repr=False)
    host: str | None = "127.0.0.1"
    port: int = 5432
    unix_sock: str | None = None
    ssl_mode: str = "disable"
    timeout: float = 10.0

    @classmethod
    def from_url(cls, url: str) -> ConnectionSettings:
        """postgresql://user[:password]@host[:port]/db, or postgresql://user@/db?unix_sock=/dir/.s.PGSQL.5432."""
        parsed = urlparse(url)
        if parsed.scheme not in ("postgresql", "postgres") or not parsed.path.strip("/"):
            raise ConfigError("DATABASE_URL must look like postgresql://user@host:5432/dbname")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        ssl_mode = query.get("sslmode", "disable")
        if ssl_mode not in SSL_MODES:
            raise ConfigError(f"DATABASE_URL: sslmode must be one of {', '.join(SSL_MODES)}")
        return cls(
            database=unquote(parsed.path.strip("/")),
            user=unquote(parsed.username or "postgres"),
            password=unquote(parsed.password) if parsed.password else None,
            host=None if query.get("unix_sock") else (parsed.hostname or "127.0.0.1"),
            port=parsed.port or 5432,
            unix_sock=query.get("unix_sock"),
            ssl_mode=ssl_mode,
        )

    @classmethod
    def from_secret(cls, secret: Mapping[str, Any], *, ssl_mode: str = "require") -> ConnectionSettings:
        """The JSON RDS keeps in Secrets Manager: host, port, username, password, dbname."""
        missing = [k for k in ("host", "username", "password") if not secret.get(k)]
        if missing:
            raise ConfigError(f"database secret lacks {', '.join(missing)} (RDS's format is expected)")
        return cls(
            database=str(secret.get("dbname") or "postgres"),
            user=str(secret["username"]),
            password=str(secret["password"]),
            host=str(secret["host"]),
            port=int(secret.get("port") or 5432),
            ssl_mode=ssl_mode,
        )

    def connect(self):
        import pg8000.native

        ssl_context: ssl.SSLContext | None = None
        if self.ssl_mode == "require":
            # Encrypted without checking the certificate (libpq's sslmode=require): RDS's CA is not in the
            # default trust store; verify-full needs the RDS bundle in SSL_CERT_FILE.
            ssl_context = ssl.create_default_context()
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        elif self.ssl_mode == "verify-full":
            ssl_context = ssl.create_default_context()
        try:
            return pg8000.native.Connection(
                self.user,
                host=self.host if self.unix_sock is None else None,
                port=self.port,
                unix_sock=self.unix_sock,
                database=self.database,
                password=self.password,
                ssl_context=ssl_context,
                timeout=self.timeout,
                application_name="embedsvc",
            )
        except Exception as exc:
            where = self.unix_sock or f"{self.host}:{self.port}"
            raise ContentStoreUnavailable(
                f"cannot connect to Postgres at {where} (database {self.database}): {type(exc).__name__}"
            ) from exc


class Database:
    """A pool of pg8000 connections to one database."""

    def __init__(self, settings: ConnectionSettings, *, max_connections: int = 8):
        self.settings = settings
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max_connections)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Database:
        return cls(ConnectionSettings.from_url(url), **kwargs)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A connection for a few autocommitted statements; errors become ContentStoreUnavailable."""
        import pg8000.exceptions

        if not self._slots.acquire(timeout=self.settings.timeout):
            raise ContentStoreUnavailable("no Postgres connection became free in time")
        conn = None
        try:
            conn = self._checkout()
            try:
                yield conn
            except EmbedServiceError:
                # The caller's own verdict (not found, forbidden) after a clean rollback: the connection is fine.
                self._idle.put((time.monotonic(), conn))
                conn = None
                raise
            except pg8000.exceptions.DatabaseError as exc:
                # An SQL error leaves the connection usable; the caller's bug or constraint is theirs to see.
                raise _as_store_error(exc) from exc
            except (pg8000.exceptions.InterfaceError, OSError) as exc:
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                raise ContentStoreUnavailable(f"Postgres connection failed: {type(exc).__name__}") from exc
            if conn is not None:
                self._idle.put((time.monotonic(), conn))
                conn = None
        finally:
            if conn is not None:  # an exception other than the ones above: do not reuse it
                with contextlib.suppress(Exception):
                    conn.close()
            self._slots.release()

    def _checkout(self) -> Any:
        """An idle connection that still answers, else a new one.

        RDS Proxy and failovers close client connections that sat idle (IdleClientTimeout, 30 min by
        default), and a Lambda container can sleep for longer than that: a connection idle for more than
        IDLE_CHECK_SECONDS is pinged first, and replaced if the ping fails, instead of failing the caller.
        """
        while True:
            try:
                idle_since, conn = self._idle.get_nowait()
            except queue.Empty:
                return self.settings.connect()
            if time.monotonic() - idle_since < IDLE_CHECK_SECONDS:
                return conn
            try:
                conn.run("SELECT 1")
                return conn
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A connection inside BEGIN ... COMMIT; any exception rolls it back."""
        with self.connection() as conn:
            conn.run("BEGIN")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.run("ROLLBACK")
                raise
            conn.run("COMMIT")

    def close(self) -> None:
        while True:
            try:
                _, conn = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()


def _as_store_error(exc: Exception) -> Exception:
    """Postgres errors worth retrying (serialization, deadlock, shutdown) are transient; others are bugs."""
    code = ""
    if exc.args and isinstance(exc.args[0], dict):
        code = str(exc.args[0].get("C", ""))
    if code in ("40001", "40P01", "57P01", "57P03", "53300"):
        return ContentStoreUnavailable(f"Postgres asked to retry (SQLSTATE {code})")
    return exc
