"""The conversation application: commands and reads over the event log.

No gRPC here (`turnlog.api` adapts this class to the public API), and no
store calls either. The application decides; its collaborators do the rest:
`repository` loads and records conversations (state cache, snapshots);
`turn` runs one turn and decides when its events are written (`engine_io`
speaks to the worker for it); `running` holds this process's turns;
`control` reaches a turn on any replica (cancels, client tool results);
`listing` is the list read model; `recovery` closes interrupted turns.

Contracts (docs/conversation.md has the reasons):

- **Idempotency.** Ids derive from the client's `request_id` (uuid5): a
  retried create returns the same conversation; a send first looks the
  request id up in the conversation's turns, so a retry watches (or returns)
  the same turn and never generates twice. Concurrent sends of one request
  id in a process start one turn; across replicas the `TurnStarted` append
  decides, and the loser's engine request is cancelled unread.
- **One turn at a time, fail-fast.** A send while a turn is open fails with
  `TurnInProgressError`; the claim is the optimistic-concurrency append of
  `TurnStarted`, so it holds across replicas.
- **Start.** A start trusts this process's cached state (no read; a stale
  one costs a version conflict and a retry), and sends the first engine
  request before `TurnStarted` commits; nothing is read from it before.
- **Turns outlive their callers.** A turn runs in a task of its own; a
  caller that disconnects stops watching, and a retry with the same request
  id returns the turn. Only `cancel_turn` (or shutdown) cancels a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from turnlog import errors, metrics
from turnlog.conversation import turn
from turnlog.conversation.context import TokenCounter
from turnlog.conversation.control import MAX_WAIT_S, ToolResultInput, TurnControl
from turnlog.conversation.listing import ConversationIndex, ConversationSummary, ListQuery
from turnlog.conversation.options import ServiceDefaults, TurnOptions
from turnlog.conversation.paging import Page, page_of
from turnlog.conversation.projection import (
    TextPiece,
    TurnEnded,
    TurnProjector,
    TurnResult,
    TurnUpdate,
)
from turnlog.conversation.recovery import TurnRecovery
from turnlog.conversation.repository import ConversationRepository
from turnlog.conversation.running import RunningTurns
from turnlog.conversation.settings import (
    UpdateConversation,
    changes_anything,
    same_request,
    update_event,
)
from turnlog.conversation.tools import ToolRegistry
from turnlog.domain import events as ev
from turnlog.domain.state import (
    ConversationState,
    Message,
    Turn,
    TurnStatus,
    evolve,
    fold,
    messages_with_system,
)
from turnlog.eventlog import Clock, derived_id, stream_id, wall_clock_us
from turnlog.guardrails import (
    GuardrailPipeline,
    GuardrailRegistry,
    conversation_fields,
    default_registry,
)
from turnlog.storage import NO_STREAM, EventStore, ReplicaLiveness, TurnMailbox
from turnlog.worker.client import EngineClient


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
    tenant: str = ev.DEFAULT_TENANT
    """The caller's tenant (from its verified credential), which will own the conversation."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnInput:
    """Input of `ConversationApplication.start_turn`."""

    conversation_id: str
    content: str
    request_id: str = ""
    options: TurnOptions = field(default_factory=TurnOptions)
    expected_version: int | None = None
    compaction_only: bool = False
    """A `CompactConversation` unit: `content` is unused (docs/context.md)."""
    tenant: str = ev.DEFAULT_TENANT
    """The caller's tenant: the conversation must be one of its own."""


class ConversationApplication:
    """Commands and reads of the conversation service.

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
        ownership: This replica's liveness (`turnlog.storage.PostgresReplicaLock`),
            required when several replicas share the log; None means this
            process is the only one (recovery then closes every open turn it
            does not run).
        mailbox: The turn mailbox shared with the other replicas (cancels and
            client tool results for turns running elsewhere); None when this
            process is the only one. Letters are taken from it from
            construction until `shutdown` (`TurnControl`).
    """

    def __init__(
        self,
        store: EventStore,
        engine: EngineClient | None,
        *,
        tools: ToolRegistry | None = None,
        guardrails: GuardrailRegistry | None = None,
        defaults: ServiceDefaults | None = None,
        clock: Clock = wall_clock_us,
        instance: str = "",
        ownership: ReplicaLiveness | None = None,
        mailbox: TurnMailbox | None = None,
    ) -> None:
        self.store = store
        self.ownership = ownership
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
        self.repository = ConversationRepository(
            store,
            actor=self.instance,
            cache_size=self.defaults.state_cache_size,
            snapshot_every=self.defaults.snapshot_every,
        )
        self._turn_deps = (
            None
            if engine is None
            else turn.TurnDependencies(
                repository=self.repository,
                engine=engine,
                tools=self.tools,
                guardrails=self.guardrails,
                clock=clock,
                defaults=self.defaults,
                tokens=TokenCounter(engine, cache_size=self.defaults.token_count_cache_size),
            )
        )
        self.running = RunningTurns()
        self._index = ConversationIndex(self.repository)
        self._recovery = TurnRecovery(
            self.repository, clock=clock, liveness=ownership, is_live_here=self.running.is_live
        )
        self.control = TurnControl(
            self.repository,
            self.running,
            mailbox,
            guardrails=self.guardrails,
            defaults=self.defaults,
            clock=clock,
        )
        self.control.start()

    # -- conversations --------------------------------------------------------

    async def load(
        self,
        conversation_id: str,
        *,
        tenant: str | None = ev.DEFAULT_TENANT,
        version: int | None = None,
    ) -> ConversationState:
        """The conversation folded up to `version` (latest when None); see `ConversationRepository.load`.

        `tenant`: the caller's tenant; another tenant's conversation is not
        found, exactly as one that does not exist. None reads any tenant's
        (an administrator's read; the API layer records it).

        Raises:
            NotFoundError: No such conversation of `tenant` (or no such version).
        """
        return owned(await self.repository.load(conversation_id, version=version), tenant)

    async def create(self, command: CreateConversation) -> ConversationState:
        """Create a conversation; idempotent by `request_id`.

        Raises:
            AlreadyExistsError: The id is taken by a different create.
            InvalidArgumentError: Unknown guardrail profile or server tool;
                `FieldRefusedError` for a field a sanitize guardrail would change.
        """
        conversation_id = command.conversation_id or (
            derived_id("conversation", command.tenant, command.request_id)
            if command.request_id
            else str(uuid.uuid4())
        )
        pipeline = GuardrailPipeline.for_profile(
            command.guardrail_profile or self.defaults.guardrail_profile, self.guardrails
        )
        # Recorded as given, so refused (not rewritten) if a sanitize guardrail would change them.
        pipeline.check_fields(
            conversation_fields(
                system_prompt=command.system_prompt,
                labels=command.labels,
                tools=command.tools,
                sampling=command.defaults.sampling,
            )
        )
        tools = tuple(self.tools.complete(t) for t in command.tools)
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
            context_policy=command.defaults.context_policy,
            tenant=command.tenant,
        )
        event = self.repository.new_event(
            derived_id(conversation_id, "created"), created, correlation=command.request_id
        )
        state = fold([created])
        try:
            await self.repository.append(
                conversation_id, [event], expected_version=NO_STREAM, state=state
            )
        except (errors.VersionConflictError, errors.DuplicateEventError) as e:
            # Conversation ids are one namespace for all tenants: an id taken
            # by another tenant reads as taken, and nothing more is said of it.
            existing = await self.repository.load(conversation_id)
            if (
                command.request_id
                and existing.tenant == command.tenant
                and existing.create_request_id == command.request_id
            ):
                # Compared with the conversation as created (later updates
                # and turns do not make a retry of its creation different).
                original = await self.repository.load(conversation_id, version=1)
                if _created_content(original) != _created_content(state):
                    raise errors.RequestIdReusedError(
                        f"request id {command.request_id!r} created a conversation "
                        "with other settings",
                        metadata={"originalId": conversation_id},
                    ) from e
                return existing
            raise errors.AlreadyExistsError(
                f"conversation {conversation_id!r} exists already",
                metadata={"conversation": conversation_id},
            ) from e
        return state

    async def archive(
        self,
        conversation_id: str,
        *,
        tenant: str = ev.DEFAULT_TENANT,
        expected_version: int | None = None,
    ) -> ConversationState:
        """Archive a conversation (idempotent once archived).

        Raises:
            NotFoundError: No such conversation.
            VersionConflictError: `expected_version` is not the current version.
            TurnInProgressError: A turn is running.
        """
        state = await self.load(conversation_id, tenant=tenant)
        if (stale := _stale(state, expected_version)) is not None:
            raise stale
        if state.archived:
            return state
        if state.open_turn is not None:
            raise errors.TurnInProgressError(
                "a turn is running; archive when it has ended",
                metadata={"turnId": state.open_turn.turn_id},
            )
        archived = ev.ConversationArchived(archived_at_us=self.clock())
        event = self.repository.new_event(
            derived_id(conversation_id, "archived", str(state.version)), archived
        )
        # The loaded version is always the expected one: archiving must never
        # slip in between the events of a turn that starts concurrently.
        after = evolve(state, archived)
        await self.repository.append(
            conversation_id, [event], expected_version=state.version, state=after
        )
        return after

    async def unarchive(
        self,
        conversation_id: str,
        *,
        tenant: str = ev.DEFAULT_TENANT,
        expected_version: int | None = None,
    ) -> ConversationState:
        """Let an archived conversation take turns again; an active one is returned as it is.

        Raises:
            NotFoundError: No such conversation of `tenant`.
            VersionConflictError: `expected_version` is not the current version.
        """
        state = await self.load(conversation_id, tenant=tenant)
        if (stale := _stale(state, expected_version)) is not None:
            raise stale
        if not state.archived:
            return state
        # No turn runs in an archived conversation, so nothing can slip in
        # between: the append at the loaded version only loses to another
        # unarchive or update.
        unarchived = ev.ConversationUnarchived(unarchived_at_us=self.clock())
        event = self.repository.new_event(
            derived_id(conversation_id, "unarchived", str(state.version)), unarchived
        )
        after = evolve(state, unarchived)
        await self.repository.append(
            conversation_id, [event], expected_version=state.version, state=after
        )
        return after

    async def update(self, command: UpdateConversation) -> ConversationState:
        """Replace the settings `command.fields` names: one `ConversationUpdated`, or nothing.

        Idempotent by `request_id`: a retry returns the conversation as the
        first call left it (the version its event made) and records nothing;
        the same id with another change is refused. A call that changes no
        setting records nothing. Archived conversations may be updated (their
        settings are still read by exports, forks and an unarchive); a running
        turn keeps the settings it started with, because an update waits for it
        to end (refused meanwhile, as archive is: the turn's events are
        appended at the versions it expects).

        Raises:
            NotFoundError: No such conversation of `tenant`.
            RequestIdReusedError: `request_id` made another change (metadata
                `originalId`: that change's event id).
            VersionConflictError: `expected_version` is not the current version.
            TurnInProgressError: A turn is running.
            InvalidArgumentError: Unknown guardrail profile or server tool;
                `FieldRefusedError` for a field a sanitize guardrail would change.
        """
        cid = command.conversation_id
        for attempt in range(3):
            state = await self.load(cid, tenant=command.tenant)
            event = self._update_event(command, state)
            if command.request_id:
                earlier = state.update_for_request(command.request_id)
                if earlier is not None:
                    if not same_request(earlier.event, event):
                        raise errors.RequestIdReusedError(
                            "this request_id was used for another change of the conversation",
                            metadata={"originalId": _update_event_id(cid, command.request_id)},
                        )
                    return await self.load(cid, tenant=command.tenant, version=earlier.version)
            if (stale := _stale(state, command.expected_version)) is not None:
                raise stale
            if not changes_anything(state, event):
                return state
            if state.open_turn is not None:
                raise errors.TurnInProgressError(
                    "a turn is running; update the conversation when it has ended",
                    metadata={"turnId": state.open_turn.turn_id},
                )
            stored = self.repository.new_event(
                _update_event_id(cid, command.request_id or str(uuid.uuid4())),
                event,
                correlation=command.request_id,
            )
            after = evolve(state, event)
            try:
                await self.repository.append(
                    cid, [stored], expected_version=state.version, state=after
                )
            except (errors.VersionConflictError, errors.DuplicateEventError):
                # A turn started or another update landed (perhaps this very
                # request, retried concurrently): decide again on the new state,
                # unless the caller named the version it expects.
                self.repository.forget(cid)
                if command.expected_version is not None or attempt == 2:
                    raise
                continue
            return after
        raise AssertionError("unreachable")  # pragma: no cover

    def _update_event(
        self, command: UpdateConversation, state: ConversationState
    ) -> ev.ConversationUpdated:
        """The event of `command` on `state`, after the checks its new settings must pass."""
        named = set(command.fields)
        profile = (
            command.guardrail_profile if "guardrail_profile" in named else state.guardrail_profile
        )
        pipeline = GuardrailPipeline.for_profile(
            profile or self.defaults.guardrail_profile, self.guardrails
        )
        tools = tuple(self.tools.complete(t) for t in command.tools) if "tools" in named else ()
        event = update_event(command, tools=tools, at_us=self.clock())
        after = evolve(state, event)
        # Recorded as given, so refused (not rewritten) if a sanitize guardrail
        # would change them: the settings replaced, and every setting when the
        # profile itself changes (they now fall under it).
        fields = conversation_fields(
            system_prompt=after.system_prompt,
            labels=after.labels,
            tools=after.tools,
            sampling=after.sampling,
        )
        pipeline.check_fields(
            dataclasses.replace(f, path=f"conversation.{f.path}")
            for f in fields
            if "guardrail_profile" in named or _setting_of(f.path) in named
        )
        return event

    async def list_conversations(self, query: ListQuery) -> tuple[list[ConversationSummary], str]:
        """A page of conversations, newest first, and the next page token ("" at the end).

        Each entry's state is the conversation's latest (read through the
        state cache), so that its version, settings and counts are current.

        Raises:
            InvalidArgumentError: A malformed page token.
        """
        page, token = await self._index.page(query)
        latest = [
            dataclasses.replace(s, state=await self.load(s.conversation_id, tenant=None))
            for s in page
        ]
        return latest, token

    async def list_turns(
        self,
        conversation_id: str,
        *,
        tenant: str | None = ev.DEFAULT_TENANT,
        page_size: int,
        cursor: str = "",
    ) -> Page[Turn]:
        """A page of the conversation's turns, oldest first, from `cursor` ("": the first).

        Raises:
            NotFoundError: No such conversation of `tenant`.
            PageTokenError: A cursor that is not one of `page_of`'s.
        """
        state = await self.load(conversation_id, tenant=tenant)
        return page_of(state.turns, size=page_size, cursor=cursor)

    async def list_messages(
        self,
        conversation_id: str,
        *,
        tenant: str | None = ev.DEFAULT_TENANT,
        page_size: int,
        cursor: str = "",
        turn_id: str = "",
        newest_first: bool = False,
    ) -> Page[Message]:
        """A page of the conversation's messages (the system message first), or one turn's.

        Raises:
            NotFoundError: No such conversation of `tenant`, or no such turn.
            PageTokenError: A cursor that is not one of `page_of`'s.
        """
        state = await self.load(conversation_id, tenant=tenant)
        if turn_id:
            if state.turn(turn_id) is None:
                raise errors.NotFoundError(
                    f"turn {turn_id!r} not found", metadata={"turnId": turn_id}
                )
            messages: Sequence[Message] = [m for m in state.messages if m.turn_id == turn_id]
        else:
            messages = messages_with_system(state)
        return page_of(messages, size=page_size, cursor=cursor, newest_first=newest_first)

    # -- recovery ----------------------------------------------------------------

    async def close_interrupted_turns(self) -> list[tuple[str, str]]:
        """Close the open turns that no live replica runs (`TurnRecovery`); the pairs closed.

        Raises:
            StorageUnavailableError: the log or the lock connection is unreachable.
        """
        return await self._recovery.close_interrupted_turns()

    def start_recovery(self, interval_s: float, *, jitter: float = 0.2) -> None:
        """Run `close_interrupted_turns` every `interval_s` (± `jitter`) until `shutdown`."""
        self._recovery.start(interval_s, jitter=jitter)

    # -- turns ---------------------------------------------------------------------

    async def send(self, command: TurnInput, *, allow_client_tools: bool = False) -> TurnResult:
        """Run a turn (or find the one this request id started) and wait for its end.

        Refused (`ClientToolsNeedStreamError`) on a conversation with
        client-side tools unless `allow_client_tools`: a caller that only
        waits for the end can answer none (a replay lets them time out).
        """
        turn_id = await self.start_turn(
            command, streamed=False, refuse_client_tools=not allow_client_tools
        )
        live = self.running.get(command.conversation_id, turn_id)
        if live is not None:
            updates = await live.outcome()
        else:
            updates = [
                u async for u in self.watch(command.conversation_id, turn_id, tenant=command.tenant)
            ]
        return TurnResult(updates=tuple(updates))

    async def compact(
        self,
        conversation_id: str,
        *,
        tenant: str = ev.DEFAULT_TENANT,
        request_id: str = "",
        expected_version: int | None = None,
    ) -> TurnResult:
        """Summarize the window's turns now (`CompactConversation`); a unit recorded like a turn.

        Raises:
            NothingToCompactError: nothing to summarize (nothing recorded);
            what `start_turn` raises.
        """
        return await self.send(
            TurnInput(
                conversation_id=conversation_id,
                content="",
                request_id=request_id,
                expected_version=expected_version,
                compaction_only=True,
                tenant=tenant,
            )
        )

    async def start_turn(
        self, command: TurnInput, *, streamed: bool = True, refuse_client_tools: bool = False
    ) -> str:
        """Start a turn, or find the turn this request id already started; returns its id.

        `streamed`: the caller will watch the turn's text as it comes (False:
        it waits for the end, so the worker may send the text in larger pieces).
        `refuse_client_tools`: the caller cannot answer client-side tools, so a
        conversation that has some is refused (`ClientToolsNeedStreamError`).

        Raises:
            NotFoundError, ConversationArchivedError, TurnInProgressError,
            VersionConflictError (only when `expected_version` was given),
            InvalidArgumentError.
        """
        arrived = time.perf_counter()
        request_id = command.request_id or str(uuid.uuid4())
        # A concurrent send of the same request waits for this one's start,
        # then finds its turn like any retry: one engine request.
        async with self.running.one_start(command.conversation_id, request_id):
            return await self._start(command, request_id, arrived, streamed, refuse_client_tools)

    async def _start(
        self,
        command: TurnInput,
        request_id: str,
        arrived: float,
        streamed: bool,
        refuse_client_tools: bool,
    ) -> str:
        cid = command.conversation_id
        for attempt in range(3):
            # The first attempt trusts this process's latest state of the
            # conversation (its own turns keep it current) and reads nothing:
            # a stale state costs a version conflict on the TurnStarted append
            # (then the log is read), and a refusal is only ever decided on a
            # state just read from the log.
            cached = self.repository.cached(cid) if attempt == 0 else None
            if cached is not None:
                state = owned(cached, command.tenant)
            else:
                with metrics.stage_timer("load"):
                    state = await self.load(cid, tenant=command.tenant)
            existing = state.turn_for_request(request_id)
            if existing is not None:
                _check_same_turn_request(existing, command)
                return existing.turn_id
            refusal = _refusal(state, command, refuse_client_tools=refuse_client_tools)
            if refusal is not None:
                if cached is not None:
                    continue
                raise refusal
            if self._turn_deps is None:
                raise errors.EngineUnavailableError("no engine worker is configured")
            # Before any engine work; `begin` checks again, race-free.
            self.running.check_room(state.tenant, self.defaults.tenant_max_running_turns)
            run = await turn.prepare(
                self._turn_deps,
                state,
                content=command.content,
                options=command.options,
                request_id=request_id,
                streamed=streamed,
                arrived=arrived,
                compaction_only=command.compaction_only,
                request_digest=turn_request_digest(command),
            )
            try:
                await self.running.begin(run, tenant_limit=self.defaults.tenant_max_running_turns)
            except (errors.VersionConflictError, errors.DuplicateEventError):
                # Lost a race (or the cached state was stale): reload from the
                # log and decide again (same request → watch the winner's
                # turn; another turn → fail fast).
                self.repository.forget(cid)
                continue
            return run.turn_id
        raise errors.TurnInProgressError("the conversation is busy", metadata={"conversation": cid})

    async def watch(
        self,
        conversation_id: str,
        turn_id: str,
        *,
        tenant: str | None = ev.DEFAULT_TENANT,
        after_sequence: int = 0,
    ) -> AsyncIterator[TurnUpdate]:
        """The turn's updates after `after_sequence`, live until it ends.

        Served from memory when the turn runs here, else read (and followed)
        from the log: both number updates identically.

        Raises:
            NotFoundError: No such conversation or turn.
        """
        state = await self.load(conversation_id, tenant=tenant)
        live = self.running.get(conversation_id, turn_id)
        if live is not None:
            async for update in live.watch(after_sequence):
                yield update
            return
        found = state.turn(turn_id)
        if found is None:
            raise errors.NotFoundError(f"turn {turn_id!r} not found", metadata={"turnId": turn_id})
        current = await self.load(conversation_id, tenant=None, version=found.start_version - 1)
        projector = TurnProjector(conversation_id, turn_id)
        async with contextlib.aclosing(
            self.repository.follow(conversation_id, after_version=found.start_version - 1)
        ) as events:
            async for event in events:
                current = evolve(current, event)
                for update in projector.apply(event, current):
                    if update.sequence > after_sequence:
                        yield update
                    if update.is_last:
                        return

    async def cancel_turn(
        self,
        conversation_id: str,
        turn_id: str,
        reason: str = "",
        *,
        tenant: str = ev.DEFAULT_TENANT,
    ) -> int | None:
        """Cancel a running turn, on this replica or another: it aborts and records `TurnCancelled`.

        Returns without waiting for the end; the id of the mailbox letter that
        carried the cancel to another replica, or None (see `TurnControl.withdraw`).

        Raises:
            NotFoundError: No such conversation of `tenant`, or no such turn.
            TurnNotRunningHereError: The turn has ended (or runs elsewhere,
                and this process has no mailbox).
        """
        reason = reason or "cancelled by the client"
        live = self.running.get(conversation_id, turn_id)
        if live is not None and live.tenant == tenant:
            self.running.cancel(conversation_id, turn_id, reason)  # runs here: no read
            return None
        state = await self.load(conversation_id, tenant=tenant)
        turn = _turn_of(state, turn_id)
        if turn.status is not TurnStatus.RUNNING:
            raise errors.TurnNotRunningHereError(
                "the turn has ended", metadata={"turnId": turn_id, "status": turn.status.value}
            )
        return await self.control.request_cancel(state, turn, reason)

    async def cancel_and_wait(
        self,
        conversation_id: str,
        turn_id: str,
        reason: str = "",
        *,
        tenant: str = ev.DEFAULT_TENANT,
        timeout_s: float = MAX_WAIT_S,
    ) -> TurnEnded:
        """`CancelTurn`: cancel the turn if it runs (anywhere), then its end as the log records it.

        A turn that has ended already is returned as it ended (a retry after
        a lost reply succeeds).

        Raises:
            NotFoundError: No such conversation of `tenant`, or no such turn.
            DeadlineExceededError: the turn has not ended within `timeout_s`.
        """
        letter = None
        with contextlib.suppress(errors.TurnNotRunningHereError):
            letter = await self.cancel_turn(conversation_id, turn_id, reason, tenant=tenant)
        try:
            return await self.turn_end(conversation_id, turn_id, tenant=tenant, timeout_s=timeout_s)
        finally:
            await self.control.withdraw(letter)

    async def turn_end(
        self,
        conversation_id: str,
        turn_id: str,
        *,
        tenant: str = ev.DEFAULT_TENANT,
        timeout_s: float = MAX_WAIT_S,
    ) -> TurnEnded:
        """The turn's end as the log records it, once it has ended (here or on any replica).

        Raises:
            NotFoundError: No such conversation of `tenant`, or no such turn.
            DeadlineExceededError: the turn has not ended within `timeout_s`.
        """
        try:
            async with asyncio.timeout(timeout_s):
                async for update in self.watch(conversation_id, turn_id, tenant=tenant):
                    if isinstance(update.payload, TurnEnded):
                        return update.payload
        except TimeoutError:
            pass
        raise errors.DeadlineExceededError(
            "the turn has not ended yet; retry to wait longer", metadata={"turnId": turn_id}
        )

    async def submit_tool_results(
        self,
        conversation_id: str,
        turn_id: str,
        results: Sequence[ToolResultInput],
        *,
        tenant: str = ev.DEFAULT_TENANT,
        timeout_s: float = MAX_WAIT_S,
    ) -> list[str]:
        """Answer client-side tool calls a turn awaits (it runs here or on another replica).

        Returns the call ids once the turn has recorded every result (a
        result recorded before, identical, counts as recorded).

        Raises:
            NotFoundError: No such conversation of `tenant`, or no such turn.
            ToolCallNotAwaitedError: a call the turn does not await, or
                another result for an answered call (nothing is recorded).
            DeadlineExceededError: not recorded within `timeout_s`.
        """
        state = await self.load(conversation_id, tenant=tenant)
        turn = _turn_of(state, turn_id)
        return await self.control.submit_tool_results(state, turn, results, timeout_s=timeout_s)

    def submit_tool_result(
        self,
        conversation_id: str,
        turn_id: str,
        call_id: str,
        *,
        result: str,
        error: str,
        tenant: str = ev.DEFAULT_TENANT,
    ) -> None:
        """Answer a client-side tool call of a turn running in this process, without waiting.

        Raises:
            TurnNotRunningHereError: The turn is not running here or awaits no such call.
        """
        live = self.running.get(conversation_id, turn_id)
        _check_owner(live, tenant, turn_id)
        state = self.repository.cached(conversation_id)
        if live is None or state is None:
            raise errors.TurnNotRunningHereError(
                "no such tool call is awaited on this server",
                metadata={"turnId": turn_id, "callId": call_id},
            )
        outcome = turn.check_tool_outcome(
            self.control.pipeline_of(state),
            turn_id,
            call_id,
            result=result,
            error=error,
            blocked_at_us=self.clock(),
        )
        if not live.deliver_tool_outcome(call_id, outcome):
            raise errors.TurnNotRunningHereError(
                "no such tool call is awaited on this server",
                metadata={"turnId": turn_id, "callId": call_id},
            )

    async def shutdown(self) -> None:
        """Stop recovery, cancel running turns (each records TurnCancelled), wait for them.

        Does not close `ownership` (its owner does, after this).
        """
        await self._recovery.stop()
        await self.control.stop()
        await self.running.cancel_all("the service is shutting down")


def _check_owner(live: turn.RunningTurn | None, tenant: str, turn_id: str) -> None:
    """Another tenant's running turn is answered exactly as a turn not running here."""
    if live is not None and live.tenant != tenant:
        raise errors.TurnNotRunningHereError(
            "the turn is not running on this server", metadata={"turnId": turn_id}
        )


def _stale(state: ConversationState, expected: int | None) -> errors.VersionConflictError | None:
    """The refusal of a command that expected another version than `state`'s, if it did."""
    if expected is None or expected == state.version:
        return None
    return errors.VersionConflictError(stream_id(state.conversation_id), expected, state.version)


def _turn_of(state: ConversationState, turn_id: str) -> Turn:
    found = state.turn(turn_id)
    if found is None:
        raise errors.NotFoundError(f"turn {turn_id!r} not found", metadata={"turnId": turn_id})
    return found


def _update_event_id(conversation_id: str, request_id: str) -> str:
    """The event id of the update a request id makes (what `originalId` names)."""
    return derived_id(conversation_id, "updated", request_id)


def _setting_of(path: str) -> str:
    """The update mask path a guardrail field path belongs to: "tools[0].description" -> "tools"."""
    return path.split(".", 1)[0].split("[", 1)[0]


def owned(state: ConversationState, tenant: str | None) -> ConversationState:
    """`state` when `tenant` owns it (or is None: any tenant); else not found, as if absent."""
    if tenant is not None and state.tenant != tenant:
        raise errors.NotFoundError(
            f"conversation {state.conversation_id!r} not found",
            metadata={"conversation": state.conversation_id},
        )
    return state


def turn_request_digest(command: TurnInput) -> str:
    """What a turn's request id stands for: its message, its options, its kind.

    Not the conversation (the turn id derives from it and the request id, so
    another conversation is another turn), nor `expected_version` (a
    precondition, not content), nor the tenant. A digest, not a signature:
    it only tells a retry from a request id reused for something else.
    """
    content = {
        "content": command.content,
        "options": dataclasses.asdict(command.options),
        "compaction_only": command.compaction_only,
    }
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _check_same_turn_request(existing: Turn, command: TurnInput) -> None:
    """A retry finds its turn; a request id reused with other content is refused.

    Turns recorded before digests (empty) are taken as retries, as they were.

    Raises:
        RequestIdReusedError: the turn was started by other content.
    """
    if existing.request_digest and existing.request_digest != turn_request_digest(command):
        raise errors.RequestIdReusedError(
            f"request id {existing.request_id!r} started another turn with other content",
            metadata={"originalId": existing.turn_id},
        )


def _created_content(state: ConversationState) -> tuple[object, ...]:
    """What a CreateConversation request id stands for: the settings it recorded."""
    return (
        state.system_prompt,
        state.model,
        state.sampling,
        state.tools,
        state.guardrail_profile,
        state.labels,
        state.max_tool_round_trips,
        state.context_policy,
    )


def _refusal(
    state: ConversationState, command: TurnInput, *, refuse_client_tools: bool = False
) -> errors.TurnlogError | None:
    """Why `state` admits no new turn for `command`, or None.

    `refuse_client_tools`: the caller waits for the end without a stream
    (`SendMessage`), so it could never answer a client-side tool: such a turn
    would hold the conversation until the tool timeout, so it is refused at once.
    """
    cid = state.conversation_id
    if state.archived:
        return errors.ConversationArchivedError(
            "the conversation is archived", metadata={"conversation": cid}
        )
    client_tools = [t.name for t in state.tools if t.client_side]
    if refuse_client_tools and client_tools and not command.compaction_only:
        return errors.ClientToolsNeedStreamError(
            "the conversation has client-side tools: run its turns with StreamTurn or Converse",
            metadata={"conversation": cid, "tools": ",".join(client_tools)[:256]},
        )
    if (stale := _stale(state, command.expected_version)) is not None:
        return stale
    if state.open_turn is not None:
        return errors.TurnInProgressError(
            "another turn of this conversation is running",
            metadata={"turnId": state.open_turn.turn_id},
        )
    return None


__all__ = [
    "ConversationApplication",
    "ConversationSummary",
    "CreateConversation",
    "ListQuery",
    "Page",
    "ServiceDefaults",
    "TextPiece",
    "ToolResultInput",
    "TurnInput",
    "TurnOptions",
    "TurnResult",
    "UpdateConversation",
]
