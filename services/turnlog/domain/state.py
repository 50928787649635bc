"""Conversation state as a pure fold over its events.

`evolve(state, event)` returns the next state; `fold(events)` replays a whole
stream. Neither reads a clock, draws a random number or does I/O, so
replaying a log always rebuilds the same state (the property the replay,
fork and audit features stand on).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from turnlog.domain import events as ev


class TurnStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    message_id: str
    role: ev.Role
    content: str
    turn_id: str = ""
    tool_calls: tuple[ev.ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Turn:
    turn_id: str
    request_id: str
    status: TurnStatus
    started_at_us: int
    ended_at_us: int | None = None
    finish_reason: ev.FinishReason | None = None
    usage: ev.Usage = field(default_factory=ev.Usage)
    generations: int = 0
    tool_round_limit_reached: bool = False
    outcome_reason: str = ""
    start_version: int = 0
    """The stream version of the turn's `TurnStarted` event."""
    compaction_only: bool = False
    """A `CompactConversation` unit (no messages)."""
    request_digest: str = ""
    """Of the request that started it ("" when recorded before digests)."""
    failure: ev.TurnFailed | None = None
    """For a FAILED turn: the event that ended it (the turn's structured error)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingsUpdate:
    """A recorded `ConversationUpdated` and its stream version (the idempotency lookup of updates)."""

    version: int
    event: ev.ConversationUpdated


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationState:
    """Everything the service knows about one conversation at one version.

    `version` is the stream version of the last event folded in (0 before the
    first). A state with `exists` False is the empty stream.
    """

    conversation_id: str = ""
    version: int = 0
    exists: bool = False
    tenant: str = ev.DEFAULT_TENANT
    """The tenant that owns the conversation (`DEFAULT_TENANT` for one recorded before tenancy)."""
    created_at_us: int = 0
    system_prompt: str = ""
    model: str = ""
    sampling: ev.SamplingParams = field(default_factory=ev.SamplingParams)
    tools: tuple[ev.ToolDefinition, ...] = ()
    guardrail_profile: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    forked_from: tuple[str, int] | None = None
    archived: bool = False
    messages: tuple[Message, ...] = ()
    turns: tuple[Turn, ...] = ()
    pending_tool_calls: tuple[ev.ToolCall, ...] = ()
    create_request_id: str = ""
    max_tool_round_trips: int | None = None
    context_policy: ev.ContextPolicy | None = None
    context_window: ev.ContextWindow | None = None
    """The window of the latest generation's prompt (None before any was recorded)."""
    compactions: tuple[ev.ContextCompacted, ...] = ()
    """Every summary recorded, oldest first (a window names the one it used)."""
    updates: tuple[SettingsUpdate, ...] = ()
    """Every `ConversationUpdated` with a request id, oldest first (retries find theirs here)."""

    def compaction(self, compaction_id: str) -> ev.ContextCompacted | None:
        """The compaction with this id, if any ("" : none)."""
        if compaction_id:
            for c in reversed(self.compactions):
                if c.compaction_id == compaction_id:
                    return c
        return None

    @property
    def open_turn(self) -> Turn | None:
        """The turn that has started and not ended, if any (at most one)."""
        if self.turns and self.turns[-1].status is TurnStatus.RUNNING:
            return self.turns[-1]
        return None

    def turn(self, turn_id: str) -> Turn | None:
        """The turn with this id, if any."""
        for t in reversed(self.turns):
            if t.turn_id == turn_id:
                return t
        return None

    def update_for_request(self, request_id: str) -> SettingsUpdate | None:
        """The settings update a request id recorded, if any (the idempotency lookup)."""
        for u in reversed(self.updates):
            if u.event.request_id == request_id:
                return u
        return None

    def turn_for_request(self, request_id: str) -> Turn | None:
        """The turn a request id started, if any (the idempotency lookup)."""
        for t in reversed(self.turns):
            if t.request_id == request_id:
                return t
        return None


#: The message id of the system message (`messages_with_system`).
SYSTEM_MESSAGE_ID = "system"


def system_message(state: ConversationState) -> Message | None:
    """The conversation's system prompt as its first message (None without a system prompt).

    The log records the system prompt as a setting, not as a message; the API
    shows it as the first message, as the chat the model is given holds it.
    """
    if not state.system_prompt:
        return None
    return Message(message_id=SYSTEM_MESSAGE_ID, role=ev.Role.SYSTEM, content=state.system_prompt)


def messages_with_system(state: ConversationState) -> tuple[Message, ...]:
    """The conversation's messages, oldest first, its system message (if any) first."""
    first = system_message(state)
    return state.messages if first is None else (first, *state.messages)


class InvalidTransitionError(Exception):
    """An event does not apply to the state (a bug or a corrupted log, never user input)."""


def evolve(state: ConversationState, event: ev.Event) -> ConversationState:
    """Apply one event; the result's version is one more than the input's."""
    state = _apply(state, event)
    return replace(state, version=state.version + 1)


def fold(events: Iterable[ev.Event], state: ConversationState | None = None) -> ConversationState:
    """Replay events onto `state` (an empty conversation by default)."""
    current = state or ConversationState()
    for event in events:
        current = evolve(current, event)
    return current


def _replace_open_turn(
    state: ConversationState, turn_id: str, **changes: object
) -> ConversationState:
    changed = replace(_require_open(state, turn_id), **changes)  # type: ignore[arg-type]
    return replace(state, turns=(*state.turns[:-1], changed))


def _end_turn(state: ConversationState, turn_id: str, **changes: object) -> ConversationState:
    """Close the open turn; tool calls it left unanswered are dropped with it."""
    return replace(_replace_open_turn(state, turn_id, **changes), pending_tool_calls=())


def _apply(state: ConversationState, event: ev.Event) -> ConversationState:
    if not state.exists and not isinstance(event, ev.ConversationCreated | ev.ConversationForked):
        raise InvalidTransitionError(f"{type(event).__name__} before the conversation exists")
    match event:
        case ev.ConversationCreated():
            if state.exists and state.forked_from is None:
                raise InvalidTransitionError("conversation created twice")
            return replace(
                state,
                conversation_id=state.conversation_id or event.conversation_id,
                # A fork's copy of its source's creation keeps the fork's tenant
                # (the same, since no fork crosses tenants).
                tenant=state.tenant if state.forked_from else event.tenant or ev.DEFAULT_TENANT,
                exists=True,
                created_at_us=state.created_at_us or event.created_at_us,
                system_prompt=event.system_prompt,
                model=event.model,
                sampling=event.sampling,
                tools=event.tools,
                guardrail_profile=event.guardrail_profile,
                labels=event.labels,
                create_request_id=event.request_id,
                max_tool_round_trips=event.max_tool_round_trips,
                context_policy=event.context_policy,
            )
        case ev.ConversationForked():
            if state.exists:
                raise InvalidTransitionError("a fork must start its stream")
            return replace(
                state,
                conversation_id=event.conversation_id,
                tenant=event.tenant or ev.DEFAULT_TENANT,
                created_at_us=event.forked_at_us,
                forked_from=(event.source_conversation_id, event.source_version),
            )
        case ev.ConversationArchived():
            return replace(state, archived=True)
        case ev.ConversationUnarchived():
            return replace(state, archived=False)
        case ev.ConversationUpdated():
            return _update_settings(state, event)
        case ev.MessageAppended():
            message = Message(
                message_id=event.message_id,
                role=event.role,
                content=event.content,
                turn_id=event.turn_id,
            )
            return replace(state, messages=(*state.messages, message))
        case ev.TurnStarted():
            if state.open_turn is not None:
                raise InvalidTransitionError("a turn started while another is open")
            turn = Turn(
                turn_id=event.turn_id,
                request_id=event.request_id,
                status=TurnStatus.RUNNING,
                started_at_us=event.started_at_us,
                start_version=state.version + 1,
                compaction_only=event.compaction_only,
                request_digest=event.request_digest,
            )
            return replace(state, turns=(*state.turns, turn))
        case ev.GenerationStarted():
            open_turn = _require_open(state, event.turn_id)
            if event.context is not None:
                state = replace(state, context_window=event.context)
            return _replace_open_turn(state, event.turn_id, generations=open_turn.generations + 1)
        case ev.GenerationCompleted():
            open_turn = _require_open(state, event.turn_id)
            message = Message(
                message_id=event.generation_id,
                role=ev.Role.ASSISTANT,
                content=event.text,
                turn_id=event.turn_id,
                tool_calls=event.tool_calls,
            )
            usage = ev.Usage(
                prompt_tokens=open_turn.usage.prompt_tokens + event.usage.prompt_tokens,
                completion_tokens=open_turn.usage.completion_tokens + event.usage.completion_tokens,
                cached_prompt_tokens=open_turn.usage.cached_prompt_tokens
                + event.usage.cached_prompt_tokens,
            )
            state = replace(state, messages=(*state.messages, message))
            return _replace_open_turn(state, event.turn_id, usage=usage)
        case ev.ToolCallRequested():
            _require_open(state, event.turn_id)
            return replace(state, pending_tool_calls=(*state.pending_tool_calls, event.call))
        case ev.ToolCallCompleted() | ev.ToolCallFailed():
            _require_open(state, event.turn_id)
            content = event.result if isinstance(event, ev.ToolCallCompleted) else event.error
            message = Message(
                message_id=f"{event.turn_id}/{event.call_id}",
                role=ev.Role.TOOL,
                content=content,
                turn_id=event.turn_id,
                tool_call_id=event.call_id,
            )
            pending = tuple(c for c in state.pending_tool_calls if c.call_id != event.call_id)
            return replace(state, messages=(*state.messages, message), pending_tool_calls=pending)
        case ev.ToolRoundLimitReached():
            _require_open(state, event.turn_id)
            return _replace_open_turn(state, event.turn_id, tool_round_limit_reached=True)
        case ev.ContextCompacted():
            _require_open(state, event.turn_id)
            return replace(state, compactions=(*state.compactions, event))
        case ev.GuardrailDecided() | ev.TextStreamed() | ev.TextRetracted():
            # Audit and stream-resume records: they change no conversation state
            # (the completed generation carries the final text).
            _require_open(state, event.turn_id)
            return state
        case ev.TurnCompleted():
            return _end_turn(
                state,
                event.turn_id,
                status=TurnStatus.COMPLETED,
                ended_at_us=event.completed_at_us,
                finish_reason=event.finish_reason,
            )
        case ev.TurnFailed():
            return _end_turn(
                state,
                event.turn_id,
                status=TurnStatus.FAILED,
                ended_at_us=event.failed_at_us,
                outcome_reason=f"{event.phase}: {event.error_kind}",
                failure=event,
            )
        case ev.TurnCancelled():
            return _end_turn(
                state,
                event.turn_id,
                status=TurnStatus.CANCELLED,
                ended_at_us=event.cancelled_at_us,
                outcome_reason=event.reason,
            )
        case ev.TurnBlocked():
            return _end_turn(
                state,
                event.turn_id,
                status=TurnStatus.BLOCKED,
                ended_at_us=event.blocked_at_us,
                outcome_reason=f"{event.stage}/{event.guardrail}: {event.reason}",
            )
        case ev.TurnInterrupted():
            return _end_turn(
                state,
                event.turn_id,
                status=TurnStatus.INTERRUPTED,
                ended_at_us=event.detected_at_us,
            )
    raise InvalidTransitionError(f"unknown event {type(event).__name__}")


def _update_settings(state: ConversationState, event: ev.ConversationUpdated) -> ConversationState:
    """Replace the settings `event.fields` names; the others stay as they are."""
    changes: dict[str, object] = {}
    for name in event.fields:
        match name:
            case "system_prompt":
                changes["system_prompt"] = event.system_prompt
            case "tools":
                changes["tools"] = event.tools
            case "defaults":
                changes["model"] = event.model
                changes["sampling"] = event.sampling
                changes["max_tool_round_trips"] = event.max_tool_round_trips
                changes["context_policy"] = event.context_policy
            case "labels":
                changes["labels"] = event.labels
            case "guardrail_profile":
                changes["guardrail_profile"] = event.guardrail_profile
            case _:
                raise InvalidTransitionError(f"ConversationUpdated names an unknown field {name!r}")
    if event.request_id:
        record = SettingsUpdate(version=state.version + 1, event=event)
        changes["updates"] = (*state.updates, record)
    return replace(state, **changes)  # type: ignore[arg-type]


def _require_open(state: ConversationState, turn_id: str) -> Turn:
    open_turn = state.open_turn
    if open_turn is None or open_turn.turn_id != turn_id:
        raise InvalidTransitionError(f"turn {turn_id!r} is not the open turn")
    return open_turn
