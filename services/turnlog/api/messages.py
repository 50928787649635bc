"""Domain values to response messages: conversations, turns, turn events, log events, errors as data."""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from google.protobuf import descriptor, message, timestamp_pb2

from turnlog import errors, grpc_errors
from turnlog.api.requests import DEFAULT_CONVERSATION_LIMIT
from turnlog.conversation.projection import (
    Retraction,
    TextPiece,
    ToolCallPiece,
    ToolFinished,
    ToolStarted,
    TurnEnded,
    TurnUpdate,
)
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, Message, Turn, TurnStatus, system_message
from turnlog.eventlog import conversation_of
from turnlog.history.audit import ProblemKind
from turnlog.storage import RecordedEvent
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import errors_pb2 as erpb
from turnlog.v1 import events_pb2 as epb
from turnlog.v1 import history_pb2 as hpb


def timestamp(us: int | None) -> timestamp_pb2.Timestamp | None:
    if us is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


_TURN_STATUS = {
    TurnStatus.RUNNING: pb.TURN_STATUS_RUNNING,
    TurnStatus.COMPLETED: pb.TURN_STATUS_COMPLETED,
    TurnStatus.FAILED: pb.TURN_STATUS_FAILED,
    TurnStatus.CANCELLED: pb.TURN_STATUS_CANCELLED,
    TurnStatus.BLOCKED: pb.TURN_STATUS_BLOCKED,
    TurnStatus.INTERRUPTED: pb.TURN_STATUS_INTERRUPTED,
}
_FINISH = {
    ev.FinishReason.STOP: pb.FINISH_REASON_STOP,
    ev.FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    ev.FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    ev.FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    ev.FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    ev.FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
_ROLE = {
    ev.Role.SYSTEM: pb.ROLE_SYSTEM,
    ev.Role.USER: pb.ROLE_USER,
    ev.Role.ASSISTANT: pb.ROLE_ASSISTANT,
    ev.Role.TOOL: pb.ROLE_TOOL,
}
_STAGE = {
    ev.GuardrailStage.REQUEST_INTERCEPT: spb.GUARDRAIL_STAGE_REQUEST_INTERCEPT,
    ev.GuardrailStage.SANITIZE_REQUEST: spb.GUARDRAIL_STAGE_SANITIZE_REQUEST,
    ev.GuardrailStage.CONDITIONAL_EXECUTION: spb.GUARDRAIL_STAGE_CONDITIONAL_EXECUTION,
    ev.GuardrailStage.EXECUTION_INTERCEPT: spb.GUARDRAIL_STAGE_EXECUTION_INTERCEPT,
    ev.GuardrailStage.SANITIZE_RESPONSE: spb.GUARDRAIL_STAGE_SANITIZE_RESPONSE,
}
_VERDICT = {
    ev.Verdict.ALLOW: spb.VERDICT_ALLOW,
    ev.Verdict.MODIFY: spb.VERDICT_MODIFY,
    ev.Verdict.BLOCK: spb.VERDICT_BLOCK,
}


def tool_call_message(call: ev.ToolCall) -> pb.ToolCall:
    return pb.ToolCall(call_id=call.call_id, name=call.name, arguments_json=call.arguments_json)


def turn_message(turn: Turn) -> pb.Turn:
    message = pb.Turn(
        turn_id=turn.turn_id,
        request_id=turn.request_id,
        status=_TURN_STATUS[turn.status],
        finish_reason=(
            _FINISH[turn.finish_reason] if turn.finish_reason else pb.FINISH_REASON_UNSPECIFIED
        ),
        usage=pb.Usage(
            prompt_tokens=turn.usage.prompt_tokens,
            completion_tokens=turn.usage.completion_tokens,
            cached_prompt_tokens=turn.usage.cached_prompt_tokens,
        ),
        start_time=timestamp(turn.started_at_us),
        outcome_reason=turn.outcome_reason,
        tool_round_limit_reached=turn.tool_round_limit_reached,
        compaction_only=turn.compaction_only,
    )
    if turn.ended_at_us is not None:
        message.end_time.FromMicroseconds(turn.ended_at_us)
    if turn.failure is not None:
        message.error.CopyFrom(failure_detail(turn.failure))
    return message


def failure_detail(failed: ev.TurnFailed) -> erpb.ErrorDetail:
    """The `ErrorDetail` of a failed turn: the status a unary call would have failed with.

    The code comes from the recorded reason through the one status table
    (`grpc_errors`), so a turn's error and an RPC's error of the same reason
    never disagree. Events recorded before `message` was get a message made
    of the phase and reason.
    """
    return erpb.ErrorDetail(
        code=grpc_errors.code_of_reason(failed.error_kind),
        reason=failed.error_kind,
        message=failed.message or f"the turn failed in its {failed.phase} ({failed.error_kind})",
        metadata=dict(failed.metadata),
        retryable=failed.retryable,
        phase=failed.phase,
    )


def defaults_message(state: ConversationState) -> pb.TurnDefaults:
    s = state.sampling
    message = pb.TurnDefaults(stop=list(s.stop))
    if state.model:
        message.model = state.model
    for name in ("temperature", "top_p", "top_k", "max_tokens", "seed"):
        value = getattr(s, name)
        if value is not None:
            setattr(message, name, value)
    if state.max_tool_round_trips is not None:
        message.max_tool_round_trips = state.max_tool_round_trips
    if s.regex is not None:
        message.first_generation_regex = s.regex
    if state.context_policy is not None:
        message.context_policy = CONTEXT_POLICY[state.context_policy]
    return message


CONTEXT_POLICY = {
    ev.ContextPolicy.DISABLED: pb.CONTEXT_POLICY_DISABLED,
    ev.ContextPolicy.TRUNCATE: pb.CONTEXT_POLICY_TRUNCATE,
    ev.ContextPolicy.COMPACT: pb.CONTEXT_POLICY_COMPACT,
}


def context_window_message(window: ev.ContextWindow) -> pb.ContextWindow:
    message = pb.ContextWindow(
        policy=CONTEXT_POLICY[window.policy],
        first_version=window.first_version,
        left_out_turns=window.left_out_turns,
        prompt_tokens=window.prompt_tokens,
        max_context_tokens=window.max_context_tokens,
        max_tokens=window.max_tokens,
    )
    if window.requested_max_tokens is not None:
        message.requested_max_tokens = window.requested_max_tokens
    message.compaction_id = window.compaction_id
    return message


def compaction_message(c: ev.ContextCompacted) -> pb.ContextCompaction:
    return pb.ContextCompaction(
        compaction_id=c.compaction_id,
        turn_id=c.turn_id,
        first_version=c.first_version,
        through_version=c.through_version,
        summarized_turns=c.summarized_turns,
        summary=c.summary,
        model=c.model,
        summary_tokens=c.summary_tokens,
        replaced_tokens=c.replaced_tokens,
        previous_compaction_id=c.previous_compaction_id,
    )


def chat_message(m: Message) -> pb.Message:
    return pb.Message(
        message_id=m.message_id,
        role=_ROLE[m.role],
        content=m.content,
        turn_id=m.turn_id,
        tool_calls=[tool_call_message(c) for c in m.tool_calls],
        tool_call_id=m.tool_call_id,
    )


def conversation_message(
    state: ConversationState,
    *,
    full: bool = True,
    message_limit: int = DEFAULT_CONVERSATION_LIMIT,
    turn_limit: int = DEFAULT_CONVERSATION_LIMIT,
) -> pb.Conversation:
    """The API view of a folded conversation.

    With `full`, `messages` holds the system message (when there is a system
    prompt) and the latest `message_limit` other messages, `turns` the latest
    `turn_limit` turns; without, neither. `message_count` and `turn_count`
    always count them all. Only what is sent is copied, so a large
    conversation costs its limits, not its length.
    """
    system = system_message(state)
    message = pb.Conversation(
        name=f"conversations/{state.conversation_id}",
        version=state.version,
        create_time=timestamp(state.created_at_us),
        state=pb.CONVERSATION_STATE_ARCHIVED if state.archived else pb.CONVERSATION_STATE_ACTIVE,
        system_prompt=state.system_prompt,
        defaults=defaults_message(state),
        tools=[
            pb.ToolDefinition(
                name=t.name,
                description=t.description,
                parameters_json_schema=t.parameters_json_schema,
                client_side=t.client_side,
            )
            for t in state.tools
        ],
        guardrail_profile=state.guardrail_profile,
        labels=dict(state.labels),
        message_count=len(state.messages) + (system is not None),
        turn_count=len(state.turns),
    )
    if state.forked_from is not None:
        message.fork_origin.conversation = f"conversations/{state.forked_from[0]}"
        message.fork_origin.version = state.forked_from[1]
    if state.context_window is not None:
        message.context_window.CopyFrom(context_window_message(state.context_window))
    if full:
        if system is not None:
            message.messages.append(chat_message(system))
        if message_limit > 0:
            message.messages.extend(chat_message(m) for m in state.messages[-message_limit:])
        if turn_limit > 0:
            message.turns.extend(turn_message(t) for t in state.turns[-turn_limit:])
    return message


def decision_message(d: ev.GuardrailDecided) -> spb.GuardrailDecision:
    return spb.GuardrailDecision(
        stage=_STAGE[d.stage],
        guardrail=d.guardrail,
        guardrail_version=d.guardrail_version,
        verdict=_VERDICT[d.verdict],
        reason=d.reason,
    )


def execution_message(f: ToolFinished) -> spb.ToolExecution:
    return spb.ToolExecution(call=tool_call_message(f.call), result=f.result, error=f.error)


def assistant_message(g: ev.GenerationCompleted) -> pb.Message:
    return pb.Message(
        message_id=g.generation_id,
        role=pb.ROLE_ASSISTANT,
        content=g.text,
        turn_id=g.turn_id,
        tool_calls=[tool_call_message(c) for c in g.tool_calls],
    )


def turn_event(update: TurnUpdate) -> spb.TurnEvent:
    """The API message of one turn update."""
    message = spb.TurnEvent(turn_id=update.turn_id, sequence=update.sequence)
    p = update.payload
    if isinstance(p, ev.TurnStarted):
        message.turn_started.conversation = f"conversations/{update.conversation_id}"
        message.turn_started.request_id = p.request_id
    elif isinstance(p, TextPiece):
        message.text_delta.generation_id = p.generation_id
        message.text_delta.text = p.text
    elif isinstance(p, ToolCallPiece):
        message.tool_call_delta.generation_id = p.generation_id
        message.tool_call_delta.call.CopyFrom(tool_call_message(p.call))
    elif isinstance(p, ev.GuardrailDecided):
        message.guardrail_decision.CopyFrom(decision_message(p))
    elif isinstance(p, Retraction):
        message.retraction.generation_id = p.event.generation_id
        message.retraction.retracted_chars = p.chars
        message.retraction.retracted_utf8_bytes = p.utf8_bytes
        message.retraction.reason = p.event.reason
    elif isinstance(p, ev.GenerationCompleted):
        message.assistant_message.CopyFrom(assistant_message(p))
    elif isinstance(p, ToolStarted):
        message.tool_execution_started.call.CopyFrom(tool_call_message(p.call))
        message.tool_execution_started.client_side = p.client_side
    elif isinstance(p, ToolFinished):
        message.tool_execution_finished.execution.CopyFrom(execution_message(p))
    elif isinstance(p, ev.ToolRoundLimitReached):
        message.tool_round_limit_reached.limit = p.limit
    elif isinstance(p, ev.ContextCompacted):
        message.context_compacted.CopyFrom(compaction_message(p))
    elif isinstance(p, TurnEnded):
        message.turn_ended.turn.CopyFrom(turn_message(p.turn))
        message.turn_ended.conversation_version = p.conversation_version
    return message


PROBLEM = {
    None: hpb.VERIFICATION_PROBLEM_UNSPECIFIED,
    ProblemKind.VERSION_SEQUENCE: hpb.VERIFICATION_PROBLEM_VERSION_SEQUENCE,
    ProblemKind.HASH_CHAIN: hpb.VERIFICATION_PROBLEM_HASH_CHAIN,
    ProblemKind.FOLD: hpb.VERIFICATION_PROBLEM_FOLD,
}


def error_detail(error: errors.TurnlogError) -> erpb.ErrorDetail:
    """An error as data: the code, reason, message and metadata its status would carry."""
    info = grpc_errors.error_info_of(error)
    return erpb.ErrorDetail(
        code=grpc_errors.code_of(error),
        reason=info.reason,
        message=grpc_errors.public_message(error),
        metadata={k: v for k, v in info.metadata.items() if k != "retryable"},
        retryable=error.retryable,
        phase=error.metadata.get("phase", ""),
    )


def action_rejected(index: int, turn_id: str, error: errors.TurnlogError) -> spb.ConverseResponse:
    """The `Converse` answer to its `index`-th request (1-based), refused with `error`."""
    return spb.ConverseResponse(
        action_rejected=spb.ActionRejected(
            action_index=index, turn_id=turn_id, error=error_detail(error)
        )
    )


def log_event(event: RecordedEvent, *, raw: bool = True, typed: bool = False) -> hpb.LogEvent:
    """The API message of a stored event: metadata as its stored text, the payload in the forms asked.

    Args:
        event: the stored event.
        raw: send the payload as its stored text (`data_json`).
        typed: send the payload as the typed event of its type (`LogEvent.event`),
            decoded and upcast to its current shape (`fill_typed_event`). An
            event with no typed form carries `data_json` whatever `raw` says.
    """
    message = hpb.LogEvent(
        conversation=f"conversations/{conversation_of(event.stream_id)}",
        stream_id=event.stream_id,
        version=event.stream_version,
        event_id=str(event.event_id),
        type=event.type,
        data_json=event.data_json if raw else "",
        metadata_json=event.metadata_json,
        prev_hash=event.prev_hash,
        hash=event.hash,
        position=str(event.position),
    )
    message.record_time.FromDatetime(event.recorded_at)
    if typed and not fill_typed_event(message, event) and not raw:
        message.data_json = event.data_json
    return message


# -- typed events ------------------------------------------------------------------
#
# Each typed event message mirrors its domain event field for field (the same
# names; proto/turnlog/v1/events.proto), so one walk over the dataclass fills
# any of them: nested dataclasses become messages, tuples repeated fields,
# the labels' (key, value) pairs a map, enums their proto values, and None
# leaves an optional field unset. `_check_typed_events` proves the mirror at
# import, so a domain field without a proto field fails there, not mid-read.

_RECORDED_STAGE = {
    ev.GuardrailStage.REQUEST_INTERCEPT: epb.RECORDED_GUARDRAIL_STAGE_REQUEST_INTERCEPT,
    ev.GuardrailStage.SANITIZE_REQUEST: epb.RECORDED_GUARDRAIL_STAGE_SANITIZE_REQUEST,
    ev.GuardrailStage.CONDITIONAL_EXECUTION: epb.RECORDED_GUARDRAIL_STAGE_CONDITIONAL_EXECUTION,
    ev.GuardrailStage.EXECUTION_INTERCEPT: epb.RECORDED_GUARDRAIL_STAGE_EXECUTION_INTERCEPT,
    ev.GuardrailStage.SANITIZE_RESPONSE: epb.RECORDED_GUARDRAIL_STAGE_SANITIZE_RESPONSE,
}
_RECORDED_VERDICT = {
    ev.Verdict.ALLOW: epb.RECORDED_VERDICT_ALLOW,
    ev.Verdict.MODIFY: epb.RECORDED_VERDICT_MODIFY,
    ev.Verdict.BLOCK: epb.RECORDED_VERDICT_BLOCK,
}
#: The proto value of every domain enum member, by domain enum.
_ENUM_VALUES: Mapping[type[enum.Enum], Mapping[Any, int]] = {
    ev.Role: _ROLE,
    ev.FinishReason: _FINISH,
    ev.ContextPolicy: CONTEXT_POLICY,
    ev.GuardrailStage: _RECORDED_STAGE,
    ev.Verdict: _RECORDED_VERDICT,
}


def _oneof_member(type_name: str) -> str:
    """The `LogEvent.event` member of an event type: "TurnCompleted" -> "turn_completed"."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type_name).lower()


#: The `LogEvent.event` member of each domain event type.
TYPED_MEMBERS: Mapping[type[ev.Event], str] = {
    cls: _oneof_member(cls.__name__) for cls in ev.EVENT_TYPES
}

_SCALAR, _ENUM, _MESSAGE, _REPEATED, _REPEATED_MESSAGES, _MAP = range(6)


@cache
def _plan(cls: Any, message_type: descriptor.Descriptor) -> tuple[tuple[str, int], ...]:
    """How to fill a message of `message_type` from the dataclass `cls`: (field, kind) each.

    Raises:
        KeyError: a field of `cls` has no field of the same name in the message.
    """
    plan = []
    for f in dataclasses.fields(cls):
        field = message_type.fields_by_name[f.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            kind = _MAP
        elif field.is_repeated:
            kind = _REPEATED_MESSAGES if field.message_type is not None else _REPEATED
        elif field.message_type is not None:
            kind = _MESSAGE
        elif field.enum_type is not None:
            kind = _ENUM
        else:
            kind = _SCALAR
        plan.append((f.name, kind))
    return tuple(plan)


def _fill(target: message.Message, value: object) -> None:
    """Sets the fields of `target` from the dataclass `value` (see `_plan`)."""
    target.SetInParent()
    cls: Any = type(value)
    for name, kind in _plan(cls, target.DESCRIPTOR):
        item: Any = getattr(value, name)
        if item is None:
            continue
        if kind == _SCALAR:
            setattr(target, name, item)
        elif kind == _ENUM:
            setattr(target, name, _ENUM_VALUES[type(item)][item])
        elif kind == _MESSAGE:
            _fill(getattr(target, name), item)
        elif kind == _REPEATED:
            getattr(target, name).extend(item)
        elif kind == _REPEATED_MESSAGES:
            repeated = getattr(target, name)
            for element in item:
                _fill(repeated.add(), element)
        else:
            getattr(target, name).update(dict(item))


#: What decoding a stored payload raises when it does not fit its type (as in `audit`).
_UNDECODABLE = (
    codec.UnknownEventTypeError,
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    RecursionError,
)


def fill_typed_event(message: hpb.LogEvent, event: RecordedEvent) -> bool:
    """Sets `message.event` to the typed form of `event`; False (and unset) when it has none.

    The payload is decoded as the domain decodes it (`codec.decode_stored`,
    which upcasts older shapes), so the typed event has the type's current
    shape. There is no typed form for an event type this code does not know,
    a payload that does not decode, or a value the message cannot hold (an
    integer past 64 bits, a string with lone surrogates).
    """
    try:
        domain = codec.decode_stored(event)
    except _UNDECODABLE:
        return False
    member = TYPED_MEMBERS[type(domain)]
    try:
        _fill(getattr(message, member), domain)
    except (TypeError, ValueError, OverflowError):
        message.ClearField("event")
        return False
    return True


def _without_none(hint: Any) -> Any:
    """X of an `X | None` type hint; any other hint as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def _check_fits(cls: Any, message_type: descriptor.Descriptor) -> None:
    """Fails unless every field of the dataclass `cls`, nested ones too, has its proto field."""
    hints = typing.get_type_hints(cls)
    for name, kind in _plan(cls, message_type):
        hint = _without_none(hints[name])
        field = message_type.fields_by_name[name]
        if kind in (_MESSAGE, _REPEATED_MESSAGES) and field.message_type is not None:
            _check_fits(hint if kind == _MESSAGE else typing.get_args(hint)[0], field.message_type)
        elif kind == _ENUM and field.enum_type is not None:
            values = _ENUM_VALUES[hint]
            numbers = {v.number for v in field.enum_type.values}
            if set(values) != set(hint) or not set(values.values()) <= numbers:
                raise AssertionError(f"{cls.__name__}.{name}: the enum values do not match")


def _check_typed_events() -> None:
    """Fails at import unless every domain event type has a typed form that mirrors it."""
    oneof = hpb.LogEvent.DESCRIPTOR.oneofs_by_name["event"]
    members = {f.name: f for f in oneof.fields}
    # A member may come before its domain type (the contract is committed
    # first); a domain type without a member would fail mid-read.
    if not set(TYPED_MEMBERS.values()) <= set(members):
        raise AssertionError("LogEvent.event lacks a member for a domain event type")
    for cls, member in TYPED_MEMBERS.items():
        message_type = members[member].message_type
        if message_type is None:
            raise AssertionError(f"LogEvent.{member} is not a message")
        _check_fits(cls, message_type)


_check_typed_events()
