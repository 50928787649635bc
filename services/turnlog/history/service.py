"""Reading, following, forking, verifying, exporting and importing conversation logs.

`HistoryService` is the application layer of the history RPCs; the gRPC
servicer adapts it. It needs only the `EventStore` port and the pure domain.
docs/history.md explains the formats and the choices made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from turnlog import errors
from turnlog.conversation.paging import make_token, read_token
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, fold
from turnlog.eventlog import (
    STREAM_PREFIX,
    Clock,
    conversation_of,
    derived_id,
    new_event,
    stream_id,
    wall_clock_us,
    with_tenant,
)
from turnlog.history import jsonl
from turnlog.history.audit import AuditReport, audit_stream
from turnlog.storage import (
    ANY_VERSION,
    NO_STREAM,
    START_POSITION,
    EventFilter,
    EventMetadata,
    EventStore,
    NewEvent,
    Position,
    RawJson,
    RecordedEvent,
)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_READ_BATCH = 1000
#: Export chunks are about this many bytes (whole lines; a longer line is one chunk).
EXPORT_CHUNK_BYTES = 64 * 1024
#: A `read_events` page stops before its events' `event_size` would pass this.
PAGE_MAX_BYTES = 2 * 1024 * 1024
#: A `subscribe` batch holds at most this many events ...
BATCH_MAX_EVENTS = 1000
#: ... and stops before their `event_size` would pass this.
BATCH_MAX_BYTES = 1024 * 1024
#: A live subscription to all conversations with a type filter checks, after
#: this many seconds without a message, whether it can send a `Checkpoint`.
CHECKPOINT_AFTER_SECONDS = 5.0
#: What a LogEvent message holds beyond its texts, at most: event id, hashes,
#: version, position, time, the "conversations/" prefix, field tags and lengths
#: (and the tag and length that embed it in a repeated field).
_EVENT_OVERHEAD_BYTES = 256

#: The size in bytes that an event takes in a response, for the page and batch
#: caps: `event_size` for events sent as stored, or what the caller measures.
Sizer = Callable[[RecordedEvent], int]


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def event_size(event: RecordedEvent) -> int:
    """An upper bound of the event's encoded size as sent (a `turnlog.v1.LogEvent`), in bytes.

    Its texts in UTF-8 (payload, metadata, type, the stream id twice: as
    stream id and in the conversation name) plus a fixed allowance for the rest.
    """
    data, meta, kind, sid = event.data_json, event.metadata_json, event.type, event.stream_id
    if data.isascii() and meta.isascii() and kind.isascii() and sid.isascii():  # the usual case
        return _EVENT_OVERHEAD_BYTES + len(data) + len(meta) + len(kind) + 2 * len(sid)
    return (
        _EVENT_OVERHEAD_BYTES
        + _utf8_len(data)
        + _utf8_len(meta)
        + _utf8_len(kind)
        + 2 * _utf8_len(sid)
    )


def _fitting(
    events: Sequence[RecordedEvent], room: int, *, at_least_one: bool, size: Sizer = event_size
) -> tuple[int, int]:
    """How many of the first `events` fit in `room` bytes (by `size`), and their size.

    With `at_least_one`, the first event counts as fitting whatever its size.
    """
    used = 0
    for i, event in enumerate(events):
        n = size(event)
        if used + n > room and (i or not at_least_one):
            return i, used
        used += n
    return len(events), used


def batches(
    events: Iterable[RecordedEvent],
    *,
    max_events: int,
    max_bytes: int,
    size: Sizer = event_size,
) -> Iterator[tuple[RecordedEvent, ...]]:
    """The events in order, cut into batches of at most `max_events` and `max_bytes`.

    A batch is cut before the event that would take it past `max_bytes`
    (by `size`); an event larger than that alone is a batch of its own.
    No batch is empty.
    """
    batch: list[RecordedEvent] = []
    used = 0
    for event in events:
        n = size(event)
        if batch and (len(batch) == max_events or used + n > max_bytes):
            yield tuple(batch)
            batch, used = [], 0
        batch.append(event)
        used += n
    if batch:
        yield tuple(batch)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventQuery:
    """What `read_events` and `subscribe` select.

    Attributes:
        conversation_id: one conversation, or None for all conversations.
        after_version: one conversation: only events with a higher version.
        after_position: all conversations: only events after this checkpoint.
        types: only these event types (None: all).
    """

    conversation_id: str | None = None
    after_version: int = 0
    after_position: Position = START_POSITION
    types: frozenset[str] | None = None
    tenant: str | None = ev.DEFAULT_TENANT
    """The caller's tenant: only its conversations (None: every tenant's, an administrator)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventPage:
    """A page of `read_events`; `next_page_token` is "" when nothing more is readable now."""

    events: tuple[RecordedEvent, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CaughtUp:
    """Marks the end of a subscription's catch-up; live events follow.

    Attributes:
        version: one conversation: the version read up to.
        position: all conversations: the checkpoint read up to (past filtered-out events).
    """

    version: int = 0
    position: Position = START_POSITION


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A subscription to all conversations of some types has read the log up to `position`.

    It passed over events it does not select, up to `position`, and every
    event it sends later is after it: a follower resumes after it (as after
    an event's position) without reading those events again.
    """

    position: Position


@dataclass(frozen=True, slots=True, kw_only=True)
class ForkCommand:
    """Fork `source_id` at `version` (latest when None) into `fork_id` (derived when empty)."""

    source_id: str
    version: int | None = None
    fork_id: str = ""
    request_id: str = ""
    tenant: str = ev.DEFAULT_TENANT
    """The caller's tenant: the source must be its own, and so is the fork."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForkResult:
    """A fork and where in it the source's state is reproduced.

    Attributes:
        state: the fork, folded to its latest version.
        source_version: the source version copied.
        prefix_version: the fork's version whose state equals the source's
            at `source_version` (apart from id, creation time and fork origin).
        interrupted_turn_id: the turn open at `source_version`, closed in the
            fork with `TurnInterrupted`; "" when none was open.
    """

    state: ConversationState
    source_version: int
    prefix_version: int
    interrupted_turn_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportOutcome:
    """What an import did: the conversation (folded), events written and already present."""

    state: ConversationState
    written: int
    already_present: int


#: The stream recording administrators' cross-tenant reads (not a conversation:
#: no conversation read returns it).
ADMIN_READS_STREAM = "admin-reads"


class HistoryService:
    """The history operations over an event store.

    Args:
        store: the event log.
        clock: microseconds since the Unix epoch (the fork time); injected for tests.
        instance: recorded as the actor of the events this service writes.
        checkpoint_after: seconds without a message after which a live
            subscription to all conversations of some types looks for a
            `Checkpoint` to send (default `CHECKPOINT_AFTER_SECONDS`).
    """

    def __init__(
        self,
        store: EventStore,
        *,
        clock: Clock = wall_clock_us,
        instance: str = "history",
        checkpoint_after: float | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.instance = instance
        self.checkpoint_after = (
            CHECKPOINT_AFTER_SECONDS if checkpoint_after is None else checkpoint_after
        )

    # -- reading -------------------------------------------------------------

    async def read_events(
        self,
        query: EventQuery,
        *,
        page_size: int,
        page_token: str,
        max_bytes: int = PAGE_MAX_BYTES,
        size: Sizer = event_size,
    ) -> EventPage:
        """One page of events of one conversation (by version) or of all (in log order).

        A page holds at most `page_size` events and stops before the event
        that would take its total `size` past `max_bytes` (it always holds
        one event at least). A page token continues exactly after the
        last event scanned, or after the last event returned when `max_bytes`
        cut the page, so paging returns every selected event once. The token
        is bound to the query's conversation and types.

        Raises:
            InvalidArgumentError: a malformed token, or one made for another query.
        """
        types = sorted(query.types) if query.types is not None else None
        scope = {"c": query.conversation_id or "", "t": types}
        after_version, after_position = query.after_version, query.after_position
        if page_token:
            saved = read_token(page_token)
            if {"c": saved.get("c"), "t": saved.get("t")} != scope:
                raise errors.PageTokenError("the page token was made for another query")
            try:
                if query.conversation_id is not None:
                    after_version = int(str(saved["a"]))
                    if not 0 <= after_version < 2**63 - 1:  # a bigint, one past it too
                        raise ValueError("version out of range")
                else:
                    after_position = Position.parse(str(saved["a"]))
            except (KeyError, ValueError, errors.InvalidArgumentError) as e:
                raise errors.PageTokenError("malformed page token") from e
        collected: list[RecordedEvent] = []
        taken = 0  # bytes, by `size`
        full = False  # the byte cap cut the page
        if query.conversation_id is not None:
            sid = stream_id(query.conversation_id)
            await self._check_owner(query.conversation_id, query.tenant)
            more = True
            while more and not full and len(collected) < page_size:
                batch = await self.store.read_stream(
                    sid, from_version=after_version + 1, limit=page_size - len(collected)
                )
                more = len(batch) == page_size - len(collected)
                selected = (
                    batch if query.types is None else [e for e in batch if e.type in query.types]
                )
                count, used = _fitting(
                    selected, max_bytes - taken, at_least_one=not collected, size=size
                )
                collected.extend(selected[:count])
                taken += used
                if count < len(selected):  # cut: continue right before the first event left out
                    full = True
                    after_version = selected[count].stream_version - 1
                elif batch:
                    after_version = batch[-1].stream_version
            token = make_token({**scope, "a": after_version}) if more or full else ""
            return EventPage(events=tuple(collected), next_page_token=token)
        event_filter = EventFilter(
            types=query.types, stream_prefix=STREAM_PREFIX, tenant=query.tenant
        )
        reached_end = False
        while not reached_end and not full and len(collected) < page_size:
            page = await self.store.read_all(
                after=after_position, limit=page_size - len(collected), filter=event_filter
            )
            count, used = _fitting(
                page.events, max_bytes - taken, at_least_one=not collected, size=size
            )
            collected.extend(page.events[:count])
            taken += used
            if count < len(page.events):  # cut: continue right after the last event returned
                full = True
                if count:
                    after_position = page.events[count - 1].position
            else:
                after_position = page.next_position
                reached_end = page.reached_end
        token = "" if reached_end else make_token({**scope, "a": str(after_position)})
        return EventPage(events=tuple(collected), next_page_token=token)

    async def subscribe(
        self,
        query: EventQuery,
        *,
        max_events: int = BATCH_MAX_EVENTS,
        max_bytes: int = BATCH_MAX_BYTES,
        size: Sizer = event_size,
    ) -> AsyncIterator[tuple[RecordedEvent, ...] | CaughtUp | Checkpoint]:
        """Catch-up from the query's start, one `CaughtUp`, then live events; never ends.

        Events come in batches (never empty), cut by `batches` to at most
        `max_events` events and `max_bytes` (by `size`): in the catch-up, the
        selected events of each store page read; live, the events waiting
        when the previous batch has been taken (those that arrived together).

        All conversations with `types`: a `Checkpoint` follows each store
        page of the catch-up that ends with events not selected (not the
        last: `CaughtUp` follows it), and, live, one is looked for after
        `checkpoint_after` seconds without a message (`_checkpointed`).

        Resume after a disconnect with the last event's version (one
        conversation) or position (all), or the last `CaughtUp`'s or
        `Checkpoint`'s: nothing is lost and nothing repeated.
        """
        live: AsyncGenerator[RecordedEvent, None]
        if query.conversation_id is not None:
            sid = stream_id(query.conversation_id)
            await self._check_owner(query.conversation_id, query.tenant)
            types = query.types
            version = query.after_version
            while True:
                page = await self.store.read_stream(
                    sid, from_version=version + 1, limit=_READ_BATCH
                )
                if page:
                    version = page[-1].stream_version
                selected = page if types is None else [e for e in page if e.type in types]
                for batch in batches(
                    selected, max_events=max_events, max_bytes=max_bytes, size=size
                ):
                    yield batch
                if len(page) < _READ_BATCH:
                    break
            yield CaughtUp(version=version)
            live = self.store.subscribe_stream(sid, after_version=version)
            if types is not None:
                live = _only_types(live, types)
        else:
            position = query.after_position
            event_filter = EventFilter(
                types=query.types, stream_prefix=STREAM_PREFIX, tenant=query.tenant
            )
            checkpoints = query.types is not None
            while True:
                all_page = await self.store.read_all(
                    after=position, limit=_READ_BATCH, filter=event_filter
                )
                for batch in batches(
                    all_page.events, max_events=max_events, max_bytes=max_bytes, size=size
                ):
                    yield batch
                position = all_page.next_position
                if all_page.reached_end:
                    break
                if checkpoints and (
                    not all_page.events or all_page.events[-1].position != position
                ):
                    yield Checkpoint(position=position)
            yield CaughtUp(position=position)
            live = self.store.subscribe_all(after=position, filter=event_filter)
            if checkpoints:
                arriving = _arrived_together(
                    live,
                    max_events=max_events,
                    max_bytes=max_bytes,
                    size=size,
                    idle_after=self.checkpoint_after,
                )
                async with contextlib.aclosing(
                    self._checkpointed(arriving, after=position, event_filter=event_filter)
                ) as items:
                    async for item in items:
                        yield item
                return
        arriving = _arrived_together(live, max_events=max_events, max_bytes=max_bytes, size=size)
        async with contextlib.aclosing(arriving):
            async for batch in arriving:
                yield batch

    async def _checkpointed(
        self,
        arriving: AsyncGenerator[tuple[RecordedEvent, ...], None],
        *,
        after: Position,
        event_filter: EventFilter,
    ) -> AsyncGenerator[tuple[RecordedEvent, ...] | Checkpoint, None]:
        """The live batches of an all-conversation subscription, with `Checkpoint`s between.

        `arriving` yields an empty batch when nothing arrived for a while
        (`_arrived_together`'s `idle_after`); then the log is read after the
        last position sent, with the subscription's filter, page by page
        while a page selects nothing: the position those pages passed, if
        past the last sent, is a checkpoint. It is safe because the store's
        all-stream order never skips: no event can later appear at or before
        a position a read has passed, so every event the subscription sends
        later is after the checkpoint (an event the read found, that the live
        subscription has not delivered yet, is after the pages passed).
        Closing this closes `arriving`.
        """
        sent = after
        async with contextlib.aclosing(arriving):
            async for batch in arriving:
                if batch:
                    sent = batch[-1].position
                    yield batch
                    continue
                passed = await self._pass_unselected(sent, event_filter)
                if passed > sent:
                    sent = passed
                    yield Checkpoint(position=passed)

    async def _pass_unselected(self, after: Position, event_filter: EventFilter) -> Position:
        """How far the log can be read after `after` without `event_filter` selecting an event."""
        position = after
        while True:
            page = await self.store.read_all(after=position, limit=_READ_BATCH, filter=event_filter)
            if page.events:
                return position
            position = page.next_position
            if page.reached_end:
                return position

    # -- fork ------------------------------------------------------------------------

    async def fork(self, command: ForkCommand) -> ForkResult:
        """A new conversation whose stream is `ConversationForked` + a copy of the source's prefix.

        Copies keep their payload text verbatim (new event ids, metadata with
        the source event as causation), re-hashed in the fork's own chain, so
        the fork folds, verifies and exports on its own. A source that is a
        fork itself is copied without its own `ConversationForked`. A turn
        open at the fork version is closed in the fork by `TurnInterrupted`.
        Idempotent by `request_id`: the fork's id derives from it (unless
        given), and a retry (the same source, and the same version or none)
        returns the same fork, even after the source moved on.

        Raises:
            NotFoundError: no such conversation or version.
            RequestIdReusedError: the request id made a fork of another
                source or version (nothing is recorded).
            AlreadyExistsError: the fork id is taken by something else.
        """
        fork_id = command.fork_id or (
            derived_id("fork", command.tenant, command.request_id)
            if command.request_id
            else str(uuid.uuid4())
        )
        if command.request_id:
            retried = await self._fork_of_request(fork_id, command)
            if retried is not None:
                return retried
        src_sid = stream_id(command.source_id)
        latest = await self.store.stream_version(src_sid)
        version = latest if command.version is None else command.version
        if latest == 0 or version > latest or version < 1:
            raise errors.NotFoundError(
                f"conversation {command.source_id!r} has no version {version}",
                metadata={"conversation": command.source_id, "version": str(version)},
            )
        prefix = await self.store.read_stream(src_sid, limit=version)
        source_state = fold(codec.decode_stored(e) for e in prefix)
        if not source_state.exists or source_state.tenant != command.tenant:
            raise errors.NotFoundError(
                f"conversation {command.source_id!r} does not exist at version {version}",
                metadata={"conversation": command.source_id, "version": str(version)},
            )
        forked = ev.ConversationForked(
            conversation_id=fork_id,
            source_conversation_id=command.source_id,
            source_version=version,
            forked_at_us=self.clock(),
            tenant=command.tenant,
        )
        new_events = [self._event(derived_id(fork_id, "forked"), forked, command.request_id)]
        domain_events: list[ev.Event] = [forked]
        for i, source in enumerate(prefix):
            if i == 0 and source.type == "ConversationForked":
                continue
            meta = dataclasses.replace(source.metadata, causation_id=str(source.event_id))
            new_events.append(
                NewEvent(
                    event_id=uuid.UUID(derived_id(fork_id, "copy", str(source.event_id))),
                    type=source.type,
                    data=RawJson(text=source.data_json),
                    metadata=meta,
                )
            )
            domain_events.append(codec.decode_stored(source))
        prefix_version = len(new_events)
        open_turn = source_state.open_turn
        if open_turn is not None:
            interrupted = ev.TurnInterrupted(
                turn_id=open_turn.turn_id, detected_at_us=forked.forked_at_us
            )
            new_events.append(
                self._event(derived_id(fork_id, "interrupted"), interrupted, command.request_id)
            )
            domain_events.append(interrupted)
        fork_sid = stream_id(fork_id)
        new_events = [with_tenant(e, command.tenant) for e in new_events]
        try:
            await self.store.append(fork_sid, new_events, expected_version=NO_STREAM)
        except (errors.VersionConflictError, errors.DuplicateEventError) as e:
            # A concurrent retry won the race: answered as any retry.
            retried = await self._fork_of_request(fork_id, command) if command.request_id else None
            if retried is not None:
                return retried
            raise errors.AlreadyExistsError(
                f"conversation {fork_id!r} exists already", metadata={"conversation": fork_id}
            ) from e
        return ForkResult(
            state=fold(domain_events),
            source_version=version,
            prefix_version=prefix_version,
            interrupted_turn_id=open_turn.turn_id if open_turn else "",
        )

    async def record_admin_read(
        self, *, subject: str, tenant: str, method: str, target: str
    ) -> None:
        """Records that an administrator read across tenants (stream `ADMIN_READS_STREAM`).

        Raises:
            StorageUnavailableError: not recorded; the read must not go ahead.
        """
        read = {"subject": subject, "method": method, "target": target, "at_us": self.clock()}
        event = NewEvent(
            event_id=uuid.uuid4(),
            type="AdminRead",
            data=read,
            metadata=EventMetadata(actor=self.instance, tenant=tenant),
        )
        await self.store.append(ADMIN_READS_STREAM, [event], expected_version=ANY_VERSION)

    async def _check_owner(self, conversation_id: str, tenant: str | None) -> None:
        """Not found unless the conversation exists and is `tenant`'s (None: anyone's)."""
        first = await self.store.read_stream(stream_id(conversation_id), limit=1)
        if not first or not _owned_by(first[0], tenant):
            raise errors.NotFoundError(
                f"conversation {conversation_id!r} not found",
                metadata={"conversation": conversation_id},
            )

    def _event(self, event_id: str, event: ev.Event, request_id: str) -> NewEvent:
        return new_event(event_id, event, actor=self.instance, correlation=request_id)

    # -- verify, export, import -------------------------------------------------------

    async def _all_events(self, sid: str, up_to: int | None = None) -> list[RecordedEvent]:
        events: list[RecordedEvent] = []
        while True:
            limit = _READ_BATCH if up_to is None else min(_READ_BATCH, up_to - len(events))
            if limit <= 0:
                return events
            batch = await self.store.read_stream(sid, from_version=len(events) + 1, limit=limit)
            events.extend(batch)
            if len(batch) < limit:
                return events

    async def _fork_of_request(self, fork_id: str, command: ForkCommand) -> ForkResult | None:
        """The fork `command.request_id` made already, or None when there is none yet.

        Raises:
            RequestIdReusedError: the request id made a fork of another source
                or version.
            AlreadyExistsError: `fork_id` is another conversation.
        """
        stored = await self.store.read_stream(stream_id(fork_id))
        if not stored:
            return None
        first = stored[0]
        if (
            first.type != "ConversationForked"
            or first.metadata.tenant != command.tenant
            or first.metadata.correlation_id != command.request_id
        ):
            raise errors.AlreadyExistsError(
                f"conversation {fork_id!r} exists already", metadata={"conversation": fork_id}
            )
        source, version = first.data.get("source_conversation_id"), first.data.get("source_version")
        if source != command.source_id or command.version not in (None, version):
            raise errors.RequestIdReusedError(
                f"request id {command.request_id!r} forked another conversation or version",
                metadata={"originalId": fork_id},
            )
        state = fold(codec.decode_stored(x) for x in stored)
        # The events the fork itself wrote, known by their derived ids.
        copies = {
            uuid.UUID(derived_id(fork_id, "copy", x.metadata.causation_id))
            for x in stored
            if x.metadata.causation_id
        }
        copied = sum(1 for x in stored if x.event_id in copies)
        closed = uuid.UUID(derived_id(fork_id, "interrupted"))
        interrupted = next((x.data.get("turn_id", "") for x in stored if x.event_id == closed), "")
        return ForkResult(
            state=state,
            source_version=int(version) if isinstance(version, int) else 0,
            prefix_version=1 + copied,
            interrupted_turn_id=str(interrupted),
        )

    async def verify(
        self, conversation_id: str, *, tenant: str | None = ev.DEFAULT_TENANT
    ) -> AuditReport:
        """Checks the conversation's hash chain and folds it (no snapshot is used).

        Raises:
            NotFoundError: the stream holds no events, or is not `tenant`'s.
        """
        sid = stream_id(conversation_id)
        events = await self.store.read_stream(sid)
        if not events or not _owned_by(events[0], tenant):
            raise errors.NotFoundError(
                f"conversation {conversation_id!r} not found",
                metadata={"conversation": conversation_id},
            )
        return audit_stream(sid, events)

    async def export_jsonl(
        self,
        conversation_id: str,
        *,
        version: int | None = None,
        tenant: str | None = ev.DEFAULT_TENANT,
    ) -> AsyncIterator[bytes]:
        """The conversation's JSONL export, in chunks of whole lines.

        Raises:
            NotFoundError: no such conversation, or fewer than `version` events.
        """
        sid = stream_id(conversation_id)
        events = await self._all_events(sid, version)
        if (
            not events
            or not _owned_by(events[0], tenant)
            or (version is not None and len(events) < version)
        ):
            raise errors.NotFoundError(
                f"conversation {conversation_id!r} not found at that version",
                metadata={"conversation": conversation_id},
            )
        chunk: list[bytes] = []
        size = 0
        for line in jsonl.write_jsonl(events):
            raw = line.encode("utf-8")
            if chunk and size + len(raw) > EXPORT_CHUNK_BYTES:
                yield b"".join(chunk)
                chunk, size = [], 0
            chunk.append(raw)
            size += len(raw)
        yield b"".join(chunk)

    async def export_atif(
        self,
        conversation_id: str,
        *,
        version: int | None = None,
        tenant: str | None = ev.DEFAULT_TENANT,
    ) -> AsyncIterator[bytes]:
        """The conversation as one ATIF trajectory (JSON), from `turnlog.history.atif`.

        Raises:
            NotFoundError: no such conversation, or fewer than `version` events.
            ExportFormatUnavailableError: the ATIF exporter is not available.
        """
        try:
            from turnlog.history import atif

            export_atif = atif.export_atif
        except (ImportError, AttributeError) as e:
            raise ExportFormatUnavailableError("ATIF export is not available") from e
        sid = stream_id(conversation_id)
        events = await self._all_events(sid, version)
        if (
            not events
            or not _owned_by(events[0], tenant)
            or (version is not None and len(events) < version)
        ):
            raise errors.NotFoundError(
                f"conversation {conversation_id!r} not found at that version",
                metadata={"conversation": conversation_id},
            )
        document = json.dumps(export_atif(events), ensure_ascii=False, separators=(",", ":"))
        raw = document.encode("utf-8")
        for start in range(0, len(raw), EXPORT_CHUNK_BYTES):
            yield raw[start : start + EXPORT_CHUNK_BYTES]

    async def import_jsonl(
        self, data: bytes, *, tenant: str | None = ev.DEFAULT_TENANT
    ) -> ImportOutcome:
        """Imports one conversation's JSONL export, keeping event ids, times and hashes.

        The file is checked completely (format, one conversation stream from
        version 1, hash chain, fold) before anything is written; the write is
        one transaction. Importing the same file again writes nothing.

        Raises:
            JsonlFormatError: a line is not in the format.
            ImportRejectedError: the chain or fold fails, or the file is not
                one conversation from version 1.
            HistoryDivergedError: the conversation exists with other history.
            DuplicateEventError: an event id is stored in another stream.
        """
        events = jsonl.read_jsonl(jsonl.split_lines(data))
        if not events:
            raise ImportRejectedError("the file holds no events", version=0)
        sids = {e.stream_id for e in events}
        sid = events[0].stream_id
        if len(sids) != 1:
            raise ImportRejectedError("the file must hold exactly one conversation", version=0)
        cid = conversation_of(sid)
        if not sid.startswith(STREAM_PREFIX) or not _ID.match(cid):
            raise ImportRejectedError(f"stream {sid!r} is not a conversation stream", version=0)
        report = audit_stream(sid, [e.to_recorded() for e in events])
        if not report.ok:
            assert report.broken_at_version is not None
            raise ImportRejectedError(
                f"version {report.broken_at_version}: {report.problem}",
                version=report.broken_at_version,
            )
        if tenant is not None and report.state.tenant != tenant:
            # The tenant is inside the hashed metadata: the file cannot be
            # moved to the caller's tenant without breaking its chain.
            raise ImportTenantError(
                "the file's conversation belongs to another tenant; "
                "import it with a credential of that tenant"
            )
        existing = await self.store.read_stream(sid, limit=1)
        if existing and not _owned_by(existing[0], tenant):
            raise errors.HistoryDivergedError(
                f"conversation {cid!r} exists with other history",
                metadata={"conversation": cid},
            )
        result = await self.store.import_events(sid, [e.to_imported() for e in events])
        state = report.state
        if result.last_version > state.version:
            stored = await self._all_events(sid)
            state = fold(codec.decode_stored(e) for e in stored)
        return ImportOutcome(
            state=state, written=result.written, already_present=result.already_present
        )


def _owned_by(event: RecordedEvent, tenant: str | None) -> bool:
    """Whether the stream of `event` is `tenant`'s (every event of a stream names the same)."""
    return tenant is None or event.tenant == tenant


async def _only_types(
    events: AsyncGenerator[RecordedEvent, None], types: frozenset[str]
) -> AsyncGenerator[RecordedEvent, None]:
    async with contextlib.aclosing(events):
        async for event in events:
            if event.type in types:
                yield event


async def _arrived_together(
    events: AsyncGenerator[RecordedEvent, None],
    *,
    max_events: int,
    max_bytes: int,
    size: Sizer = event_size,
    idle_after: float | None = None,
) -> AsyncGenerator[tuple[RecordedEvent, ...], None]:
    """The events in batches: each of what arrived while the previous batch was taken.

    A task reads `events` ahead, at most one batch's worth (`max_events`
    events or `max_bytes`, by `size`), so a slow consumer holds the source
    back; each batch is what waits, cut by `batches`. With `idle_after`, an
    empty batch comes whenever nothing arrived for that many seconds after
    the previous batch was taken. Ends when `events` ends; its error is
    raised after the events before it. Closing this closes `events`.
    """
    waiting: list[RecordedEvent] = []
    waiting_bytes = 0
    ended: list[Exception | None] = []  # None when `events` ended, or its error
    arrived = asyncio.Event()  # events (or the end) wait to be taken
    taken = asyncio.Event()  # the consumer took what waited

    async def read_ahead() -> None:
        nonlocal waiting_bytes
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    while len(waiting) >= max_events or waiting_bytes >= max_bytes:
                        taken.clear()
                        await taken.wait()
                    waiting.append(event)
                    waiting_bytes += size(event)
                    arrived.set()
            ended.append(None)
        except Exception as e:  # handed to the consumer, raised there
            ended.append(e)
        arrived.set()

    reader = asyncio.create_task(read_ahead())
    try:
        while True:
            if idle_after is None:
                await arrived.wait()
            else:
                try:
                    await asyncio.wait_for(arrived.wait(), idle_after)
                except TimeoutError:
                    yield ()
                    continue
            arrived.clear()
            got = waiting[:]
            waiting.clear()
            waiting_bytes = 0
            taken.set()
            for batch in batches(got, max_events=max_events, max_bytes=max_bytes, size=size):
                yield batch
            if ended and not waiting:
                if ended[0] is None:
                    return
                raise ended[0]
    finally:
        reader.cancel()
        await asyncio.wait({reader})


class ExportFormatUnavailableError(errors.UnsupportedByModelError):
    """The export format is not available in this build (UNIMPLEMENTED)."""

    reason = "EXPORT_FORMAT_UNAVAILABLE"


class ImportRejectedError(errors.InvalidArgumentError):
    """An import file fails verification; nothing was written."""

    reason = "IMPORT_REJECTED"

    def __init__(self, message: str, *, version: int) -> None:
        super().__init__(message, metadata={"version": str(version)})
        self.version = version


def normalized(state: ConversationState, *, version_offset: int) -> ConversationState:
    """A state without what differs between a conversation and a fork of it.

    Drops the id, creation time, fork origin and shifts versions by
    `version_offset`, so that a fork's prefix state compares equal to its
    source's state at the fork version.
    """
    return dataclasses.replace(
        state,
        conversation_id="",
        created_at_us=0,
        forked_from=None,
        version=state.version - version_offset,
        turns=tuple(
            dataclasses.replace(t, start_version=t.start_version - version_offset)
            for t in state.turns
        ),
    )


class ImportTenantError(errors.PermissionDeniedError):
    """The import file's conversation names another tenant than the caller's (an admin may import it)."""

    reason = "IMPORT_TENANT_MISMATCH"
