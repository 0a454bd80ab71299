"""Versioned SQL migrations: `embedsvc db upgrade` locally, the DbMigrateFunction custom resource on deploy.

Each file in `sql/` (NNNN_name.sql) is applied once, in order, inside one transaction together with
its row in `schema_migrations`, so a failed migration leaves nothing half-applied and a second run
(or a second deploy) applies only what is new. An advisory lock keeps two concurrent upgrades (two
stacks deploying, a developer and CI) from applying the same file twice.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from embedsvc.errors import ConfigError

if TYPE_CHECKING:
    from embedsvc.adapters.postgres import Database

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_ID = 0x656D6265  # "embe": any constant shared by every upgrader of this schema


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped with the package, in order."""
    found = []
    for entry in resources.files("embedsvc.db").joinpath("sql").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migrations share a version: {[m.name for m in found]}")
    return found


def applied(db: Database) -> dict[int, str]:
    """Applied migration versions and their checksums (empty before the first upgrade)."""
    with db.connection() as conn:
        conn.run(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        return {int(v): str(c) for v, c in conn.run("SELECT version, checksum FROM schema_migrations")}


def upgrade(db: Database) -> list[str]:
    """Apply every migration not yet applied; returns the names applied now (empty when up to date)."""
    done: list[str] = []
    with db.connection() as conn:
        conn.run("SELECT pg_advisory_lock(:id)", id=_LOCK_ID)
        try:
            already = applied(db)  # read under the lock: another upgrader may have just finished
            for migration in available():
                if migration.version in already:
                    if already[migration.version] != migration.checksum:
                        raise ConfigError(
                            f"migration {migration.name} changed after it was applied; add a new migration instead"
                        )
                    continue
                conn.run("BEGIN")
                try:
                    conn.run(migration.sql)  # no parameters: the simple protocol runs every statement
                    conn.run(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (:v, :n, :c)",
                        v=migration.version,
                        n=migration.name,
                        c=migration.checksum,
                    )
                    conn.run("COMMIT")
                except Exception:
                    conn.run("ROLLBACK")
                    raise
                done.append(migration.name)
        finally:
            conn.run("SELECT pg_advisory_unlock(:id)", id=_LOCK_ID)
    return done
