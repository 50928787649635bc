"""Opening the event store from settings: embedded server or a given database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from turnlog.config import Settings
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.migrations import migrate
from turnlog.storage.postgres import PostgresEventStore


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenedStore:
    """An open event store and what it runs on.

    Attributes:
        store: the store, migrated and ready.
        conninfo: the database it uses.
        applied_migrations: the migrations applied while opening it.
    """

    store: PostgresEventStore
    conninfo: str
    applied_migrations: list[str]


def embedded_data_dir(settings: Settings) -> Path:
    """Where the embedded server keeps its data: `<data_dir>/postgres`."""
    return settings.data_dir / "postgres"


@contextlib.asynccontextmanager
async def open_event_store(
    settings: Settings, *, max_connections: int = 20
) -> AsyncIterator[OpenedStore]:
    """Opens the event log that `settings` name, migrated, for the context's duration.

    With `settings.database_url` unset, starts (or reuses) the embedded server
    in `<data_dir>/postgres` and stops it on exit; otherwise connects to the
    given database. Either way, pending migrations are applied first.

    Raises:
        StorageUnavailableError: the database cannot be reached.
    """
    embedded: EmbeddedPostgres | None = None
    if settings.database_url is None:
        embedded = EmbeddedPostgres(embedded_data_dir(settings))
        conninfo = await asyncio.to_thread(embedded.start)
    else:
        conninfo = settings.database_url
    try:
        applied = await migrate(conninfo)
        store = await PostgresEventStore.open(conninfo, max_size=max_connections)
        try:
            yield OpenedStore(store=store, conninfo=conninfo, applied_migrations=applied)
        finally:
            await store.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
