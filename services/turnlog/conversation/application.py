"""The conversation application: commands and queries over the event log.

No gRPC here: `turnlog.conversation.servicer` adapts this class to the
public API. Everything durable is in the log; the only process-local state
is the set of turns this process is running (their live updates and the
client-tool results they await), and a catch-up list index.

Contracts (docs/conversation.md has the reasons):

- **Idempotency.** A create's conversation id and every event id of a turn
  are derived from the client's `request_id` (uuid5), and a send first looks
  the request id up in the conversation's turns: a retried create returns the
  same conversation, a retried send watches (or returns) the same turn and
  never generates twice. Two identical sends racing: one append wins, the
  other reloads and watches the winner's turn.
- **One turn at a time, fail-fast.** A send while a turn is open fails with
  `TurnInProgressError` (FAILED_PRECONDITION, retryable); the claim is the
  optimistic-concurrency append of `TurnStarted`, so it holds across replicas.
- **Commits.** A turn without tools is two appends: [TurnStarted, the user
  message, request decisions] and [GenerationStarted, streamed text,
  GenerationCompleted, response decisions, TurnCompleted]. The text of a
  turn a client streams is also flushed every `text_flush_interval_s` while
  a generation runs, and before a client-side tool is awaited, so that
  resumes on other replicas see it; a `SendMessage` turn's is not (nobody
  has seen it before the end).
- **Start.** A start trusts this process's cached state (no read; a stale
  one costs a version conflict and a retry), and sends the first engine
  request before `TurnStarted` commits; nothing is read from it before.
- **Turns outlive their callers.** A turn runs in a task owned by this
  object; a caller that disconnects (or whose deadline passes) stops
  watching, and the turn still completes; a retry with the same request id
  returns it. Only `cancel_turn` (or shutdown) cancels a turn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from turnlog import errors, metrics
from turnlog.conversation.ownership import Claim, TurnOwnership
from turnlog.conversation.projection import (
    TERMINAL_EVENTS,
    TextPiece,
    ToolFinished,
    TurnEnded,
    TurnProjector,
    TurnUpdate,
)
from turnlog.conversation.tools import ToolError, ToolRegistry
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, evolve, fold
from turnlog.engine.v1 import engine_pb2
from turnlog.guardrails import (
    EmitText,
    GenerationFinished,
    GenerationRequest,
    GuardrailDecision,
    GuardrailPipeline,
    GuardrailRegistry,
    RequestSubject,
    ResponseContext,
    RetractText,
    StopResponse,
    StreamAction,
    TextDelta,
    decisions_to_events,
    default_registry,
)
from turnlog.guardrails.execution import ExecutionEvent
from turnlog.storage import (
    NO_STREAM,
    START_POSITION,
    EventFilter,
    EventMetadata,
    EventStore,
    NewEvent,
    Position,
)
from turnlog.worker.client import EngineClient, PooledRequestStream

log = logging.getLogger(__name__)

#: Namespace of every id derived from a client's request id.
ID_NAMESPACE = uuid.UUID("8f0c4b8e-4d3a-5c1e-9a57-2f6f1d0b7a31")
STREAM_PREFIX = "conversation-"
_TERMINAL_TYPES = frozenset(t.__name__ for t in TERMINAL_EVENTS)


def stream_id(conversation_id: str) -> str:
    """The event stream of a conversation."""
    return STREAM_PREFIX + conversation_id


def derived_id(*parts: str) -> str:
    """A stable id from parts (uuid5): the same request always gets the same ids."""
    return str(uuid.uuid5(ID_NAMESPACE, "/".join(parts)))


def wall_clock_us() -> int:
    """The system clock in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


# --- inputs and outputs -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnOptions:
    """Generation settings; None (or empty) means "inherit"."""

    model: str | None = None
    sampling: ev.SamplingParams = field(default_factory=ev.SamplingParams)
    max_tool_round_trips: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceDefaults:
    """Service-wide settings, the bottom of the override chain.

    Attributes:
        model: The model name recorded when neither turn nor conversation names one.
        sampling: Default sampling (max_tokens bounds every generation).
        max_tool_round_trips: Default cap of model-tool round trips per turn.
        text_flush_interval_s: How often streamed text is recorded while a
            generation runs (resume latency on other replicas vs commits).
        client_tool_timeout_s: How long a turn awaits a client-side tool result.
        snapshot_every: Save a snapshot when this many events follow the last one.
        guardrail_profile: The profile of conversations that name none ("" = registry default).
        state_cache_size: Conversations whose latest folded state is kept in
            memory (LRU); a load then reads only the events after it. 0 disables.
        unwatched_delta_interval_s: For a generation no client streams (a
            `SendMessage` turn), the worker may send its text in pieces this
            far apart (`StartGeneration.min_delta_interval`) rather than one
            per engine step: the result is the same, for less host CPU per
            token on the worker and here. 0: every piece as it comes.
    """

    model: str = ""
    sampling: ev.SamplingParams = field(default_factory=lambda: ev.SamplingParams(max_tokens=512))
    max_tool_round_trips: int = 4
    text_flush_interval_s: float = 0.25
    client_tool_timeout_s: float = 300.0
    snapshot_every: int = 200
    guardrail_profile: str = ""
    state_cache_size: int = 1024
    unwatched_delta_interval_s: float = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateConversation:
    """Input of `ConversationApplication.create`."""

    request_id: str = ""
    conversation_id: str = ""
    system_prompt: str = ""
    defaults: TurnOptions = field(default_factory=TurnOptions)
    tools: tuple[ev.ToolDefinition, ...] = ()
    guardrail_profile: str = ""
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnInput:
    """Input of `ConversationApplication.start_turn`."""

    conversation_id: str
    content: str
    request_id: str = ""
    options: TurnOptions = field(default_factory=TurnOptions)
    expected_version: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ListQuery:
    """Input of `ConversationApplication.list`."""

    page_size: int = 50
    page_token: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    created_after_us: int | None = None
    created_before_us: int | None = None
    show_archived: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationSummary:
    """A list entry."""

    conversation_id: str
    created_at_us: int
    labels: tuple[tuple[str, str], ...]
    archived: bool
    state: ConversationState


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnResult:
    """A finished turn, as `SendMessage` returns it."""

    updates: tuple[TurnUpdate, ...]

    @property
    def ended(self) -> TurnEnded:
        """The final update's payload."""
        last = self.updates[-1].payload
        assert isinstance(last, TurnEnded)
        return last

    @property
    def assistant_message(self) -> ev.GenerationCompleted | None:
        """The last generation of the turn, if any."""
        gens = [u.payload for u in self.updates if isinstance(u.payload, ev.GenerationCompleted)]
        return gens[-1] if gens else None

    @property
    def tool_executions(self) -> list[ToolFinished]:
        """Tool calls with their outcomes, in order."""
        return [u.payload for u in self.updates if isinstance(u.payload, ToolFinished)]

    @property
    def decisions(self) -> list[ev.GuardrailDecided]:
        """Every guardrail decision of the turn, in order."""
        return [u.payload for u in self.updates if isinstance(u.payload, ev.GuardrailDecided)]


# --- a running turn ------------------------------------------------------------


class _RunningTurn:
    """The live side of one turn in this process: updates so far and their waiters."""

    def __init__(self, conversation_id: str, turn_id: str) -> None:
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.updates: list[TurnUpdate] = []
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason = ""
        self.tool_results: dict[str, asyncio.Future[tuple[str, str]]] = {}
        self.error: errors.TurnlogError | None = None
        #: A streaming client watches this turn (it was started for one, or
        #: `watch` attached one): its text is recorded every flush interval,
        #: and its generations ask the worker for every piece as it comes.
        self.streamed = False
        loop = asyncio.get_running_loop()
        self._changed: asyncio.Future[None] = loop.create_future()
        self._over: asyncio.Future[None] = loop.create_future()

    def publish(self, updates: Sequence[TurnUpdate]) -> None:
        if not updates:
            return
        self.updates.extend(updates)
        self.publish_wakeup()
        if updates[-1].is_last and not self._over.done():
            self._over.set_result(None)

    def fail(self, error: errors.TurnlogError) -> None:
        """The turn's end could not be recorded: watchers get `error`."""
        self.error = error
        self.publish_wakeup()
        if not self._over.done():
            self._over.set_result(None)

    def publish_wakeup(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    @property
    def ended(self) -> bool:
        return bool(self.updates) and self.updates[-1].is_last

    async def watch(self, after_sequence: int) -> AsyncIterator[TurnUpdate]:
        """Every update after `after_sequence` as it comes (a streaming client)."""
        self.streamed = True
        index = after_sequence
        while True:
            while index < len(self.updates):
                update = self.updates[index]
                index += 1
                yield update
                if update.is_last:
                    return
            if self.ended:
                return
            if self.error is not None:
                raise self.error
            await asyncio.shield(self._changed)

    async def outcome(self) -> list[TurnUpdate]:
        """All the turn's updates once it has ended (a unary caller: one wake-up, not one per piece)."""
        await asyncio.shield(self._over)
        if not self.ended and self.error is not None:
            raise self.error
        return list(self.updates)


# --- the application ------------------------------------------------------------


class ConversationApplication:
    """Commands and queries of the conversation service.

    Args:
        store: The event log.
        engine: The engine client (one or more workers); None when no worker
            is configured (conversations can be managed, turns fail UNAVAILABLE).
        tools: Server-side tools.
        guardrails: Guardrail profiles.
        defaults: Service defaults.
        clock: Microseconds since the Unix epoch; injected for tests.
        instance: This process's name, recorded as the actor of its events
            (with `ownership`, its instance name).
        ownership: This replica's liveness lock (`TurnOwnership`), required
            when several replicas share the log; None means this process is
            the only one (recovery then closes every open turn it does not run).
    """

    def __init__(
        self,
        store: EventStore,
        engine: EngineClient | None,
        *,
        tools: ToolRegistry | None = None,
        guardrails: GuardrailRegistry | None = None,
        defaults: ServiceDefaults | None = None,
        clock: Callable[[], int] = wall_clock_us,
        instance: str = "",
        ownership: TurnOwnership | None = None,
    ) -> None:
        self.store = store
        self.ownership = ownership
        self._recovery_task: asyncio.Task[None] | None = None
        self.engine = engine
        self.tools = tools or ToolRegistry()
        self.guardrails = guardrails or default_registry()
        self.defaults = defaults or ServiceDefaults()
        self.clock = clock
        if ownership is not None and instance and instance != ownership.instance:
            raise ValueError("instance differs from the ownership's instance")
        self.instance = (
            ownership.instance if ownership is not None else instance
        ) or f"serve-{uuid.uuid4().hex[:8]}"
        self._running: dict[str, _RunningTurn] = {}
        #: Turns whose `TurnStarted` is being appended here (not yet in
        #: `_running`): recovery must not take them for orphans.
        self._starting: set[str] = set()
        self._index: dict[str, ConversationSummary] = {}
        self._fork_heads: dict[str, ev.ConversationForked] = {}
        self._index_position: Position = START_POSITION
        self._index_lock = asyncio.Lock()
        # Latest folded state per conversation (LRU): states are immutable and
        # the log is append-only, so a cached state is a true prefix of the
        # stream; a load reads only the tail after it. A stale entry costs a
        # version conflict at most (every append names its expected version),
        # and a conflict forgets the entry.
        self._states: OrderedDict[str, ConversationState] = OrderedDict()

    # -- loading -------------------------------------------------------------

    def _remember(self, state: ConversationState) -> None:
        """Cache `state` as its conversation's latest known state (never moves back)."""
        size = self.defaults.state_cache_size
        if size <= 0 or not state.exists:
            return
        cid = state.conversation_id
        cached = self._states.get(cid)
        if cached is not None and cached.version > state.version:
            self._states.move_to_end(cid)
            return
        self._states[cid] = state
        self._states.move_to_end(cid)
        while len(self._states) > size:
            self._states.popitem(last=False)

    def _forget(self, conversation_id: str) -> None:
        self._states.pop(conversation_id, None)

    async def load(self, conversation_id: str, *, version: int | None = None) -> ConversationState:
        """The conversation folded up to `version` (latest when None).

        From the cached state when there is one at or before `version` (only
        the events after it are read), else from the latest snapshot at or
        before `version`; then the tail. Always reads the log: the result is
        at least as new as the log when the call started.

        Raises:
            NotFoundError: No such conversation (or it has no such version).
        """
        sid = stream_id(conversation_id)
        cached = self._states.get(conversation_id)
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
            limit = 1000 if version is None else min(1000, version - state.version)
            events = await self.store.read_stream(sid, from_version=state.version + 1, limit=limit)
            state = fold((codec.decode_stored(e) for e in events), state)
            if len(events) < limit:
                break
        if not state.exists or (version is not None and state.version < version):
            raise errors.NotFoundError(
                f"conversation {conversation_id!r} not found",
                metadata={"conversation": conversation_id},
            )
        self._remember(state)
        return state

    async def _maybe_snapshot(self, state: ConversationState, last_snapshot_version: int) -> None:
        if state.version - last_snapshot_version < self.defaults.snapshot_every:
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

    # -- conversations --------------------------------------------------------

    async def create(self, command: CreateConversation) -> ConversationState:
        """Create a conversation; idempotent by `request_id`.

        Raises:
            AlreadyExistsError: The id is taken by a different create.
            InvalidArgumentError: Unknown guardrail profile or server tool.
        """
        conversation_id = command.conversation_id or (
            derived_id("conversation", command.request_id)
            if command.request_id
            else str(uuid.uuid4())
        )
        GuardrailPipeline.for_profile(
            command.guardrail_profile or self.defaults.guardrail_profile, self.guardrails
        )
        tools = tuple(self._complete_tool(t) for t in command.tools)
        created = ev.ConversationCreated(
            conversation_id=conversation_id,
            created_at_us=self.clock(),
            system_prompt=command.system_prompt,
            model=command.defaults.model or "",
            sampling=command.defaults.sampling,
            tools=tools,
            guardrail_profile=command.guardrail_profile,
            labels=tuple(sorted(command.labels)),
            request_id=command.request_id,
            max_tool_round_trips=command.defaults.max_tool_round_trips,
        )
        event = self._new_event(
            derived_id(conversation_id, "created"), created, correlation=command.request_id
        )
        try:
            await self.store.append(stream_id(conversation_id), [event], expected_version=NO_STREAM)
        except (errors.VersionConflictError, errors.DuplicateEventError) as e:
            existing = await self.load(conversation_id)
            if command.request_id and existing.create_request_id == command.request_id:
                return existing
            raise errors.AlreadyExistsError(
                f"conversation {conversation_id!r} exists already",
                metadata={"conversation": conversation_id},
            ) from e
        state = fold([created])
        self._remember(state)
        return state

    def _complete_tool(self, tool: ev.ToolDefinition) -> ev.ToolDefinition:
        if tool.client_side:
            return tool
        server_tool = self.tools.get(tool.name)
        if server_tool is None:
            raise errors.InvalidArgumentError(
                f"no server-side tool named {tool.name!r}; mark client tools client_side",
                metadata={"tool": tool.name},
            )
        known = server_tool.definition
        return ev.ToolDefinition(
            name=tool.name,
            description=tool.description or known.description,
            parameters_json_schema=(
                tool.parameters_json_schema
                if tool.parameters_json_schema not in ("", "{}")
                else known.parameters_json_schema
            ),
        )

    async def archive(
        self, conversation_id: str, *, expected_version: int | None = None
    ) -> ConversationState:
        """Archive a conversation (idempotent once archived).

        Raises:
            NotFoundError: No such conversation.
            VersionConflictError: `expected_version` is not the current version.
            TurnInProgressError: A turn is running.
        """
        state = await self.load(conversation_id)
        if expected_version is not None and expected_version != state.version:
            raise errors.VersionConflictError(
                stream_id(conversation_id), expected_version, state.version
            )
        if state.archived:
            return state
        if state.open_turn is not None:
            raise errors.TurnInProgressError(
                "a turn is running; archive when it has ended",
                metadata={"turnId": state.open_turn.turn_id},
            )
        archived = ev.ConversationArchived(archived_at_us=self.clock())
        event = self._new_event(
            derived_id(conversation_id, "archived", str(state.version)), archived
        )
        # The loaded version is always the expected one: archiving must never
        # slip in between the events of a turn that starts concurrently.
        try:
            await self.store.append(
                stream_id(conversation_id), [event], expected_version=state.version
            )
        except errors.VersionConflictError:
            self._forget(conversation_id)
            raise
        state = evolve(state, archived)
        self._remember(state)
        return state

    async def list_conversations(self, query: ListQuery) -> tuple[list[ConversationSummary], str]:
        """A page of conversations, newest first, and the next page token ("" at the end).

        The index is an in-memory read model caught up from the log on every
        call (only the events since the last call are read).

        Raises:
            InvalidArgumentError: A malformed page token.
        """
        await self._catch_up_index()
        after: tuple[int, str] | None = None
        if query.page_token:
            try:
                raw = base64.urlsafe_b64decode(query.page_token.encode()).decode()
                created, _, cid = raw.partition(":")
                after = (int(created), cid)
            except (ValueError, UnicodeDecodeError) as e:
                raise errors.InvalidArgumentError(
                    "malformed page token", metadata={"field": "page_token"}
                ) from e
        wanted = set(query.labels)
        items = sorted(
            self._index.values(), key=lambda s: (s.created_at_us, s.conversation_id), reverse=True
        )
        page: list[ConversationSummary] = []
        for item in items:
            key = (item.created_at_us, item.conversation_id)
            if after is not None and key >= after:
                continue
            if item.archived and not query.show_archived:
                continue
            if not wanted <= set(item.labels):
                continue
            if query.created_after_us is not None and item.created_at_us < query.created_after_us:
                continue
            if (
                query.created_before_us is not None
                and item.created_at_us >= query.created_before_us
            ):
                continue
            page.append(item)
            if len(page) > query.page_size:
                break
        token = ""
        if len(page) > query.page_size:
            page = page[: query.page_size]
            last = page[-1]
            token = base64.urlsafe_b64encode(
                f"{last.created_at_us}:{last.conversation_id}".encode()
            ).decode()
        return page, token

    async def _catch_up_index(self) -> None:
        wanted = frozenset({"ConversationCreated", "ConversationForked", "ConversationArchived"})
        async with self._index_lock:
            while True:
                page = await self.store.read_all(
                    after=self._index_position,
                    limit=1000,
                    filter=EventFilter(types=wanted, stream_prefix=STREAM_PREFIX),
                )
                for recorded in page.events:
                    event = codec.decode_stored(recorded)
                    cid = recorded.stream_id.removeprefix(STREAM_PREFIX)
                    if isinstance(event, ev.ConversationForked):
                        # A fork's stream starts with this, then a copy of the
                        # source's ConversationCreated (naming the source).
                        self._fork_heads[cid] = event
                    elif isinstance(event, ev.ConversationCreated):
                        fork_head = self._fork_heads.pop(cid, None)
                        state = fold([fork_head, event] if fork_head else [event])
                        self._index[cid] = ConversationSummary(
                            conversation_id=cid,
                            created_at_us=state.created_at_us,
                            labels=event.labels,
                            archived=False,
                            state=state,
                        )
                    elif cid in self._index:
                        entry = self._index[cid]
                        self._index[cid] = replace(
                            entry, archived=True, state=replace(entry.state, archived=True)
                        )
                self._index_position = page.next_position
                if page.reached_end:
                    return

    # -- recovery ----------------------------------------------------------------

    async def close_interrupted_turns(self) -> list[tuple[str, str]]:
        """Close the open turns that no live replica runs with `TurnInterrupted`.

        Open turns come from one query (`latest_events_of_types`: per
        conversation, its latest `TurnStarted`/terminal event, kept when it is
        a start), not from a scan of the log in Python. With `ownership`, a
        turn is closed only when the replica that started it (its
        `TurnStarted`'s actor) is gone: its lock was taken; or is this one and
        does not run it. The append names the version just loaded, so a turn
        that moved on meanwhile is skipped.
        Without `ownership`, every open turn not running in this process is
        closed (correct for a single replica only). Safe to run at any time,
        concurrently on several replicas.

        Returns:
            The (conversation id, turn id) pairs closed.

        Raises:
            StorageUnavailableError: the log or the lock connection is unreachable.
        """
        types = ["TurnStarted", *sorted(_TERMINAL_TYPES)]
        candidates = await self.store.latest_events_of_types(
            types, stream_prefix=STREAM_PREFIX, last_type="TurnStarted"
        )
        closed: list[tuple[str, str]] = []
        for recorded in candidates:
            turn_id = str(recorded.data["turn_id"])
            if turn_id in self._running or turn_id in self._starting:
                continue  # running here, alive
            cid = recorded.stream_id.removeprefix(STREAM_PREFIX)
            claim: Claim | None = None
            if self.ownership is not None:
                # The replica that started it is gone (its lock is free), or
                # is this one (and the turn does not run here).
                claim = await self.ownership.claim_orphan(recorded.metadata.actor or "")
                if claim is None:
                    continue  # its replica is alive (or being recovered elsewhere)
            try:
                if await self._interrupt(cid, turn_id):
                    closed.append((cid, turn_id))
            finally:
                if claim is not None and self.ownership is not None:
                    await self.ownership.release(claim)
        return closed

    async def _interrupt(self, cid: str, turn_id: str) -> bool:
        state = await self.load(cid)
        if state.open_turn is None or state.open_turn.turn_id != turn_id:
            return False
        event = ev.TurnInterrupted(turn_id=turn_id, detected_at_us=self.clock())
        new = self._new_event(derived_id(turn_id, "interrupted"), event, correlation=turn_id)
        try:
            await self.store.append(stream_id(cid), [new], expected_version=state.version)
        except errors.VersionConflictError:
            self._forget(cid)
            return False  # its owner (or another recovery) moved it on meanwhile
        self._remember(evolve(state, event))
        metrics.TURNS_ENDED.labels("interrupted").inc()
        log.warning("closed interrupted turn %s of %s", turn_id, cid)
        return True

    def start_recovery(self, interval_s: float, *, jitter: float = 0.2) -> None:
        """Run `close_interrupted_turns` every `interval_s` (± `jitter`) until `shutdown`.

        Each round first checks the lock connection (reconnecting it and
        re-taking its locks if it broke). Jitter keeps replicas started
        together from recovering in lockstep. Errors are logged, never fatal.
        """
        if self._recovery_task is None:
            self._recovery_task = asyncio.create_task(
                self._recover_periodically(interval_s, jitter), name="turn-recovery"
            )

    async def _recover_periodically(self, interval_s: float, jitter: float) -> None:
        while True:
            await asyncio.sleep(interval_s * random.uniform(1 - jitter, 1 + jitter))
            try:
                if self.ownership is not None and await self.ownership.check():
                    log.warning(
                        "the replica lock was lost for a while: other replicas may have "
                        "closed this replica's open turns"
                    )
                closed = await self.close_interrupted_turns()
                if closed:
                    log.warning("closed %d interrupted turn(s)", len(closed))
            except errors.TurnlogError as e:
                log.warning("turn recovery failed (%s); retrying next round", e)
            except Exception:
                log.exception("turn recovery failed; retrying next round")

    # -- turns ---------------------------------------------------------------------

    async def send(self, command: TurnInput) -> TurnResult:
        """Run a turn (or find the one this request id started) and wait for its end."""
        turn_id = await self.start_turn(command, streamed=False)
        live = self._running.get(turn_id)
        if live is not None and live.conversation_id == command.conversation_id:
            updates = await live.outcome()
        else:
            updates = [u async for u in self.watch(command.conversation_id, turn_id)]
        return TurnResult(updates=tuple(updates))

    async def start_turn(self, command: TurnInput, *, streamed: bool = True) -> str:
        """Start a turn, or find the turn this request id already started; returns its id.

        `streamed`: the caller will watch the turn's text as it comes (False:
        it waits for the end, so the worker may send the text in larger pieces).

        Raises:
            NotFoundError, ConversationArchivedError, TurnInProgressError,
            VersionConflictError (only when `expected_version` was given),
            InvalidArgumentError.
        """
        arrived = time.perf_counter()
        request_id = command.request_id or str(uuid.uuid4())
        cid = command.conversation_id
        for attempt in range(3):
            # The first attempt trusts this process's latest state of the
            # conversation (its own turns keep it current) and reads nothing:
            # a stale state costs a version conflict on the TurnStarted append
            # (then the log is read), and a refusal is only ever decided on a
            # state just read from the log.
            cached = self._states.get(cid) if attempt == 0 else None
            if cached is not None:
                state = cached
            else:
                with metrics.stage_timer("load"):
                    state = await self.load(cid)
            existing = state.turn_for_request(request_id)
            if existing is not None:
                return existing.turn_id
            refusal = _refusal(state, command)
            if refusal is not None:
                if cached is not None:
                    continue
                raise refusal
            run = await self._prepare(state, command, request_id, arrived, streamed)
            try:
                return await self._begin(run)
            except (errors.VersionConflictError, errors.DuplicateEventError):
                # Lost a race (or the cached state was stale): reload from the
                # log and decide again (same request → watch the winner's
                # turn; another turn → fail fast).
                self._forget(cid)
                continue
        raise errors.TurnInProgressError("the conversation is busy", metadata={"conversation": cid})

    def _options(
        self, state: ConversationState, overrides: TurnOptions
    ) -> tuple[str, ev.SamplingParams, int]:
        model = overrides.model or state.model or self.defaults.model
        sampling = self.defaults.sampling.overridden_by(state.sampling).overridden_by(
            overrides.sampling
        )
        rounds = next(
            r
            for r in (
                overrides.max_tool_round_trips,
                state.max_tool_round_trips,
                self.defaults.max_tool_round_trips,
            )
            if r is not None
        )
        return model, sampling, rounds

    async def _prepare(
        self,
        state: ConversationState,
        command: TurnInput,
        request_id: str,
        arrived: float,
        streamed: bool,
    ) -> _TurnRecorder:
        """The turn's start events (after the request guardrails), not yet recorded.

        Unless a request guardrail blocked it, the first generation's engine
        request is sent already: the worker prefills while the lock is taken
        and `TurnStarted` commits, and nothing it returns is read (or shown)
        before that commit.
        """
        cid = state.conversation_id
        if self.engine is None:
            raise errors.EngineUnavailableError("no engine worker is configured")
        turn_id = derived_id(cid, "turn", request_id)
        pipeline = GuardrailPipeline.for_profile(
            state.guardrail_profile or self.defaults.guardrail_profile, self.guardrails
        )
        model, sampling, rounds = self._options(state, command.options)
        with metrics.stage_timer("request_guardrails"):
            outcome = await pipeline.check_request(
                RequestSubject(
                    user_text=command.content,
                    system_prompt=state.system_prompt,
                    model=model,
                    tool_definitions=state.tools,
                    labels=state.labels,
                )
            )
        run = _TurnRecorder(self, state, turn_id, request_id, pipeline, model, sampling, rounds)
        run.arrived = arrived
        run.live.streamed = streamed
        run.add(
            ev.TurnStarted(
                turn_id=turn_id,
                request_id=request_id,
                started_at_us=self.clock(),
                sampling=sampling,
                max_tool_round_trips=rounds,
            )
        )
        # The log keeps the user text as the request stages left it (redacted).
        run.add(
            ev.MessageAppended(
                message_id=derived_id(turn_id, "user"),
                role=ev.Role.USER,
                content=outcome.text_to_send,
                turn_id=turn_id,
            )
        )
        for decided in decisions_to_events(outcome.decisions, turn_id=turn_id):
            run.add(decided)
        if outcome.blocked is not None:
            run.add(outcome.blocked.to_event(turn_id=turn_id, blocked_at_us=self.clock()))
        else:
            run.prestart()
        return run

    async def _begin(self, run: _TurnRecorder) -> str:
        """Record the turn's start and run it in a task.

        No lock: the `TurnStarted` append names the version it expects, so of
        two starts racing (on any replicas) one wins and the other reloads.
        If the start fails, the prestarted engine request is cancelled.
        """
        turn_id = run.turn_id
        self._starting.add(turn_id)
        try:
            with metrics.stage_timer("begin_append"):
                await run.flush(live=False, kind="begin")
        except BaseException:
            await asyncio.shield(run.abandon())
            raise
        finally:
            self._starting.discard(turn_id)
        live = run.live
        self._running[turn_id] = live
        run.publish_pending()
        if run.generates:
            live.task = asyncio.create_task(run.generate(), name=f"turn-{turn_id}")
            metrics.TURNS_RUNNING.inc()
            live.task.add_done_callback(lambda _: self._running.pop(turn_id, None))
            live.task.add_done_callback(lambda _: metrics.TURNS_RUNNING.dec())
        else:
            self._running.pop(turn_id, None)
            run.count_end()
        return turn_id

    async def watch(
        self, conversation_id: str, turn_id: str, *, after_sequence: int = 0
    ) -> AsyncIterator[TurnUpdate]:
        """The turn's updates after `after_sequence`, live until it ends.

        Served from memory when the turn runs here, else read (and followed)
        from the log: both number updates identically.

        Raises:
            NotFoundError: No such conversation or turn.
        """
        live = self._running.get(turn_id)
        if live is not None and live.conversation_id == conversation_id:
            async for update in live.watch(after_sequence):
                yield update
            return
        state = await self.load(conversation_id)
        turn = state.turn(turn_id)
        if turn is None:
            raise errors.NotFoundError(f"turn {turn_id!r} not found", metadata={"turnId": turn_id})
        before = await self.load(conversation_id, version=turn.start_version - 1)
        projector = TurnProjector(conversation_id, turn_id)
        current = before
        async with contextlib.aclosing(
            self.store.subscribe_stream(
                stream_id(conversation_id), after_version=turn.start_version - 1
            )
        ) as events:
            async for recorded in events:
                event = codec.decode_stored(recorded)
                current = evolve(current, event)
                for update in projector.apply(event, current):
                    if update.sequence > after_sequence:
                        yield update
                    if update.is_last:
                        return

    async def cancel_turn(self, conversation_id: str, turn_id: str, reason: str = "") -> None:
        """Cancel a running turn: aborts its generation, records `TurnCancelled`.

        Raises:
            TurnNotRunningHereError: The turn is not running in this process.
        """
        live = self._running.get(turn_id)
        if live is None or live.conversation_id != conversation_id or live.task is None:
            raise errors.TurnNotRunningHereError(
                "the turn is not running on this server", metadata={"turnId": turn_id}
            )
        live.cancel_reason = reason or "cancelled by the client"
        live.task.cancel()

    def submit_tool_result(
        self, conversation_id: str, turn_id: str, call_id: str, *, result: str, error: str
    ) -> None:
        """Answer a client-side tool call the turn awaits.

        Raises:
            TurnNotRunningHereError: The turn is not running here or awaits no such call.
        """
        live = self._running.get(turn_id)
        future = None if live is None else live.tool_results.get(call_id)
        if live is None or live.conversation_id != conversation_id or future is None:
            raise errors.TurnNotRunningHereError(
                "no such tool call is awaited on this server",
                metadata={"turnId": turn_id, "callId": call_id},
            )
        if not future.done():
            future.set_result((result, error))

    async def shutdown(self) -> None:
        """Stop recovery, cancel running turns (each records TurnCancelled), wait for them.

        Does not close `ownership` (its owner does, after this).
        """
        if self._recovery_task is not None:
            self._recovery_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery_task
            self._recovery_task = None
        tasks = [r.task for r in self._running.values() if r.task is not None]
        for run in self._running.values():
            run.cancel_reason = "the service is shutting down"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- helpers ---------------------------------------------------------------------

    def _new_event(self, event_id: str, event: ev.Event, *, correlation: str = "") -> NewEvent:
        type_name, data = codec.encode(event)
        return NewEvent(
            event_id=uuid.UUID(event_id),
            type=type_name,
            data=data,
            metadata=EventMetadata(
                correlation_id=correlation or None,
                actor=self.instance,
                schema_version=codec.written_schema_version(type_name),
            ),
        )


def _refusal(state: ConversationState, command: TurnInput) -> errors.TurnlogError | None:
    """Why `state` admits no new turn for `command`, or None."""
    cid = state.conversation_id
    if state.archived:
        return errors.ConversationArchivedError(
            "the conversation is archived", metadata={"conversation": cid}
        )
    if command.expected_version is not None and command.expected_version != state.version:
        return errors.VersionConflictError(stream_id(cid), command.expected_version, state.version)
    if state.open_turn is not None:
        return errors.TurnInProgressError(
            "another turn of this conversation is running",
            metadata={"turnId": state.open_turn.turn_id},
        )
    return None


async def _complete_despite_cancel(operation: Awaitable[object]) -> bool:
    """Await `operation` to its end even if cancelled meanwhile; True if a cancel came."""
    task = asyncio.ensure_future(operation)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                raise
            cancelled = True
    task.result()
    return cancelled


class _TurnRecorder:
    """Buffers one turn's events in order, numbers their updates, and appends them."""

    def __init__(
        self,
        app: ConversationApplication,
        state: ConversationState,
        turn_id: str,
        request_id: str,
        pipeline: GuardrailPipeline,
        model: str,
        sampling: ev.SamplingParams,
        rounds: int,
    ) -> None:
        self.app = app
        self.pipeline = pipeline
        self.model = model
        self.sampling = sampling
        self.rounds = rounds
        #: The first generation's engine request, sent before the turn's start
        #: was recorded (`prestart`); taken by its first engine call.
        self.prestarted: PooledRequestStream | None = None
        #: When the prestarted request was sent (for the first-token time).
        self.prestarted_at = 0.0
        self.generates = False
        #: When the turn's request arrived (`time.perf_counter()`).
        self.arrived = time.perf_counter()
        self.state = state
        self.durable_version = state.version
        self.last_snapshot_version = state.version
        self.turn_id = turn_id
        self.request_id = request_id
        self.cid = state.conversation_id
        self.live = _RunningTurn(self.cid, turn_id)
        self.projector = TurnProjector(self.cid, turn_id, text_already_published=True)
        self.pending: list[ev.Event] = []
        self.unpublished: list[TurnUpdate] = []
        self.event_count = 0
        self.chunk: list[str] = []
        self.chunk_generation = ""
        self.last_flush = time.monotonic()

    def add(self, event: ev.Event) -> None:
        """Buffer an event (closing the open text chunk first) and number its updates."""
        self._close_chunk()
        self._add(event)

    def _add(self, event: ev.Event) -> None:
        self.pending.append(event)
        self.state = evolve(self.state, event)
        self.unpublished.extend(self.projector.apply(event, self.state))

    def text(self, generation_id: str, text: str) -> None:
        """Send a text piece live now; it is recorded with the next flush."""
        if self.chunk and self.chunk_generation != generation_id:
            self._close_chunk()
        self.chunk_generation = generation_id
        self.chunk.append(text)
        self.unpublished.append(self.projector.text(generation_id, text))
        self.publish_pending()

    def _close_chunk(self) -> None:
        if self.chunk:
            pieces = tuple(self.chunk)
            self.chunk = []
            self._add(
                ev.TextStreamed(
                    turn_id=self.turn_id, generation_id=self.chunk_generation, pieces=pieces
                )
            )

    def publish_pending(self) -> None:
        updates, self.unpublished = self.unpublished, []
        self.live.publish(updates)

    async def flush(self, *, live: bool = True, kind: str = "flush") -> None:
        """Append everything buffered in one commit, then publish its updates.

        Updates of a flush that ends the turn are published only after the
        commit, so a client never sees an end the log does not hold.
        """
        self._close_chunk()
        if not self.pending:
            return
        new_events = []
        for event in self.pending:
            self.event_count += 1
            new_events.append(
                self.app._new_event(
                    derived_id(self.turn_id, str(self.event_count)),
                    event,
                    correlation=self.request_id,
                )
            )
        appended = self.state
        try:
            cancelled = await _complete_despite_cancel(
                self.app.store.append(
                    stream_id(self.cid), new_events, expected_version=self.durable_version
                )
            )
        except errors.VersionConflictError:
            self.app._forget(self.cid)
            raise
        metrics.TURN_APPENDS.labels(kind).inc()
        self.app._remember(appended)
        self.durable_version = self.state.version
        self.pending = []
        self.last_flush = time.monotonic()
        if live:
            self.publish_pending()
        if cancelled:
            # The append landed; only now may the cancel proceed, so that the
            # version this turn expects next is the true one.
            raise asyncio.CancelledError

    async def maybe_flush(self) -> None:
        """Record the text streamed so far, every flush interval, once a client streams it.

        Text nobody has been shown live (a turn only `SendMessage` waits
        for) is recorded with the turn's end: no commit carries it earlier.
        """
        if (
            self.live.streamed
            and time.monotonic() - self.last_flush >= self.app.defaults.text_flush_interval_s
        ):
            await self.flush()

    async def finish(self, event: ev.Event) -> None:
        """Buffer the terminal event and commit; never raises (a lost end is recovered later).

        A version conflict means the turn's stream moved on without this
        process: recovery on another replica closed it (this replica's lock
        was lost). Watchers then get that conflict (ABORTED), never an end the
        log does not hold.
        """
        self.add(event)
        try:
            with metrics.stage_timer("end_append"):
                await self.flush(kind="end")
        except asyncio.CancelledError:
            raise
        except errors.VersionConflictError as e:
            log.warning("turn %s was closed elsewhere (interrupted): %s", self.turn_id, e)
            self.live.fail(e)
            return
        except Exception as e:
            log.error("could not record the end of turn %s (%s)", self.turn_id, type(e).__name__)
            self.live.fail(
                errors.StorageUnavailableError(
                    "the turn's outcome could not be recorded; recovery closes it as interrupted",
                    metadata={"turnId": self.turn_id},
                )
            )
            return
        self.count_end()
        await self.app._maybe_snapshot(self.state, self.last_snapshot_version)

    def count_end(self) -> None:
        """Counts the turn's recorded end by outcome, and its whole time."""
        turn = self.state.turn(self.turn_id)
        if turn is not None:
            metrics.TURNS_ENDED.labels(turn.status.value).inc()
        metrics.observe_stage("turn", time.perf_counter() - self.arrived)

    # -- the generation and tool loop -------------------------------------------

    def prestart(self) -> None:
        """Send the first generation's engine request now (see `_engine_call`)."""
        engine = self.app.engine
        assert engine is not None  # checked before the turn was prepared
        self.generates = True
        stream = engine.generate(self._start_message(self.sampling), affinity_key=self.cid)
        stream.start()
        self.prestarted = stream
        self.prestarted_at = time.perf_counter()

    async def abandon(self) -> None:
        """Cancel the prestarted engine request if nothing took it."""
        stream, self.prestarted = self.prestarted, None
        if stream is not None:
            await stream.aclose()

    async def generate(self) -> None:
        pipeline, model, sampling, rounds = self.pipeline, self.model, self.sampling, self.rounds
        phase = "generation"
        try:
            round_trips = 0
            generation = 0
            while True:
                generation += 1
                phase = "generation"
                # A structured-output regex constrains only the turn's first
                # generation (e.g. to force a tool call); later ones may end with text.
                constrained = sampling if generation == 1 else replace(sampling, regex=None)
                result = await self._one_generation(pipeline, model, constrained, generation)
                if result is None:
                    return  # blocked and recorded
                completed = result
                if not completed.tool_calls:
                    await self.finish(
                        ev.TurnCompleted(
                            turn_id=self.turn_id,
                            completed_at_us=self.app.clock(),
                            finish_reason=completed.finish_reason,
                            usage=self._turn_usage(),
                        )
                    )
                    return
                if round_trips >= rounds:
                    self.add(ev.ToolRoundLimitReached(turn_id=self.turn_id, limit=rounds))
                    await self.finish(
                        ev.TurnCompleted(
                            turn_id=self.turn_id,
                            completed_at_us=self.app.clock(),
                            finish_reason=ev.FinishReason.TOOL_CALLS,
                            usage=self._turn_usage(),
                        )
                    )
                    return
                round_trips += 1
                phase = "tool"
                with metrics.stage_timer("tools"):
                    await self._run_tools(completed.tool_calls)
        except asyncio.CancelledError:
            await self.finish(
                ev.TurnCancelled(
                    turn_id=self.turn_id,
                    cancelled_at_us=self.app.clock(),
                    reason=self.live.cancel_reason or "cancelled",
                )
            )
        except errors.TurnlogError as e:
            await self.finish(
                ev.TurnFailed(
                    turn_id=self.turn_id,
                    failed_at_us=self.app.clock(),
                    error_kind=e.reason,
                    phase=phase,
                    retryable=e.retryable,
                )
            )
        except Exception:
            log.exception("turn %s failed", self.turn_id)
            await self.finish(
                ev.TurnFailed(
                    turn_id=self.turn_id,
                    failed_at_us=self.app.clock(),
                    error_kind="INTERNAL",
                    phase=phase,
                    retryable=False,
                )
            )
        finally:
            # Cancelled before its first generation read the prestarted request.
            await asyncio.shield(self.abandon())

    def _turn_usage(self) -> ev.Usage:
        turn = self.state.turn(self.turn_id)
        return turn.usage if turn is not None else ev.Usage()

    async def _one_generation(
        self,
        pipeline: GuardrailPipeline,
        model: str,
        sampling: ev.SamplingParams,
        number: int,
    ) -> ev.GenerationCompleted | None:
        generation_id = f"{self.turn_id}/{number}"
        self.add(
            ev.GenerationStarted(
                turn_id=self.turn_id,
                generation_id=generation_id,
                worker="",
                model=model,
                sampling=sampling,
            )
        )
        self.publish_pending()
        context = ResponseContext(tool_definitions=self.state.tools)
        stream = pipeline.response_stream(context)
        call = pipeline.wrap_execution(self._engine_call(sampling))
        final: GenerationFinished | None = None
        user_text = self.state.messages[-1].content if self.state.messages else ""
        request = GenerationRequest(model=model, text=user_text, labels=self.state.labels)
        stopped = False
        try:
            async with contextlib.aclosing(call(request)) as events:
                async for item in events:
                    if isinstance(item, GuardrailDecision):
                        self.add(item.to_event(turn_id=self.turn_id))
                        self.publish_pending()
                    elif isinstance(item, TextDelta):
                        stopped = self._apply(generation_id, stream.feed(item.text))
                        if stopped:
                            break  # leaving aclosing aborts the engine request
                        await self.maybe_flush()
                    else:
                        final = item
        finally:
            # An execution intercept that never called the engine leaves the
            # prestarted request unread.
            await asyncio.shield(self.abandon())
        outcome = stream.finish(final.tool_calls if final is not None and not stopped else ())
        self._apply(generation_id, list(outcome.actions))
        for decided in decisions_to_events(outcome.decisions, turn_id=self.turn_id):
            self.add(decided)
        if outcome.blocked is not None or stopped:
            block = outcome.blocked or stream.blocked
            assert block is not None
            await self.finish(block.to_event(turn_id=self.turn_id, blocked_at_us=self.app.clock()))
            return None
        assert final is not None
        modified = any(d.verdict is ev.Verdict.MODIFY for d in outcome.decisions)
        completed = ev.GenerationCompleted(
            turn_id=self.turn_id,
            generation_id=generation_id,
            text=outcome.final_text,
            # Token ids of a modified (redacted) response would keep what the
            # guardrail removed, so they are not recorded.
            token_ids=() if modified else final.token_ids,
            finish_reason=ev.FinishReason.TOOL_CALLS if outcome.tool_calls else final.finish_reason,
            usage=final.usage,
            model=final.model or model,
            sampling=sampling,
            tool_calls=outcome.tool_calls,
        )
        self.add(completed)
        return completed

    def _apply(self, generation_id: str, actions: Sequence[StreamAction]) -> bool:
        stopped = False
        for action in actions:
            if isinstance(action, EmitText):
                if action.text:
                    self.text(generation_id, action.text)
            elif isinstance(action, RetractText):
                self.add(
                    ev.TextRetracted(
                        turn_id=self.turn_id,
                        generation_id=generation_id,
                        start=action.start,
                        end=action.end,
                        reason=action.reason,
                    )
                )
                self.publish_pending()
            elif isinstance(action, StopResponse):
                stopped = True
        return stopped

    def _start_message(self, sampling: ev.SamplingParams) -> engine_pb2.StartGeneration:
        start = engine_pb2.StartGeneration(
            chat=_chat_prompt(self.state), sampling=_engine_sampling(sampling)
        )
        interval = self.app.defaults.unwatched_delta_interval_s
        if not self.live.streamed and interval > 0:
            start.min_delta_interval.FromNanoseconds(round(interval * 1e9))
        return start

    def _engine_call(
        self, sampling: ev.SamplingParams
    ) -> Callable[[GenerationRequest], AsyncGenerator[ExecutionEvent, None]]:
        """The engine call of one generation, for the execution intercepts to wrap.

        The first call of the turn's first generation reads the prestarted
        request, which is exactly the request it would send (same chat, same
        sampling); every other call (a retry, a later generation) sends anew.
        """
        start = self._start_message(sampling)
        engine = self.app.engine
        assert engine is not None  # checked before the turn started
        affinity = self.cid

        async def call(request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
            stream, self.prestarted = self.prestarted, None
            sent = self.prestarted_at
            if stream is None:
                attempt = engine_pb2.StartGeneration()
                attempt.CopyFrom(start)
                stream = engine.generate(attempt, affinity_key=affinity)
                sent = time.perf_counter()
            first = 0.0
            token_ids: list[int] = []
            text: list[str] = []
            async with stream as events:
                async for item in events:
                    if isinstance(item, engine_pb2.GenerationDelta):
                        if not first:
                            first = time.perf_counter()
                            metrics.observe_stage("first_token", first - sent)
                        token_ids.extend(item.token_ids)
                        text.append(item.text)
                        yield TextDelta(text=item.text, token_ids=tuple(item.token_ids))
                    else:
                        if first:
                            metrics.observe_stage("generation", time.perf_counter() - first)
                        calls = tuple(
                            ev.ToolCall(
                                call_id=c.id or derived_id(self.turn_id, "call", str(i)),
                                name=c.name,
                                arguments_json=c.arguments_json,
                            )
                            for i, c in enumerate(item.tool_calls)
                        )
                        yield GenerationFinished(
                            text="".join(text),
                            tool_calls=calls,
                            finish_reason=_FINISH.get(item.finish_reason, ev.FinishReason.STOP),
                            model=request.model,
                            usage=ev.Usage(
                                prompt_tokens=item.usage.prompt_tokens,
                                completion_tokens=item.usage.completion_tokens,
                                cached_prompt_tokens=item.usage.cached_prompt_tokens,
                            ),
                            token_ids=tuple(token_ids),
                        )

        return call

    async def _run_tools(self, calls: Sequence[ev.ToolCall]) -> None:
        definitions = {t.name: t for t in self.state.tools}
        for call in calls:
            definition = definitions.get(call.name)
            client_side = definition is not None and definition.client_side
            self.add(ev.ToolCallRequested(turn_id=self.turn_id, call=call, client_side=client_side))
            if client_side:
                future: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
                self.live.tool_results[call.call_id] = future
                # Record before waiting: the client may take long, and the
                # request must be visible to resumes on any replica.
                await self.flush()
                try:
                    async with asyncio.timeout(self.app.defaults.client_tool_timeout_s):
                        result, error = await future
                except TimeoutError:
                    result, error = "", "the client did not answer in time"
                finally:
                    self.live.tool_results.pop(call.call_id, None)
            else:
                self.publish_pending()
                try:
                    result, error = await self.app.tools.execute(call.name, call.arguments_json), ""
                except ToolError as e:
                    result, error = "", str(e)
            if error:
                self.add(ev.ToolCallFailed(turn_id=self.turn_id, call_id=call.call_id, error=error))
            else:
                self.add(
                    ev.ToolCallCompleted(turn_id=self.turn_id, call_id=call.call_id, result=result)
                )
            self.publish_pending()


_FINISH = {
    engine_pb2.FINISH_REASON_STOP: ev.FinishReason.STOP,
    engine_pb2.FINISH_REASON_LENGTH: ev.FinishReason.LENGTH,
    engine_pb2.FINISH_REASON_STOP_SEQUENCE: ev.FinishReason.STOP_SEQUENCE,
    engine_pb2.FINISH_REASON_CANCELLED: ev.FinishReason.CANCELLED,
    engine_pb2.FINISH_REASON_ERROR: ev.FinishReason.ERROR,
}
_ROLES = {
    ev.Role.SYSTEM: engine_pb2.CHAT_ROLE_SYSTEM,
    ev.Role.USER: engine_pb2.CHAT_ROLE_USER,
    ev.Role.ASSISTANT: engine_pb2.CHAT_ROLE_ASSISTANT,
    ev.Role.TOOL: engine_pb2.CHAT_ROLE_TOOL,
}


def _chat_prompt(state: ConversationState) -> engine_pb2.ChatPrompt:
    """The conversation as chat messages and tool definitions, for the worker's template.

    Assistant tool calls that never got a result (cut by the round-trip cap,
    or left by an ended turn) are left out: chat templates expect every call
    to be answered.
    """
    answered = {m.tool_call_id for m in state.messages if m.role is ev.Role.TOOL}
    prompt = engine_pb2.ChatPrompt(add_generation_prompt=True)
    if state.system_prompt:
        prompt.messages.append(
            engine_pb2.ChatMessage(role=engine_pb2.CHAT_ROLE_SYSTEM, content=state.system_prompt)
        )
    for message in state.messages:
        chat = engine_pb2.ChatMessage(
            role=_ROLES[message.role], content=message.content, tool_call_id=message.tool_call_id
        )
        for call in message.tool_calls:
            if call.call_id in answered:
                chat.tool_calls.append(
                    engine_pb2.ToolCall(
                        id=call.call_id, name=call.name, arguments_json=call.arguments_json
                    )
                )
        prompt.messages.append(chat)
    for tool in state.tools:
        prompt.tools.append(
            engine_pb2.ToolDefinition(
                name=tool.name,
                description=tool.description,
                parameters_json_schema=tool.parameters_json_schema,
            )
        )
    return prompt


def _engine_sampling(sampling: ev.SamplingParams) -> engine_pb2.SamplingParams:
    params: dict[str, Any] = {"stop": list(sampling.stop)}
    if sampling.temperature is not None:
        params["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        params["top_p"] = sampling.top_p
    if sampling.top_k is not None:
        params["top_k"] = sampling.top_k
    if sampling.max_tokens is not None:
        params["max_tokens"] = sampling.max_tokens
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    if sampling.regex is not None:
        params["structured_output"] = engine_pb2.StructuredOutput(regex=sampling.regex)
    return engine_pb2.SamplingParams(**params)


__all__ = [
    "ConversationApplication",
    "ConversationSummary",
    "CreateConversation",
    "ListQuery",
    "ServiceDefaults",
    "TextPiece",
    "TurnInput",
    "TurnOptions",
    "TurnResult",
]
