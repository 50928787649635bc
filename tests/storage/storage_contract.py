"""The EventStore contract: tests every adapter must pass, through the port only.

An adapter's test module subclasses `EventStoreContract` and provides a
`store` fixture yielding a fresh, empty store (see test_postgres_contract.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from turnlog.errors import (
    DuplicateEventError,
    HistoryDivergedError,
    InvalidArgumentError,
    VersionConflictError,
)
from turnlog.storage.hashchain import GENESIS_HASH, event_hash
from turnlog.storage.port import (
    ANY_VERSION,
    DEFAULT_TENANT,
    NO_STREAM,
    START_POSITION,
    Direction,
    EventFilter,
    EventMetadata,
    EventPage,
    EventStore,
    ImportedEvent,
    NewEvent,
    Position,
    RawJson,
    RecordedEvent,
)


def new_event(event_type: str = "Happened", **data: Any) -> NewEvent:
    return NewEvent(event_id=uuid.uuid4(), type=event_type, data=data or {"n": 0})


def tenant_event(tenant: str | None, event_type: str = "Happened", **data: Any) -> NewEvent:
    """An event whose metadata names `tenant` (None: no tenant in the metadata)."""
    return NewEvent(
        event_id=uuid.uuid4(),
        type=event_type,
        data=data or {"n": 0},
        metadata=EventMetadata(tenant=tenant, actor="u"),
    )


async def read_everything(
    store: EventStore, *, limit: int = 1000, filter: EventFilter | None = None
) -> tuple[list[RecordedEvent], list[EventPage]]:
    """Pages through `read_all` from the start: every event, and every page."""
    events: list[RecordedEvent] = []
    pages: list[EventPage] = []
    position = START_POSITION
    while True:
        page = await store.read_all(after=position, limit=limit, filter=filter)
        assert page.next_position > position or page.reached_end
        events.extend(page.events)
        pages.append(page)
        position = page.next_position
        if page.reached_end:
            return events, pages


async def take(iterator: AsyncIterator[RecordedEvent], count: int) -> list[RecordedEvent]:
    """The next `count` events of a subscription (bounded by the test timeout)."""
    return [await anext(iterator) for _ in range(count)]


def foreign_chain(
    stream_id: str, count: int, *, seed: str = "x", metadata_json: str = '{"actor":"elsewhere"}'
) -> list[ImportedEvent]:
    """A hash chain made elsewhere (here: in Python), with times in the past."""
    events: list[ImportedEvent] = []
    prev = GENESIS_HASH
    start = datetime(2020, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    for version in range(1, count + 1):
        fields: dict[str, Any] = {
            "stream_version": version,
            "event_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{seed}/{stream_id}/{version}"),
            "type": "Happened",
            "data_json": f'{{ "n" : {version}, "s":"{seed} ✓" }}',
            "metadata_json": metadata_json,
            "recorded_at": start + timedelta(microseconds=7 * version),
            "prev_hash": prev,
        }
        digest = event_hash(stream_id=stream_id, **fields)
        events.append(ImportedEvent(hash=digest, **fields))
        prev = digest
    return events


class EventStoreContract:
    """Behaviour every EventStore adapter guarantees."""

    async def test_append_and_read_back(self, store: EventStore) -> None:
        meta = EventMetadata(correlation_id="c1", causation_id="x", trace_id="t", actor="u")
        events = [
            NewEvent(event_id=uuid.uuid4(), type="Created", data={"title": "héllo"}),
            NewEvent(event_id=uuid.uuid4(), type="Said", data={"text": "hi"}, metadata=meta),
        ]
        result = await store.append("conv-1", events, expected_version=NO_STREAM)
        assert (result.first_version, result.last_version) == (1, 2)
        assert len(result.positions) == 2
        assert result.positions[0] < result.positions[1]

        read = await store.read_stream("conv-1")
        assert [e.event_id for e in read] == [e.event_id for e in events]
        assert [e.stream_version for e in read] == [1, 2]
        assert [e.global_position for e in read] == list(result.positions)
        assert read[0].data == {"title": "héllo"}
        assert read[1].metadata == meta
        assert read[0].metadata == EventMetadata()
        assert read[1].recorded_at == result.recorded_at
        assert read[1].prev_hash == read[0].hash
        assert await store.stream_version("conv-1") == 2
        assert await store.stream_version("missing") == 0
        assert await store.read_stream("missing") == ()

    async def test_expected_version_must_match_and_conflict_writes_nothing(
        self, store: EventStore
    ) -> None:
        await store.append("s", [new_event(), new_event()], expected_version=NO_STREAM)
        for wrong in (0, 1, 3):
            with pytest.raises(VersionConflictError) as caught:
                await store.append("s", [new_event()], expected_version=wrong)
            assert caught.value.actual_version == 2
            assert caught.value.expected_version == wrong
        assert await store.stream_version("s") == 2
        result = await store.append("s", [new_event()], expected_version=2)
        assert result.first_version == 3
        result = await store.append("s", [new_event()], expected_version=ANY_VERSION)
        assert result.first_version == 4
        assert [e.stream_version for e in await store.read_stream("s")] == [1, 2, 3, 4]

    async def test_idempotent_retry_returns_original_and_writes_nothing(
        self, store: EventStore
    ) -> None:
        batch = [new_event(n=1), new_event(n=2)]
        first = await store.append("s", batch, expected_version=NO_STREAM)
        await store.append("s", [new_event()], expected_version=2)
        # The retry names the same (now stale) expected version: still a no-op.
        again = await store.append("s", batch, expected_version=NO_STREAM)
        assert again == first
        assert await store.stream_version("s") == 3

    async def test_reused_event_id_with_other_content_or_stream_is_a_duplicate(
        self, store: EventStore
    ) -> None:
        event = new_event(n=1)
        await store.append("s", [event], expected_version=NO_STREAM)
        changed = NewEvent(event_id=event.event_id, type=event.type, data={"n": 2})
        with pytest.raises(DuplicateEventError):
            await store.append("s", [changed], expected_version=ANY_VERSION)
        with pytest.raises(DuplicateEventError):
            await store.append("other", [event], expected_version=ANY_VERSION)
        # Partly new batch: all or nothing.
        with pytest.raises(DuplicateEventError):
            await store.append("s", [new_event(), event], expected_version=ANY_VERSION)
        assert await store.stream_version("s") == 1
        assert await store.stream_version("other") == 0

    async def test_batch_with_invalid_last_event_writes_nothing(self, store: EventStore) -> None:
        await store.append("s", [new_event()], expected_version=NO_STREAM)
        bad = NewEvent(event_id=uuid.uuid4(), type="Bad", data=RawJson(text='{"unclosed": '))
        with pytest.raises(InvalidArgumentError):
            await store.append("s", [new_event(), new_event(), bad], expected_version=1)
        assert await store.stream_version("s") == 1
        page = await store.read_all()
        assert len(page.events) == 1

    async def test_invalid_inputs_are_rejected(self, store: EventStore) -> None:
        with pytest.raises(InvalidArgumentError):
            await store.append("s", [], expected_version=ANY_VERSION)
        with pytest.raises(InvalidArgumentError):
            await store.append("", [new_event()], expected_version=ANY_VERSION)
        with pytest.raises(InvalidArgumentError):
            await store.append("s", [new_event(x=float("nan"))], expected_version=ANY_VERSION)
        with pytest.raises(InvalidArgumentError):
            await store.append("s", [new_event("")], expected_version=ANY_VERSION)
        event = new_event()
        with pytest.raises(InvalidArgumentError):
            await store.append("s", [event, event], expected_version=ANY_VERSION)
        assert await store.stream_version("s") == 0

    async def test_raw_json_is_stored_verbatim(self, store: EventStore) -> None:
        text = '{ "b": 1,\n "a": [1.50, 1e400, 12345678901234567890123] }'
        await store.append(
            "s",
            [NewEvent(event_id=uuid.uuid4(), type="T", data=RawJson(text=text))],
            expected_version=0,
        )
        (event,) = await store.read_stream("s")
        assert event.data_json == text

    async def test_read_stream_ranges_and_directions(self, store: EventStore) -> None:
        await store.append("s", [new_event(n=i) for i in range(1, 11)], expected_version=0)

        def versions(events: tuple[RecordedEvent, ...]) -> list[int]:
            return [e.stream_version for e in events]

        assert versions(await store.read_stream("s", from_version=4, limit=3)) == [4, 5, 6]
        assert versions(await store.read_stream("s", direction=Direction.BACKWARDS, limit=2)) == [
            10,
            9,
        ]
        assert versions(
            await store.read_stream("s", from_version=3, direction=Direction.BACKWARDS)
        ) == [3, 2, 1]
        assert versions(await store.read_stream("s", from_version=11)) == []
        assert [e.data["n"] for e in await store.read_stream("s", limit=2)] == [1, 2]

    async def test_read_all_pages_with_checkpoints_and_filters(self, store: EventStore) -> None:
        await store.append("conv-a", [new_event("X"), new_event("Y")], expected_version=0)
        await store.append("tool-b", [new_event("X")], expected_version=0)
        await store.append("conv-c", [new_event("Y")], expected_version=0)

        seen: list[RecordedEvent] = []
        position = START_POSITION
        while True:
            page = await store.read_all(after=position, limit=1)
            seen.extend(page.events)
            assert page.next_position > position or page.reached_end
            position = page.next_position
            if page.reached_end:
                break
        assert [(e.stream_id, e.stream_version) for e in seen] == [
            ("conv-a", 1),
            ("conv-a", 2),
            ("tool-b", 1),
            ("conv-c", 1),
        ]
        assert Position.parse(str(seen[2].position)) == seen[2].position

        after_first = await store.read_all(after=seen[0].position)
        assert [e.event_id for e in after_first.events] == [e.event_id for e in seen[1:]]

        only_x = await store.read_all(filter=EventFilter(types=frozenset({"X"})))
        assert [e.stream_id for e in only_x.events] == ["conv-a", "tool-b"]
        convs = await store.read_all(filter=EventFilter(stream_prefix="conv-"))
        assert [e.stream_id for e in convs.events] == ["conv-a", "conv-a", "conv-c"]
        # A filter that drops everything still moves the checkpoint on.
        none = await store.read_all(filter=EventFilter(types=frozenset({"Nope"})))
        assert none.events == ()
        assert none.next_position == seen[-1].position

    async def test_read_all_for_one_tenant_pages_past_the_other_tenants(
        self, store: EventStore
    ) -> None:
        # Tenant "a" writes one event for every 7 of "b" and "c" (and some
        # without a tenant), across several streams of each.
        versions: dict[str, int] = {}

        async def append(stream: str, events: list[NewEvent]) -> None:
            result = await store.append(stream, events, expected_version=versions.get(stream, 0))
            versions[stream] = result.last_version

        for i in range(12):
            for k in range(7):
                other = "b" if k % 2 else "c"
                await append(f"{other}-{k % 3}", [tenant_event(other, n=i)])
            await append("old", [tenant_event(None)])
            batch = [tenant_event("a", n=i)] + ([tenant_event("a", "Other")] if i % 4 == 0 else [])
            await append(f"a-{i % 3}", batch)
        await append("c-0", [tenant_event("c")])  # the log ends with another tenant's event

        everything, _ = await read_everything(store)
        expected = [e for e in everything if e.tenant == "a"]
        assert len(expected) == 15
        assert all(e.stream_id.startswith("a-") for e in expected)

        # One page at a time: only tenant a's events, in the all-stream order,
        # none skipped; the limit counts tenant a's events alone.
        only_a = EventFilter(tenant="a")
        got, pages = await read_everything(store, limit=2, filter=only_a)
        assert [e.event_id for e in got] == [e.event_id for e in expected]
        assert all(len(p.events) == 2 for p in pages[:-1])
        assert len(pages) == 8
        # The last page moves past the other tenants' events after a's last one.
        assert pages[-1].next_position == everything[-1].position
        whole = await store.read_all(filter=only_a)
        assert [e.event_id for e in whole.events] == [e.event_id for e in expected]
        assert whole.reached_end
        assert whole.next_position == everything[-1].position

        # A tenant filter combined with a type filter; a tenant with no events.
        typed = await store.read_all(
            limit=3, filter=EventFilter(tenant="a", types=frozenset({"Other"}))
        )
        assert [e.type for e in typed.events] == ["Other"]
        assert not typed.reached_end
        assert typed.next_position == expected[2].position
        nobody = await store.read_all(after=expected[0].position, filter=EventFilter(tenant="z"))
        assert (nobody.events, nobody.reached_end) == ((), True)
        assert nobody.next_position == everything[-1].position
        # Reading on from the end finds nothing and stays there.
        after_end = await store.read_all(after=whole.next_position, filter=only_a)
        assert after_end.events == ()
        assert after_end.next_position == whole.next_position

    async def test_events_without_a_tenant_belong_to_the_default_tenant(
        self, store: EventStore
    ) -> None:
        await store.append(
            "s",
            [tenant_event(None), tenant_event("acme"), tenant_event(""), new_event()],
            expected_version=0,
        )
        await store.import_events("imported", foreign_chain("imported", 1))
        await store.import_events("null", foreign_chain("null", 1, metadata_json='{"tenant":null}'))
        named = foreign_chain("named", 1, metadata_json='{"tenant":"acme"}')
        await store.import_events("named", named)
        events, _ = await read_everything(store)
        assert [e.tenant for e in events] == [
            DEFAULT_TENANT,
            "acme",
            "",
            DEFAULT_TENANT,
            DEFAULT_TENANT,
            DEFAULT_TENANT,
            "acme",
        ]
        assert events[0].metadata.tenant is None
        assert events[1].metadata.tenant == "acme"
        default = await store.read_all(filter=EventFilter(tenant=DEFAULT_TENANT))
        assert [(e.stream_id, e.stream_version) for e in default.events] == [
            ("s", 1),
            ("s", 4),
            ("imported", 1),
            ("null", 1),
        ]
        acme = await store.read_all(filter=EventFilter(tenant="acme"))
        assert [e.stream_id for e in acme.events] == ["s", "named"]
        empty_name = await store.read_all(filter=EventFilter(tenant=""))
        assert [e.stream_version for e in empty_name.events] == [3]

    async def test_metadata_the_tenant_cannot_be_read_from_is_rejected(
        self, store: EventStore
    ) -> None:
        for metadata in (
            EventMetadata(tenant="a\x00b"),
            EventMetadata(tenant="a", actor="nul \x00 inside"),
        ):
            bad = NewEvent(event_id=uuid.uuid4(), type="T", data={}, metadata=metadata)
            with pytest.raises(InvalidArgumentError, match="metadata"):
                await store.append("s", [new_event(), bad], expected_version=0)
        for metadata_json in (
            '{"tenant":7}',
            '{"tenant":["a"]}',
            '{"tenant":"a","actor":"\\u0000"}',
            '{"tenant":"a","x":{"y":["\\ud800"]}}',
            '{"\\udc00":1}',
        ):
            chain = foreign_chain("i", 2, metadata_json=metadata_json)
            with pytest.raises(InvalidArgumentError, match="metadata"):
                await store.import_events("i", chain)
        assert (await store.read_all()).events == ()
        # A paired surrogate escape is one character, and fine.
        fine = foreign_chain("i", 1, metadata_json='{"tenant":"\\ud83d\\ude00"}')
        await store.import_events("i", fine)
        (event,) = await store.read_stream("i")
        assert event.tenant == "\U0001f600"
        page = await store.read_all(filter=EventFilter(tenant="\U0001f600"))
        assert [e.event_id for e in page.events] == [event.event_id]

    async def test_latest_events_of_types_per_stream(self, store: EventStore) -> None:
        # conv-a: started, ended, started again (open); conv-b: started, ended;
        # conv-c: started (open); tool-d: started, outside the prefix.
        a = [new_event("Start"), new_event("Noise"), new_event("End"), new_event("Start")]
        await store.append("conv-a", [*a, new_event("Noise")], expected_version=0)
        await store.append("conv-b", [new_event("Start"), new_event("End")], expected_version=0)
        await store.append("conv-c", [new_event("Noise"), new_event("Start")], expected_version=0)
        await store.append("tool-d", [new_event("Start")], expected_version=0)
        await store.append("conv-e", [new_event("Noise")], expected_version=0)

        types = ["Start", "End"]
        latest = await store.latest_events_of_types(types, stream_prefix="conv-")
        assert [(e.stream_id, e.stream_version, e.type) for e in latest] == [
            ("conv-a", 4, "Start"),
            ("conv-b", 2, "End"),
            ("conv-c", 2, "Start"),
        ]
        assert latest[0].event_id == a[3].event_id
        assert latest[0].data == {"n": 0}
        open_ = await store.latest_events_of_types(types, stream_prefix="conv-", last_type="Start")
        assert [e.stream_id for e in open_] == ["conv-a", "conv-c"]
        everywhere = await store.latest_events_of_types(types, last_type="Start")
        assert [e.stream_id for e in everywhere] == ["conv-a", "conv-c", "tool-d"]
        assert await store.latest_events_of_types(["Nope"]) == ()
        with pytest.raises(InvalidArgumentError):
            await store.latest_events_of_types([])

    async def test_latest_events_of_types_of_one_tenant(self, store: EventStore) -> None:
        await store.append("conv-a", [tenant_event("a", "Start")], expected_version=0)
        await store.append(
            "conv-b", [tenant_event("b", "Start"), tenant_event("b", "End")], expected_version=0
        )
        await store.append("conv-old", [tenant_event(None, "Start")], expected_version=0)
        # A stream whose events name two tenants: each tenant sees its own latest.
        await store.append(
            "conv-mixed",
            [tenant_event("a", "Start"), tenant_event("b", "End"), tenant_event("b", "Start")],
            expected_version=0,
        )
        types = ["Start", "End"]

        async def latest(**kwargs: Any) -> list[tuple[str, int]]:
            found = await store.latest_events_of_types(types, **kwargs)
            return [(e.stream_id, e.stream_version) for e in found]

        assert await latest(tenant="a") == [("conv-a", 1), ("conv-mixed", 1)]
        assert await latest(tenant="b") == [("conv-b", 2), ("conv-mixed", 3)]
        assert await latest(tenant="b", last_type="Start") == [("conv-mixed", 3)]
        assert await latest(tenant="a", last_type="End") == []
        assert await latest(tenant=DEFAULT_TENANT) == [("conv-old", 1)]
        assert await latest(tenant="b", stream_prefix="conv-m") == [("conv-mixed", 3)]
        assert await latest() == [
            ("conv-a", 1),
            ("conv-b", 2),
            ("conv-mixed", 3),
            ("conv-old", 1),
        ]

    async def test_snapshots_latest_at_or_below_a_version(self, store: EventStore) -> None:
        await store.append("s", [new_event() for _ in range(5)], expected_version=0)
        assert await store.load_snapshot("s", kind="k.v1") is None
        await store.save_snapshot("s", kind="k.v1", stream_version=2, state=b"two")
        await store.save_snapshot("s", kind="k.v1", stream_version=4, state=b"four")
        await store.save_snapshot("s", kind="k.v2", stream_version=5, state=b"other kind")
        latest = await store.load_snapshot("s", kind="k.v1")
        assert latest is not None
        assert (latest.stream_version, latest.state) == (4, b"four")
        older = await store.load_snapshot("s", kind="k.v1", max_version=3)
        assert older is not None
        assert (older.stream_version, older.state) == (2, b"two")
        await store.save_snapshot("s", kind="k.v1", stream_version=4, state=b"FOUR")
        replaced = await store.load_snapshot("s", kind="k.v1")
        assert replaced is not None
        assert replaced.state == b"FOUR"
        with pytest.raises(InvalidArgumentError):
            await store.save_snapshot("s", kind="k.v1", stream_version=6, state=b"future")
        tail = await store.read_stream("s", from_version=replaced.stream_version + 1)
        assert [e.stream_version for e in tail] == [5]

    async def test_verify_accepts_an_untouched_stream(self, store: EventStore) -> None:
        for i in range(3):
            await store.append("s", [new_event(n=i), new_event(n=-i)], expected_version=2 * i)
        report = await store.verify("s")
        assert report.ok
        assert (report.events_checked, report.last_version) == (6, 6)
        assert (await store.verify("empty")).ok

    async def test_subscribe_stream_catches_up_then_goes_live(self, store: EventStore) -> None:
        await store.append("s", [new_event(n=1), new_event(n=2)], expected_version=0)
        await store.append("noise", [new_event()], expected_version=0)
        subscription = store.subscribe_stream("s", after_version=1)
        try:
            (caught_up,) = await take(subscription, 1)
            assert caught_up.stream_version == 2
            pending = asyncio.ensure_future(take(subscription, 2))
            await asyncio.sleep(0.05)
            assert not pending.done()
            await store.append("s", [new_event(n=3), new_event(n=4)], expected_version=2)
            live = await asyncio.wait_for(pending, 5)
            assert [e.stream_version for e in live] == [3, 4]
        finally:
            await subscription.aclose()

    async def test_subscribe_all_catches_up_then_goes_live(self, store: EventStore) -> None:
        await store.append("a", [new_event()], expected_version=0)
        await store.append("b", [new_event("Skip")], expected_version=0)
        subscription = store.subscribe_all(filter=EventFilter(types=frozenset({"Happened"})))
        try:
            (first,) = await take(subscription, 1)
            assert first.stream_id == "a"
            pending = asyncio.ensure_future(take(subscription, 2))
            await store.append("b", [new_event("Skip")], expected_version=1)
            await store.append("c", [new_event()], expected_version=0)
            await store.append("a", [new_event()], expected_version=1)
            live = await asyncio.wait_for(pending, 5)
            assert [(e.stream_id, e.stream_version) for e in live] == [("c", 1), ("a", 2)]
        finally:
            await subscription.aclose()

    async def test_subscribe_all_for_one_tenant_while_another_writes(
        self, store: EventStore
    ) -> None:
        # Catch-up over both tenants' history, then live while both write at
        # once from several tasks: tenant a's subscriber gets exactly a's
        # events, each once, in each stream's order.
        await store.append("a-0", [tenant_event("a"), tenant_event("a")], expected_version=0)
        await store.append("b-0", [tenant_event("b") for _ in range(5)], expected_version=0)
        written: dict[str, list[uuid.UUID]] = {"a": [], "b": []}
        for stream, tenant in (("a-0", "a"), ("b-0", "b")):
            written[tenant] += [e.event_id for e in await store.read_stream(stream)]
        subscription = store.subscribe_all(filter=EventFilter(tenant="a"))
        try:
            (first,) = await take(subscription, 1)
            assert first.event_id == written["a"][0]

            async def writer(tenant: str, w: int) -> None:
                version = 0
                for i in range(15):
                    size = 2 if i % 5 == 0 else 1
                    events = [tenant_event(tenant, n=i) for _ in range(size)]
                    result = await store.append(f"{tenant}-w{w}", events, expected_version=version)
                    version = result.last_version
                    written[tenant] += [e.event_id for e in events]
                    await asyncio.sleep(0)

            tasks = [writer(tenant, w) for tenant in ("b", "a") for w in range(3)]
            pending = asyncio.ensure_future(take(subscription, 1 + 3 * 18))
            await asyncio.gather(*tasks)
            got = [first, *await asyncio.wait_for(pending, 10)]
            assert all(e.tenant == "a" for e in got)
            ids = [e.event_id for e in got]
            assert len(set(ids)) == len(ids)
            assert set(ids) == set(written["a"])
            for stream in {e.stream_id for e in got}:
                versions = [e.stream_version for e in got if e.stream_id == stream]
                assert versions == list(range(1, len(versions) + 1))
            # Nothing else was delivered: the next event is a's next append,
            # not one of b's written before it.
            nxt = asyncio.ensure_future(take(subscription, 1))
            await store.append("b-0", [tenant_event("b")], expected_version=5)
            last = tenant_event("a")
            await store.append("a-0", [last], expected_version=2)
            (after,) = await asyncio.wait_for(nxt, 5)
            assert after.event_id == last.event_id
            # The subscription's order is the all-stream read's.
            page = await store.read_all(filter=EventFilter(tenant="a"))
            assert [e.event_id for e in page.events] == [*ids, last.event_id]
        finally:
            await subscription.aclose()

    async def test_import_keeps_ids_times_text_and_hashes(self, store: EventStore) -> None:
        chain = foreign_chain("imported", 4)
        result = await store.import_events("imported", chain)
        assert (result.written, result.already_present, result.last_version) == (4, 0, 4)
        read = await store.read_stream("imported")
        assert [
            (e.event_id, e.data_json, e.metadata_json, e.recorded_at, e.prev_hash, e.hash)
            for e in read
        ] == [
            (e.event_id, e.data_json, e.metadata_json, e.recorded_at, e.prev_hash, e.hash)
            for e in chain
        ]
        assert (await store.verify("imported")).ok
        # Appends continue the imported chain.
        await store.append("imported", [new_event()], expected_version=4)
        assert (await store.verify("imported")).ok

    async def test_import_is_idempotent_and_extends_a_prefix(self, store: EventStore) -> None:
        chain = foreign_chain("s", 5)
        assert (await store.import_events("s", chain[:2])).written == 2
        again = await store.import_events("s", chain[:2])
        assert (again.written, again.already_present) == (0, 2)
        longer = await store.import_events("s", chain)
        assert (longer.written, longer.already_present, longer.last_version) == (3, 2, 5)
        tail = await store.import_events("s", chain[3:])
        assert (tail.written, tail.already_present) == (0, 2)
        assert len(await store.read_stream("s")) == 5

    async def test_import_rejects_a_broken_chain_and_writes_nothing(
        self, store: EventStore
    ) -> None:
        chain = foreign_chain("s", 3)
        edited = list(chain)
        edited[2] = dataclasses.replace(chain[2], data_json='{"n":3,"s":"edited"}')
        with pytest.raises(InvalidArgumentError, match="version 3"):
            await store.import_events("s", edited)
        gap = [chain[0], chain[2]]
        with pytest.raises(InvalidArgumentError, match="consecutive"):
            await store.import_events("s", gap)
        with pytest.raises(InvalidArgumentError, match="genesis"):
            await store.import_events("s", [dataclasses.replace(chain[0], prev_hash=b"1" * 32)])
        with pytest.raises(InvalidArgumentError):
            await store.import_events("s", [])
        assert await store.read_stream("s") == ()

    async def test_import_over_different_history_is_refused(self, store: EventStore) -> None:
        await store.import_events("s", foreign_chain("s", 2, seed="mine"))
        with pytest.raises(HistoryDivergedError):
            await store.import_events("s", foreign_chain("s", 3, seed="theirs"))
        with pytest.raises(HistoryDivergedError):
            await store.import_events("s", foreign_chain("s", 4, seed="theirs")[2:])
        await store.append("t", [new_event()], expected_version=0)
        with pytest.raises(HistoryDivergedError):
            await store.import_events("t", foreign_chain("t", 1))
        # The same event ids under another stream name are duplicates.
        moved = foreign_chain("s", 1, seed="mine")
        with pytest.raises(DuplicateEventError):
            await store.import_events(
                "u",
                [
                    dataclasses.replace(
                        moved[0],
                        hash=event_hash(
                            stream_id="u",
                            **{
                                f.name: getattr(moved[0], f.name)
                                for f in dataclasses.fields(moved[0])
                                if f.name != "hash"
                            },
                        ),
                    )
                ],
            )
        assert len(await store.read_stream("s")) == 2
        assert await store.read_stream("u") == ()
