"""`EventStore` in process memory: the event log without a database.

What it is for: replaying and regenerating conversations from an exported
JSONL file (`turnlog replay --file x.jsonl --regenerate` imports the file
into this store and runs the real `ConversationApplication` over it), and
tests. It implements the whole port with the semantics of
`PostgresEventStore` (the contract suite, tests/storage/storage_contract.py,
runs on both):

- appends check the expected version and are idempotent by event id exactly
  as `turnlog.append_events` decides it (migration 0001): a batch whose ids
  are all stored, in this stream, in this order, with the same text, returns
  the original `AppendResult`; any other reuse of an id is a
  `DuplicateEventError`, reported before a version conflict;
- every batch is all or nothing: it is checked completely, then written
  without an `await` in between, so no other task sees half of it;
- the per-stream sha256 chain comes from `turnlog.storage.hashchain`;
- each append or import that writes takes the next transaction id, and its
  events the next global positions, so the all-stream order
  (transaction_id, global_position) is simply the order of writing and a
  `Position` works as a checkpoint as it does on PostgreSQL;
- each event's tenant (`RecordedEvent.tenant`) is decoded once, when it
  is written, into a per-tenant list in the all-stream order: a tenant
  filter reads only that list, its limit counts that tenant's events, and a
  page that reaches the end moves past the whole log, as PostgreSQL's index
  read does (migration 0002);
- `recorded_at` is UTC with microsecond precision and never earlier than
  any time stored before (the clock is clamped if it steps back);
- subscriptions read the log (catch-up), then wait on an `asyncio.Event`
  that the next write sets: woken directly, no polling.

What it does not do:

- no durability: everything is lost with the process (export the log, e.g.
  with `turnlog.history.jsonl`, to keep it);
- one process and one event loop: no other process can read it or subscribe
  to it, and it is not thread-safe;
- everything stays in memory (events, indexes, snapshots) until the store is
  dropped; `close()` ends subscriptions and refuses further calls, as the
  PostgreSQL store does once its pool is closed.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import types
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn, Self
from uuid import UUID

from turnlog.errors import (
    DuplicateEventError,
    HistoryDivergedError,
    InvalidArgumentError,
    StorageUnavailableError,
    VersionConflictError,
)

# The PostgreSQL adapter's argument checks, so that both reject the same
# input with the same messages.
from turnlog.storage.checks import check_import_batch, check_metadata, check_name
from turnlog.storage.hashchain import GENESIS_HASH, event_hash, verify_chain
from turnlog.storage.port import (
    START_POSITION,
    AppendResult,
    Direction,
    EventFilter,
    EventPage,
    ImportedEvent,
    ImportResult,
    NewEvent,
    Position,
    RawJson,
    RecordedEvent,
    Snapshot,
    VerificationReport,
    tenant_of,
)

if TYPE_CHECKING:
    from turnlog.storage.port import EventStore


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _order_key(event: RecordedEvent) -> tuple[int, int]:
    """The all-stream read order, as a tuple that compares with a checkpoint's."""
    return (event.transaction_id, event.global_position)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _check_json(text: str) -> None:
    """Rejects text that PostgreSQL's `json` type refuses (it checks on insert there).

    `json.loads` plus what it lets through: NaN and Infinity literals. Like
    the `json` type, escapes are only checked for syntax (an escaped lone
    surrogate is accepted); text that is not valid UTF-8 (a raw lone
    surrogate) is rejected, as it cannot be stored or hashed.
    """
    try:
        json.loads(text, parse_constant=_reject_constant)
        text.encode("utf-8")
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeError are ValueErrors
        raise InvalidArgumentError(f"event rejected by the event log: invalid JSON ({e})") from e


class InMemoryEventStore:
    """The event log in this process's memory; see the module docstring.

    Construct it directly (no I/O), use it as an async context manager or
    call `close()`. Safe for concurrent use by the tasks of one event loop.
    """

    def __init__(self, *, page_size: int = 500, clock: Callable[[], datetime] = _utc_now) -> None:
        """Creates an empty store.

        Args:
            page_size: events a subscription reads per step.
            clock: the current time, timezone-aware (tests pass a fake one);
                the store converts it to UTC and never lets it go backwards.
        """
        if page_size < 1:
            raise InvalidArgumentError("page_size must be >= 1")
        self._page_size = page_size
        self._clock = clock
        # Every event in the all-stream order, which is the order of writing,
        # and its tenant (decoded once, at write).
        self._log: list[RecordedEvent] = []
        self._log_tenants: list[str] = []
        # Per tenant, its events in the all-stream order (the PostgreSQL
        # store's tenant index).
        self._by_tenant: dict[str, list[RecordedEvent]] = {}
        # Per stream, its events in version order (version v at index v - 1).
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._by_id: dict[UUID, RecordedEvent] = {}
        # Per stream and (tenant, event type), the stream's latest such event.
        self._latest_by_type: dict[str, dict[tuple[str, str], RecordedEvent]] = {}
        # Per (stream, kind), the snapshots by version.
        self._snapshots: dict[tuple[str, str], dict[int, Snapshot]] = {}
        self._last_transaction_id = 0
        self._last_position = 0
        self._last_time = datetime.min.replace(tzinfo=UTC)
        # Set (and replaced by a fresh one) after every write. A subscriber
        # takes it *before* it reads, so a write that lands while it hands
        # out events still wakes it.
        self._written = asyncio.Event()
        self._closed = False

    async def close(self) -> None:
        """Ends every subscription; later calls raise `StorageUnavailableError`. Idempotent."""
        self._closed = True
        self._wake_subscribers()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageUnavailableError("the in-memory event store is closed")

    def _now(self) -> datetime:
        """The clock in UTC, never earlier than a time stored before."""
        now = max(self._clock().astimezone(UTC), self._last_time)
        self._last_time = now
        return now

    def _wake_subscribers(self) -> None:
        self._written.set()
        self._written = asyncio.Event()

    def _write(self, stream_id: str, events: list[RecordedEvent]) -> None:
        """Stores events already numbered and chained (no `await`: atomic)."""
        stream = self._streams.setdefault(stream_id, [])
        latest = self._latest_by_type.setdefault(stream_id, {})
        for event in events:
            tenant = tenant_of(event.metadata_json)
            self._log.append(event)
            self._log_tenants.append(tenant)
            self._by_tenant.setdefault(tenant, []).append(event)
            stream.append(event)
            self._by_id[event.event_id] = event
            latest[tenant, event.type] = event
        self._last_time = max(self._last_time, *(e.recorded_at for e in events))
        self._wake_subscribers()

    def _next_transaction_id(self) -> int:
        self._last_transaction_id += 1
        return self._last_transaction_id

    def _next_position(self) -> int:
        self._last_position += 1
        return self._last_position

    # -- writing ----------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
    ) -> AppendResult:
        """Appends a batch atomically; see `EventStore.append`."""
        self._check_open()
        check_name("stream id", stream_id)
        if not events:
            raise InvalidArgumentError("an append needs at least one event")
        if expected_version is not None and expected_version < 0:
            raise InvalidArgumentError("expected_version must be >= 0 or None")
        data: list[str] = []
        metadata: list[str] = []
        for event in events:
            check_name("event type", event.type)
            text = event.data_json()
            if isinstance(event.data, RawJson):
                if "\x00" in text:
                    raise InvalidArgumentError("raw JSON must not contain NUL characters")
                _check_json(text)  # encode_json's output is JSON already
            check_metadata(event.metadata)
            data.append(text)
            metadata.append(event.metadata.to_json())
        if len({e.event_id for e in events}) != len(events):
            raise InvalidArgumentError("a batch must not repeat an event id")

        if any(e.event_id in self._by_id for e in events):
            return self._retried_append(stream_id, events, data, metadata)
        stream = self._streams.get(stream_id, [])
        actual = len(stream)
        if expected_version is not None and expected_version != actual:
            raise VersionConflictError(stream_id, expected_version, actual)

        transaction_id = self._next_transaction_id()
        recorded_at = self._now()
        prev_hash = stream[-1].hash if stream else GENESIS_HASH
        written: list[RecordedEvent] = []
        for offset, event in enumerate(events):
            version = actual + 1 + offset
            digest = event_hash(
                prev_hash=prev_hash,
                stream_id=stream_id,
                stream_version=version,
                event_id=event.event_id,
                type=event.type,
                data_json=data[offset],
                metadata_json=metadata[offset],
                recorded_at=recorded_at,
            )
            written.append(
                RecordedEvent(
                    global_position=self._next_position(),
                    transaction_id=transaction_id,
                    stream_id=stream_id,
                    stream_version=version,
                    event_id=event.event_id,
                    type=event.type,
                    data_json=data[offset],
                    metadata_json=metadata[offset],
                    recorded_at=recorded_at,
                    prev_hash=prev_hash,
                    hash=digest,
                )
            )
            prev_hash = digest
        self._write(stream_id, written)
        return AppendResult(
            stream_id=stream_id,
            first_version=actual + 1,
            last_version=actual + len(events),
            positions=tuple(e.global_position for e in written),
            recorded_at=recorded_at,
        )

    def _retried_append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        data: Sequence[str],
        metadata: Sequence[str],
    ) -> AppendResult:
        """A batch reusing stored ids: the original result if it is an exact retry.

        An exact retry has every id stored, in this stream, at consecutive
        versions from the first id's on, with the same type and JSON text;
        anything else is a `DuplicateEventError`. The expected version is not
        checked (a retry names the version the original append saw).
        """
        stored = [self._by_id.get(e.event_id) for e in events]
        first = stored[0]
        if first is not None and all(
            s is not None
            and s.stream_id == stream_id
            and s.stream_version == first.stream_version + offset
            and s.type == e.type
            and s.data_json == data[offset]
            and s.metadata_json == metadata[offset]
            for offset, (s, e) in enumerate(zip(stored, events, strict=True))
        ):
            originals = [s for s in stored if s is not None]
            return AppendResult(
                stream_id=stream_id,
                first_version=originals[0].stream_version,
                last_version=originals[-1].stream_version,
                positions=tuple(s.global_position for s in originals),
                recorded_at=min(s.recorded_at for s in originals),
            )
        reused = next(e.event_id for e in events if e.event_id in self._by_id)
        raise DuplicateEventError(
            f"event {reused} is stored already with other content or stream",
            metadata={"eventId": str(reused)},
        )

    async def import_events(self, stream_id: str, events: Sequence[ImportedEvent]) -> ImportResult:
        """Stores events from another log verbatim; see `EventStore.import_events`."""
        self._check_open()
        check_name("stream id", stream_id)
        check_import_batch(stream_id, events)  # consecutive versions, a valid chain
        stream = self._streams.get(stream_id, [])
        head = len(stream)
        first = events[0].stream_version
        if first > 1 and (first - 1 > head or stream[first - 2].hash != events[0].prev_hash):
            raise HistoryDivergedError(
                f"stream {stream_id!r} does not hold the history this import extends"
                f" (version {first - 1})",
                metadata={"streamId": stream_id, "version": str(first - 1)},
            )
        present = 0
        for event in events:
            if event.stream_version > head:
                break
            stored = stream[event.stream_version - 1]
            if (stored.event_id, stored.hash) != (event.event_id, event.hash):
                raise HistoryDivergedError(
                    f"stream {stream_id!r} holds a different event at version"
                    f" {event.stream_version}",
                    metadata={"streamId": stream_id, "version": str(event.stream_version)},
                )
            present += 1
        new = events[present:]
        if new:
            for event in new:
                _check_json(event.data_json)
                _check_json(event.metadata_json)
            new_ids = {e.event_id for e in new}
            if len(new_ids) != len(new) or not new_ids.isdisjoint(self._by_id):
                raise DuplicateEventError(
                    "an imported event id is stored already in another stream"
                    " or at another version",
                    metadata={"streamId": stream_id},
                )
            transaction_id = self._next_transaction_id()
            self._write(
                stream_id,
                [
                    RecordedEvent(
                        global_position=self._next_position(),
                        transaction_id=transaction_id,
                        stream_id=stream_id,
                        stream_version=e.stream_version,
                        event_id=e.event_id,
                        type=e.type,
                        data_json=e.data_json,
                        metadata_json=e.metadata_json,
                        recorded_at=e.recorded_at.astimezone(UTC),
                        prev_hash=e.prev_hash,
                        hash=e.hash,
                    )
                    for e in new
                ],
            )
        return ImportResult(
            stream_id=stream_id,
            written=len(new),
            already_present=present,
            last_version=max(head, events[-1].stream_version),
        )

    # -- reading ----------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        direction: Direction = Direction.FORWARDS,
        limit: int | None = None,
    ) -> tuple[RecordedEvent, ...]:
        """Reads one stream in version order; see `EventStore.read_stream`."""
        self._check_open()
        if limit is not None and limit < 0:
            raise InvalidArgumentError("limit must be >= 0")
        stream = self._streams.get(stream_id, [])
        if direction is Direction.FORWARDS:
            start = 0 if from_version is None else max(from_version - 1, 0)
            end = len(stream) if limit is None else start + limit
            return tuple(stream[start:end])
        top = len(stream) if from_version is None else min(max(from_version, 0), len(stream))
        bottom = 0 if limit is None else max(top - limit, 0)
        return tuple(reversed(stream[bottom:top]))

    async def read_all(
        self,
        *,
        after: Position = START_POSITION,
        limit: int = 1000,
        filter: EventFilter | None = None,
    ) -> EventPage:
        """Reads all streams after a checkpoint; see `EventStore.read_all`."""
        self._check_open()
        if limit < 1:
            raise InvalidArgumentError("limit must be >= 1")
        return self._read_page(after, limit, filter)

    def _read_page(self, after: Position, limit: int, filter: EventFilter | None) -> EventPage:
        checkpoint = (after.transaction_id, after.global_position)
        if filter is not None and filter.tenant is not None:
            # As PostgreSQL reads it: only this tenant's events count against
            # the limit, and a page that reaches the end moves past the
            # whole log, other tenants' events included.
            tenant = filter.tenant
            own = self._by_tenant.get(tenant, [])
            start = bisect.bisect_right(own, checkpoint, key=_order_key)
            scanned = own[start : start + limit]
            reached_end = len(scanned) < limit
            if not reached_end:
                next_position = scanned[-1].position
            elif self._log:
                next_position = max(after, self._log[-1].position)
            else:
                next_position = after
            return EventPage(
                events=tuple(e for e in scanned if filter.matches(e.stream_id, e.type, tenant)),
                next_position=next_position,
                reached_end=reached_end,
            )
        start = bisect.bisect_right(self._log, checkpoint, key=_order_key)
        scanned = self._log[start : start + limit]
        tenants = self._log_tenants[start : start + limit]
        return EventPage(
            events=tuple(
                e
                for e, tenant in zip(scanned, tenants, strict=True)
                if filter is None or filter.matches(e.stream_id, e.type, tenant)
            ),
            next_position=scanned[-1].position if scanned else after,
            reached_end=len(scanned) < limit,
        )

    async def latest_events_of_types(
        self,
        types: Collection[str],
        *,
        stream_prefix: str = "",
        last_type: str | None = None,
        tenant: str | None = None,
    ) -> tuple[RecordedEvent, ...]:
        """Per stream, the latest event of `types`; see `EventStore.latest_events_of_types`.

        Looks up a per-stream index of each type's latest event: no scan of
        the events.

        Raises:
            InvalidArgumentError: `types` is empty.
        """
        self._check_open()
        if not types:
            raise InvalidArgumentError("types must name at least one event type")
        wanted = set(types)
        found: list[RecordedEvent] = []
        for stream_id in sorted(s for s in self._latest_by_type if s.startswith(stream_prefix)):
            candidates = [
                event
                for (event_tenant, event_type), event in self._latest_by_type[stream_id].items()
                if event_type in wanted and (tenant is None or event_tenant == tenant)
            ]
            if not candidates:
                continue
            newest = max(candidates, key=lambda e: e.stream_version)
            if last_type is None or newest.type == last_type:
                found.append(newest)
        return tuple(found)

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version, 0 if it does not exist."""
        self._check_open()
        return len(self._streams.get(stream_id, ()))

    # -- subscriptions ----------------------------------------------------

    async def subscribe_all(
        self,
        *,
        after: Position = START_POSITION,
        filter: EventFilter | None = None,
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Catch-up then live over all streams; see `EventStore.subscribe_all`.

        Ends when the store is closed.
        """
        position = after
        while not self._closed:
            written = self._written
            page = self._read_page(position, self._page_size, filter)
            for event in page.events:
                yield event
            position = page.next_position
            if page.reached_end:
                await written.wait()

    async def subscribe_stream(
        self, stream_id: str, *, after_version: int = 0
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Catch-up then live over one stream; see `EventStore.subscribe_stream`.

        Ends when the store is closed.
        """
        version = max(after_version, 0)
        while not self._closed:
            written = self._written
            stream = self._streams.get(stream_id, [])
            events = stream[version : version + self._page_size]
            for event in events:
                yield event
                version = event.stream_version
            if len(events) < self._page_size:
                await written.wait()

    # -- snapshots and verification ---------------------------------------

    async def save_snapshot(
        self, stream_id: str, *, kind: str, stream_version: int, state: bytes
    ) -> None:
        """Stores derived state at a version; see `EventStore.save_snapshot`."""
        self._check_open()
        check_name("snapshot kind", kind)
        if not 1 <= stream_version <= len(self._streams.get(stream_id, ())):
            raise InvalidArgumentError(
                f"stream {stream_id!r} has no event at version {stream_version} to snapshot"
            )
        self._snapshots.setdefault((stream_id, kind), {})[stream_version] = Snapshot(
            stream_id=stream_id,
            kind=kind,
            stream_version=stream_version,
            state=bytes(state),
            recorded_at=self._now(),
        )

    async def load_snapshot(
        self, stream_id: str, *, kind: str, max_version: int | None = None
    ) -> Snapshot | None:
        """The latest snapshot at or below `max_version`; see `EventStore.load_snapshot`."""
        self._check_open()
        by_version = self._snapshots.get((stream_id, kind), {})
        versions = [v for v in by_version if max_version is None or v <= max_version]
        return by_version[max(versions)] if versions else None

    async def verify(self, stream_id: str) -> VerificationReport:
        """Recomputes the stream's hash chain; see `EventStore.verify`."""
        self._check_open()
        return verify_chain(stream_id, self._streams.get(stream_id, ()))


if TYPE_CHECKING:
    # mypy checks here that this adapter implements the whole port.
    _implements_port: EventStore = InMemoryEventStore()
