"""Migrations: applied once, in order, also when two migrators race."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from turnlog.errors import IntegrityError
from turnlog.storage import migrations
from turnlog.storage.migrations import available_migrations, migrate
from turnlog.storage.port import DEFAULT_TENANT, EventFilter, EventMetadata, NewEvent
from turnlog.storage.postgres import PostgresEventStore


def applied_rows(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT version, name FROM turnlog.schema_migrations ORDER BY version"
        ).fetchall()


async def test_two_concurrent_migrators_apply_each_migration_once(fresh_database_url: str) -> None:
    names = [f"{m.version:04d}_{m.name}" for m in available_migrations()]
    assert names[0] == "0001_event_log"
    results = await asyncio.gather(*(migrate(fresh_database_url) for _ in range(2)))
    # One applied everything; the other waited on the lock, then found nothing to do.
    assert sorted(results, key=len) == [[], names]
    assert applied_rows(fresh_database_url) == [(m.version, m.name) for m in available_migrations()]
    assert await migrate(fresh_database_url) == []


async def test_an_edited_applied_migration_is_refused(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE turnlog.schema_migrations SET checksum = 'x' WHERE version = 1")
    with pytest.raises(IntegrityError):
        await migrate(fresh_database_url)


async def test_a_database_newer_than_the_code_is_refused(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO turnlog.schema_migrations (version, name, checksum)"
            " VALUES (9999, 'from_the_future', 'x')"
        )
    with pytest.raises(IntegrityError):
        await migrate(fresh_database_url)


async def test_0002_gives_the_events_recorded_before_it_their_tenant(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A log written before tenancy (0001 only): events with no tenant in
    # their metadata, and one that named a tenant already.
    shipped = available_migrations()
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "available_migrations", lambda: shipped[:1])
        assert await migrate(fresh_database_url) == ["0001_event_log"]
    events = [
        NewEvent(event_id=uuid.uuid4(), type="T", data={"n": n}, metadata=metadata)
        for n, metadata in enumerate(
            [EventMetadata(actor="u"), EventMetadata(tenant="acme"), EventMetadata()]
        )
    ]
    async with await PostgresEventStore.open(fresh_database_url) as store:
        await store.append("old", events, expected_version=0)
    assert (await migrate(fresh_database_url))[0] == "0002_tenant"
    async with await PostgresEventStore.open(fresh_database_url) as store:
        default = await store.read_all(filter=EventFilter(tenant=DEFAULT_TENANT))
        assert [e.stream_version for e in default.events] == [1, 3]
        acme = await store.read_all(filter=EventFilter(tenant="acme"))
        assert [e.stream_version for e in acme.events] == [2]
        assert (await store.verify("old")).ok  # the migration changed nothing hashed
