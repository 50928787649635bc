"""Numbered SQL migrations of the event log, and the code that applies them.

Files are named `NNNN_description.sql` and applied in number order, each once,
all pending ones in one transaction. Every run takes a transaction-scoped
advisory lock first, so processes that start together (several replicas,
`turnlog migrate` beside a running service) apply each migration exactly once:
the second waits, then finds nothing left to do. An applied file whose text
changed afterwards is an error: migrations are history, add a new one instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

import psycopg
from psycopg import sql

from turnlog.errors import IntegrityError, StorageUnavailableError

#: The schema holding every turnlog table.
SCHEMA: Final = "turnlog"

# Any constant works; this one is "turnlog1" in ASCII. pg_advisory_xact_lock
# takes a bigint and locks are per database.
_ADVISORY_LOCK_KEY: Final = 0x7475726E6C6F6731

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: bytes

    @property
    def checksum(self) -> str:
        """sha256 of the file's bytes, recorded when applied."""
        return hashlib.sha256(self.sql).hexdigest()


def available_migrations() -> list[Migration]:
    """The migration files shipped with this package, in version order."""
    found: list[Migration] = []
    for entry in resources.files(__name__).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is not None:
            found.append(Migration(version=int(match[1]), name=match[2], sql=entry.read_bytes()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise IntegrityError(f"migration files are not numbered 1..n: {versions}")
    return found


async def migrate(conninfo: str) -> list[str]:
    """Brings the database's turnlog schema up to date.

    Safe to run concurrently from several processes, and a no-op when nothing
    is pending.

    Args:
        conninfo: a libpq connection string or URL.

    Returns:
        The migrations this call applied, as "NNNN_name", in order.

    Raises:
        IntegrityError: an applied migration's file has changed since, or the
            database has migrations this code does not know (it is newer).
        StorageUnavailableError: the database is unreachable.
    """
    migrations = available_migrations()
    try:
        async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK_KEY,))
            await conn.execute(
                sql.SQL(
                    "CREATE SCHEMA IF NOT EXISTS {schema};"
                    "CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(schema=sql.Identifier(SCHEMA))
            )
            cursor = await conn.execute(
                sql.SQL(
                    "SELECT version, checksum FROM {schema}.schema_migrations ORDER BY version"
                ).format(schema=sql.Identifier(SCHEMA))
            )
            applied = {version: checksum for version, checksum in await cursor.fetchall()}
            known = {m.version: m for m in migrations}
            for version, checksum in applied.items():
                if version not in known:
                    raise IntegrityError(
                        f"database has migration {version:04d}, unknown to this version"
                    )
                if known[version].checksum != checksum:
                    raise IntegrityError(f"applied migration {version:04d} was edited afterwards")
            done: list[str] = []
            for migration in migrations:
                if migration.version in applied:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {schema}.schema_migrations (version, name, checksum)"
                        " VALUES (%s, %s, %s)"
                    ).format(schema=sql.Identifier(SCHEMA)),
                    (migration.version, migration.name, migration.checksum),
                )
                done.append(f"{migration.version:04d}_{migration.name}")
            return done
    except psycopg.OperationalError as e:
        raise StorageUnavailableError("cannot reach the database to migrate it") from e
