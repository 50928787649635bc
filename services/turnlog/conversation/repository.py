"""The conversation repository: the only conversation code that calls the event store.

Loads a conversation's state (state cache, else snapshot, then the tail),
appends its events (mapping domain events to stored ones), saves snapshots,
and serves the few log reads the other conversation modules need (a turn's
events as they come, the list index's lifecycle events, recovery's open
turns). Like `eventsourcing`'s `Repository` beside its `Application`: the
application decides, the repository loads and records.

State cache: each conversation's latest folded `ConversationState` is kept
in an LRU. States are immutable and the log is append-only, so a cached
state is a true prefix of its stream and a load reads only the events after
it. A stale entry costs a version conflict at most (every append names its
expected version), and a conflict forgets the entry.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass

from turnlog import errors
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, fold
from turnlog.eventlog import STREAM_PREFIX, conversation_of, new_event, stream_id, with_tenant
from turnlog.storage import NO_STREAM, EventFilter, EventStore, NewEvent, Position

log = logging.getLogger(__name__)

_READ_BATCH = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationEvents:
    """A page of events of many conversations, in log order (`ConversationRepository.read_all`)."""

    events: tuple[tuple[str, ev.Event], ...]  # (conversation id, event)
    next_position: Position
    reached_end: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenTurn:
    """A turn whose `TurnStarted` is its conversation's latest lifecycle event."""

    conversation_id: str
    turn_id: str
    actor: str  # the replica that started it ("" when unknown)


class ConversationRepository:
    """Loads and records conversations in an `EventStore`.

    Args:
        store: The event log.
        actor: The name recorded as the actor of every event written here.
        cache_size: Conversations whose latest state is cached (0 disables).
        snapshot_every: `maybe_snapshot` saves one when this many events
            follow the last.
    """

    def __init__(
        self, store: EventStore, *, actor: str, cache_size: int, snapshot_every: int
    ) -> None:
        self.store = store
        self.actor = actor
        self.cache_size = cache_size
        self.snapshot_every = snapshot_every
        #: Latest folded state per conversation, least recently used first.
        self.states: OrderedDict[str, ConversationState] = OrderedDict()

    # -- the state cache -----------------------------------------------------------

    def cached(self, conversation_id: str) -> ConversationState | None:
        """This process's latest state of the conversation, if cached (no read)."""
        return self.states.get(conversation_id)

    def remember(self, state: ConversationState) -> None:
        """Cache `state` as its conversation's latest known state (never moves back)."""
        size = self.cache_size
        if size <= 0 or not state.exists:
            return
        cid = state.conversation_id
        cached = self.states.get(cid)
        if cached is not None and cached.version > state.version:
            self.states.move_to_end(cid)
            return
        self.states[cid] = state
        self.states.move_to_end(cid)
        while len(self.states) > size:
            self.states.popitem(last=False)

    def forget(self, conversation_id: str) -> None:
        """Drop the cached state (it proved stale)."""
        self.states.pop(conversation_id, None)

    # -- loading -------------------------------------------------------------------

    async def load(self, conversation_id: str, *, version: int | None = None) -> ConversationState:
        """The conversation folded up to `version` (latest when None).

        From the cached state when there is one at or before `version` (only
        the events after it are read), else from the latest snapshot at or
        before `version`; then the tail. Always reads the log: the result is
        at least as new as the log when the call started. Time travel never
        moves the cached state back.

        Raises:
            NotFoundError: No such conversation (or it has no such version).
        """
        sid = stream_id(conversation_id)
        cached = self.states.get(conversation_id)
        if cached is not None and (version is None or cached.version <= version):
            state = cached
        else:
            state = ConversationState()
            snapshot = await self.store.load_snapshot(
                sid, kind=codec.STATE_KIND, max_version=version
            )
            if snapshot is not None:
                state = codec.state_from_json(json.loads(snapshot.state))
        while version is None or state.version < version:
            limit = _READ_BATCH if version is None else min(_READ_BATCH, version - state.version)
            events = await self.store.read_stream(sid, from_version=state.version + 1, limit=limit)
            state = fold((codec.decode_stored(e) for e in events), state)
            if len(events) < limit:
                break
        if not state.exists or (version is not None and state.version < version):
            raise errors.NotFoundError(
                f"conversation {conversation_id!r} not found",
                metadata={"conversation": conversation_id},
            )
        self.remember(state)
        return state

    async def follow(
        self, conversation_id: str, *, after_version: int
    ) -> AsyncGenerator[ev.Event, None]:
        """The conversation's events after `after_version`, then live as they are appended."""
        async with contextlib.aclosing(
            self.store.subscribe_stream(stream_id(conversation_id), after_version=after_version)
        ) as recorded:
            async for event in recorded:
                yield codec.decode_stored(event)

    async def read_all(self, types: Iterable[str], *, after: Position) -> ConversationEvents:
        """The next page of every conversation's events of `types`, after `after`."""
        page = await self.store.read_all(
            after=after,
            limit=_READ_BATCH,
            filter=EventFilter(types=frozenset(types), stream_prefix=STREAM_PREFIX),
        )
        return ConversationEvents(
            events=tuple(
                (conversation_of(e.stream_id), codec.decode_stored(e)) for e in page.events
            ),
            next_position=page.next_position,
            reached_end=page.reached_end,
        )

    async def open_turns(self, terminal_types: Iterable[str]) -> list[OpenTurn]:
        """Every conversation whose latest turn-lifecycle event is a `TurnStarted` (one query)."""
        found = await self.store.latest_events_of_types(
            ["TurnStarted", *sorted(terminal_types)],
            stream_prefix=STREAM_PREFIX,
            last_type="TurnStarted",
        )
        return [
            OpenTurn(
                conversation_id=conversation_of(e.stream_id),
                turn_id=str(e.data["turn_id"]),
                actor=e.metadata.actor or "",
            )
            for e in found
        ]

    # -- recording -----------------------------------------------------------------

    def new_event(self, event_id: str, event: ev.Event, *, correlation: str = "") -> NewEvent:
        """`event` as the store appends it, written by this repository's actor."""
        return new_event(event_id, event, actor=self.actor, correlation=correlation)

    async def append(
        self,
        conversation_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int,
        state: ConversationState,
    ) -> None:
        """Append `events` at `expected_version`; `state` is the conversation after them.

        Every event is stamped with the conversation's tenant (`state.tenant`)
        in its metadata, which the hash chain covers and the log's indexed
        `tenant` column is derived from. On success `state` is cached. A version conflict at a version taken
        from a state (not `NO_STREAM`) proves that state stale: the cached
        entry is forgotten before the conflict is raised.

        Raises:
            VersionConflictError, DuplicateEventError, StorageUnavailableError.
        """
        stamped = [with_tenant(e, state.tenant) for e in events]
        try:
            await self.store.append(
                stream_id(conversation_id), stamped, expected_version=expected_version
            )
        except errors.VersionConflictError:
            if expected_version != NO_STREAM:
                self.forget(conversation_id)
            raise
        self.remember(state)

    async def maybe_snapshot(self, state: ConversationState, last_snapshot_version: int) -> None:
        """Save a snapshot of `state` if `snapshot_every` events follow the last; never raises."""
        if state.version - last_snapshot_version < self.snapshot_every:
            return
        data = json.dumps(codec.state_to_json(state), separators=(",", ":")).encode()
        try:
            await self.store.save_snapshot(
                stream_id(state.conversation_id),
                kind=codec.STATE_KIND,
                stream_version=state.version,
                state=data,
            )
        except errors.TurnlogError:
            log.warning("snapshot of %s failed", state.conversation_id, exc_info=True)


__all__ = ["ConversationEvents", "ConversationRepository", "OpenTurn"]
