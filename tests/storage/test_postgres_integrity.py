"""Tampering with stored history by raw SQL is detected, and named."""

from __future__ import annotations

import dataclasses
import uuid

import psycopg
import pytest

from turnlog.storage.hashchain import GENESIS_HASH, event_hash, verify_chain
from turnlog.storage.port import EventFilter, EventMetadata, NewEvent
from turnlog.storage.postgres import PostgresEventStore


def new_event(n: int) -> NewEvent:
    return NewEvent(
        event_id=uuid.uuid4(),
        type="Said",
        data={"n": n, "text": "ünïcode ✓"},
        metadata=EventMetadata(actor="a", tenant="t"),
    )


async def fill(store: PostgresEventStore, stream: str, count: int = 5) -> None:
    await store.append(stream, [new_event(n) for n in range(count)], expected_version=0)


def run_sql(url: str, statement: str, *params: object) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement.encode(), params)


async def test_python_recomputes_the_database_hash(store: PostgresEventStore) -> None:
    await fill(store, "s", 3)
    events = await store.read_stream("s")
    assert events[0].prev_hash == GENESIS_HASH
    for event in events:
        assert event.hash == event_hash(
            prev_hash=event.prev_hash,
            stream_id=event.stream_id,
            stream_version=event.stream_version,
            event_id=event.event_id,
            type=event.type,
            data_json=event.data_json,
            metadata_json=event.metadata_json,
            recorded_at=event.recorded_at,
        )
    # An exported copy verifies without the database; a changed copy does not.
    assert verify_chain("s", events).ok
    forged = list(events)
    forged[1] = dataclasses.replace(forged[1], data_json='{"n":1,"text":"forged"}')
    report = verify_chain("s", forged)
    assert (report.broken_at_version, report.problem) == (
        2,
        "hash mismatch: the event's content was changed",
    )


async def test_verify_names_an_edited_event(store: PostgresEventStore, database_url: str) -> None:
    await fill(store, "s")
    await fill(store, "untouched")
    run_sql(
        database_url,
        'UPDATE turnlog.events SET data = \'{"n":2,"text":"edited"}\''
        " WHERE stream_id = 's' AND stream_version = 3",
    )
    report = await store.verify("s")
    assert not report.ok
    assert report.broken_at_version == 3
    assert report.problem is not None
    assert "hash mismatch" in report.problem
    assert (await store.verify("untouched")).ok


async def test_verify_names_edited_metadata(store: PostgresEventStore, database_url: str) -> None:
    await fill(store, "s")
    run_sql(
        database_url,
        'UPDATE turnlog.events SET metadata = \'{"actor":"mallory"}\''
        " WHERE stream_id = 's' AND stream_version = 5",
    )
    report = await store.verify("s")
    assert report.broken_at_version == 5


async def test_moving_an_event_to_another_tenant_breaks_the_chain(
    store: PostgresEventStore, database_url: str
) -> None:
    # The tenant column is generated from the hashed metadata: the only way
    # to move an event to another tenant is to edit that metadata, which
    # verify names. (Nothing else guards the table: raw SQL is the attacker.)
    await fill(store, "s")
    run_sql(
        database_url,
        "UPDATE turnlog.events SET metadata = json_build_object('actor', 'a', 'tenant', 'other')"
        " WHERE stream_id = 's' AND stream_version = 4",
    )
    moved = await store.read_all(filter=EventFilter(tenant="other"))
    assert [(e.stream_id, e.stream_version, e.tenant) for e in moved.events] == [("s", 4, "other")]
    staying = await store.read_all(filter=EventFilter(tenant="t"))
    assert [e.stream_version for e in staying.events] == [1, 2, 3, 5]
    report = await store.verify("s")
    assert report.broken_at_version == 4
    assert report.problem == "hash mismatch: the event's content was changed"


async def test_the_tenant_column_cannot_be_written(
    store: PostgresEventStore, database_url: str
) -> None:
    await fill(store, "s", 1)
    with pytest.raises(psycopg.errors.GeneratedAlways):
        run_sql(database_url, "UPDATE turnlog.events SET tenant = 'other'")


async def test_verify_names_a_deleted_event(store: PostgresEventStore, database_url: str) -> None:
    await fill(store, "s")
    run_sql(database_url, "DELETE FROM turnlog.events WHERE stream_id = 's' AND stream_version = 2")
    report = await store.verify("s")
    assert report.broken_at_version == 3
    assert report.problem == "version gap: expected 2, found 3"


async def test_verify_detects_a_deleted_and_renumbered_event(
    store: PostgresEventStore, database_url: str
) -> None:
    # Closing the gap by renumbering still breaks the chain (prev_hash, and
    # the version is inside the hash).
    await fill(store, "s")
    run_sql(database_url, "DELETE FROM turnlog.events WHERE stream_id = 's' AND stream_version = 2")
    run_sql(
        database_url,
        "UPDATE turnlog.events SET stream_version = stream_version - 1"
        " WHERE stream_id = 's' AND stream_version > 2",
    )
    report = await store.verify("s")
    assert report.broken_at_version == 2
    assert report.problem == "prev_hash is not the previous event's hash"
