"""`turnlog.v1.ConversationService`: a thin gRPC adapter over the application.

Handlers validate the request (INVALID_ARGUMENT with BadRequest field
violations), translate messages to application inputs and results back, and
turn every error into a status through `turnlog.conversation.status`. No
business rule lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf import timestamp_pb2

from turnlog import errors
from turnlog.conversation import application as appl
from turnlog.conversation.projection import (
    TextPiece,
    ToolCallPiece,
    ToolFinished,
    ToolStarted,
    TurnEnded,
    TurnUpdate,
)
from turnlog.conversation.status import FieldViolationsError, to_status
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, Turn, TurnStatus
from turnlog.history import service as hist
from turnlog.history.audit import ProblemKind
from turnlog.storage import Position, RecordedEvent
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_REQUEST_ID = 128
MAX_CONTENT_CHARS = 1_000_000
MAX_PAGE_SIZE = 500
MAX_REGEX_CHARS = 4096
MAX_EVENTS_PAGE = 1000
DEFAULT_EVENTS_PAGE = 100
MAX_EVENT_TYPES = 64
#: The largest JSONL file ImportConversation accepts (bytes, all parts together).
MAX_IMPORT_BYTES = 256 * 1024 * 1024

Context = grpc.aio.ServicerContext[Any, Any]


class _Violations:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise FieldViolationsError(self.items)


def _conversation_id(name: str, field: str, v: _Violations) -> str:
    prefix, _, cid = name.partition("/")
    if prefix != "conversations" or not _ID.match(cid):
        v.add(field, "must be conversations/{id} with an id of 1-63 letters, digits, - or _")
    return cid


def _request_id(value: str, field: str, v: _Violations) -> None:
    if len(value) > MAX_REQUEST_ID:
        v.add(field, f"at most {MAX_REQUEST_ID} characters")


def _options(message: pb.TurnDefaults, field: str, v: _Violations) -> appl.TurnOptions:
    if message.HasField("temperature") and not 0 <= message.temperature <= 2:
        v.add(f"{field}.temperature", "must be between 0 and 2")
    if message.HasField("top_p") and not 0 < message.top_p <= 1:
        v.add(f"{field}.top_p", "must be in (0, 1]")
    if message.HasField("max_tokens") and message.max_tokens < 1:
        v.add(f"{field}.max_tokens", "must be at least 1")
    if message.HasField("max_tool_round_trips") and not 0 <= message.max_tool_round_trips <= 32:
        v.add(f"{field}.max_tool_round_trips", "must be between 0 and 32")
    if len(message.stop) > 16:
        v.add(f"{field}.stop", "at most 16 stop strings")
    if message.HasField("first_generation_regex") and not (
        0 < len(message.first_generation_regex) <= MAX_REGEX_CHARS
    ):
        v.add(f"{field}.first_generation_regex", f"1-{MAX_REGEX_CHARS} characters")
    return appl.TurnOptions(
        model=message.model if message.HasField("model") else None,
        sampling=ev.SamplingParams(
            temperature=message.temperature if message.HasField("temperature") else None,
            top_p=message.top_p if message.HasField("top_p") else None,
            top_k=message.top_k if message.HasField("top_k") else None,
            max_tokens=message.max_tokens if message.HasField("max_tokens") else None,
            seed=message.seed if message.HasField("seed") else None,
            stop=tuple(message.stop),
            regex=(
                message.first_generation_regex
                if message.HasField("first_generation_regex")
                else None
            ),
        ),
        max_tool_round_trips=(
            message.max_tool_round_trips if message.HasField("max_tool_round_trips") else None
        ),
    )


def _turn_input(message: spb.TurnInput, field: str, v: _Violations) -> appl.TurnInput:
    cid = _conversation_id(message.conversation, f"{field}.conversation", v)
    _request_id(message.request_id, f"{field}.request_id", v)
    if not message.content.strip():
        v.add(f"{field}.content", "must not be empty")
    elif len(message.content) > MAX_CONTENT_CHARS:
        v.add(f"{field}.content", f"at most {MAX_CONTENT_CHARS} characters")
    options = _options(message.options, f"{field}.options", v)
    return appl.TurnInput(
        conversation_id=cid,
        content=message.content,
        request_id=message.request_id,
        options=options,
        expected_version=(
            message.expected_version if message.HasField("expected_version") else None
        ),
    )


# --- domain to messages ---------------------------------------------------------


def _timestamp(us: int | None) -> timestamp_pb2.Timestamp | None:
    if us is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def _us(ts: timestamp_pb2.Timestamp) -> int:
    return int(ts.ToMicroseconds())


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


def _call(call: ev.ToolCall) -> pb.ToolCall:
    return pb.ToolCall(call_id=call.call_id, name=call.name, arguments_json=call.arguments_json)


def _turn(turn: Turn) -> pb.Turn:
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
        start_time=_timestamp(turn.started_at_us),
        outcome_reason=turn.outcome_reason,
        tool_round_limit_reached=turn.tool_round_limit_reached,
    )
    if turn.ended_at_us is not None:
        message.end_time.FromMicroseconds(turn.ended_at_us)
    return message


def _raise_if_no_worker(turn: Turn) -> None:
    """A unary turn that failed because no worker could take it is UNAVAILABLE.

    The failure is recorded (`TurnFailed`) either way; a unary caller gets it
    as a retryable status rather than a response it must inspect. Retry with
    a new request id: the old one names the failed turn.
    """
    if turn.status is not TurnStatus.FAILED:
        return
    phase, _, kind = turn.outcome_reason.partition(": ")
    if kind == errors.EngineUnavailableError.reason:
        raise errors.EngineUnavailableError(
            "no engine worker is available", metadata={"turnId": turn.turn_id, "phase": phase}
        )


def _defaults(state: ConversationState) -> pb.TurnDefaults:
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
    return message


def conversation_message(state: ConversationState, *, full: bool = True) -> pb.Conversation:
    """The API view of a folded conversation (without messages and turns unless `full`)."""
    message = pb.Conversation(
        name=f"conversations/{state.conversation_id}",
        version=state.version,
        create_time=_timestamp(state.created_at_us),
        state=pb.CONVERSATION_STATE_ARCHIVED if state.archived else pb.CONVERSATION_STATE_ACTIVE,
        system_prompt=state.system_prompt,
        defaults=_defaults(state),
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
    )
    if state.forked_from is not None:
        message.fork_origin.conversation = f"conversations/{state.forked_from[0]}"
        message.fork_origin.version = state.forked_from[1]
    if full:
        for m in state.messages:
            message.messages.append(
                pb.Message(
                    message_id=m.message_id,
                    role=_ROLE[m.role],
                    content=m.content,
                    turn_id=m.turn_id,
                    tool_calls=[_call(c) for c in m.tool_calls],
                    tool_call_id=m.tool_call_id,
                )
            )
        message.turns.extend(_turn(t) for t in state.turns)
    return message


def _decision(d: ev.GuardrailDecided) -> spb.GuardrailDecision:
    return spb.GuardrailDecision(
        stage=_STAGE[d.stage],
        guardrail=d.guardrail,
        guardrail_version=d.guardrail_version,
        verdict=_VERDICT[d.verdict],
        reason=d.reason,
    )


def _execution(f: ToolFinished) -> spb.ToolExecution:
    return spb.ToolExecution(call=_call(f.call), result=f.result, error=f.error)


def _assistant(g: ev.GenerationCompleted) -> pb.Message:
    return pb.Message(
        message_id=g.generation_id,
        role=pb.ROLE_ASSISTANT,
        content=g.text,
        turn_id=g.turn_id,
        tool_calls=[_call(c) for c in g.tool_calls],
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
        message.tool_call_delta.call.CopyFrom(_call(p.call))
    elif isinstance(p, ev.GuardrailDecided):
        message.guardrail_decision.CopyFrom(_decision(p))
    elif isinstance(p, ev.TextRetracted):
        message.retraction.generation_id = p.generation_id
        message.retraction.retracted_chars = p.end - p.start
        message.retraction.reason = p.reason
    elif isinstance(p, ev.GenerationCompleted):
        message.assistant_message.CopyFrom(_assistant(p))
    elif isinstance(p, ToolStarted):
        message.tool_execution_started.call.CopyFrom(_call(p.call))
        message.tool_execution_started.client_side = p.client_side
    elif isinstance(p, ToolFinished):
        message.tool_execution_finished.execution.CopyFrom(_execution(p))
    elif isinstance(p, ev.ToolRoundLimitReached):
        message.tool_round_limit_reached.limit = p.limit
    elif isinstance(p, TurnEnded):
        message.turn_ended.turn.CopyFrom(_turn(p.turn))
        message.turn_ended.conversation_version = p.conversation_version
    return message


# --- the servicer ---------------------------------------------------------------


class ConversationServicer(sgrpc.ConversationServiceServicer):
    """Implements turnlog.v1.ConversationService over `ConversationApplication`."""

    def __init__(
        self, app: appl.ConversationApplication, history: hist.HistoryService | None = None
    ) -> None:
        self.app = app
        self.history = history or hist.HistoryService(
            app.store, clock=app.clock, instance=app.instance
        )

    async def CreateConversation(  # noqa: N802 (gRPC method name)
        self, request: spb.CreateConversationRequest, context: Context
    ) -> spb.CreateConversationResponse:
        try:
            v = _Violations()
            _request_id(request.request_id, "request_id", v)
            if request.conversation_id and not _ID.match(request.conversation_id):
                v.add("conversation_id", "1-63 letters, digits, - or _")
            defaults = _options(request.defaults, "defaults", v)
            tools = []
            for i, tool in enumerate(request.tools):
                if not _TOOL_NAME.match(tool.name):
                    v.add(f"tools[{i}].name", "a function name (letters, digits, _ . -)")
                if tool.parameters_json_schema:
                    try:
                        if not isinstance(json.loads(tool.parameters_json_schema), dict):
                            raise ValueError
                    except ValueError:
                        v.add(f"tools[{i}].parameters_json_schema", "must be a JSON object")
                tools.append(
                    ev.ToolDefinition(
                        name=tool.name,
                        description=tool.description,
                        parameters_json_schema=tool.parameters_json_schema or "{}",
                        client_side=tool.client_side,
                    )
                )
            for key in request.labels:
                if not key or len(key) > 63:
                    v.add(f"labels[{key}]", "keys are 1-63 characters")
            v.raise_if_any()
            state = await self.app.create(
                appl.CreateConversation(
                    request_id=request.request_id,
                    conversation_id=request.conversation_id,
                    system_prompt=request.system_prompt,
                    defaults=defaults,
                    tools=tuple(tools),
                    guardrail_profile=request.guardrail_profile,
                    labels=tuple(sorted(request.labels.items())),
                )
            )
            return spb.CreateConversationResponse(conversation=conversation_message(state))
        except Exception as e:
            await _abort(context, e)

    async def GetConversation(  # noqa: N802
        self, request: spb.GetConversationRequest, context: Context
    ) -> spb.GetConversationResponse:
        try:
            v = _Violations()
            cid = _conversation_id(request.name, "name", v)
            if request.HasField("version") and request.version < 1:
                v.add("version", "must be at least 1")
            v.raise_if_any()
            version = request.version if request.HasField("version") else None
            state = await self.app.load(cid, version=version)
            return spb.GetConversationResponse(conversation=conversation_message(state))
        except Exception as e:
            await _abort(context, e)

    async def ListConversations(  # noqa: N802
        self, request: spb.ListConversationsRequest, context: Context
    ) -> spb.ListConversationsResponse:
        try:
            v = _Violations()
            if not 0 <= request.page_size <= MAX_PAGE_SIZE:
                v.add("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
            v.raise_if_any()
            page, token = await self.app.list_conversations(
                appl.ListQuery(
                    page_size=request.page_size or 50,
                    page_token=request.page_token,
                    labels=tuple(sorted(request.labels.items())),
                    created_after_us=(
                        _us(request.create_time_after)
                        if request.HasField("create_time_after")
                        else None
                    ),
                    created_before_us=(
                        _us(request.create_time_before)
                        if request.HasField("create_time_before")
                        else None
                    ),
                    show_archived=request.show_archived,
                )
            )
            return spb.ListConversationsResponse(
                conversations=[conversation_message(s.state, full=False) for s in page],
                next_page_token=token,
            )
        except Exception as e:
            await _abort(context, e)

    async def ArchiveConversation(  # noqa: N802
        self, request: spb.ArchiveConversationRequest, context: Context
    ) -> spb.ArchiveConversationResponse:
        try:
            v = _Violations()
            cid = _conversation_id(request.name, "name", v)
            v.raise_if_any()
            expected = request.expected_version if request.HasField("expected_version") else None
            state = await self.app.archive(cid, expected_version=expected)
            return spb.ArchiveConversationResponse(conversation=conversation_message(state))
        except Exception as e:
            await _abort(context, e)

    async def SendMessage(  # noqa: N802
        self, request: spb.SendMessageRequest, context: Context
    ) -> spb.SendMessageResponse:
        try:
            v = _Violations()
            command = _turn_input(request.input, "input", v)
            v.raise_if_any()
            # The turn runs on even if this call's deadline passes; a retry
            # with the same request id returns it.
            result = await self.app.send(command)
            ended = result.ended
            _raise_if_no_worker(ended.turn)
            response = spb.SendMessageResponse(
                turn=_turn(ended.turn),
                tool_executions=[_execution(f) for f in result.tool_executions],
                guardrail_decisions=[_decision(d) for d in result.decisions],
                conversation_version=ended.conversation_version,
            )
            assistant = result.assistant_message
            if assistant is not None and ended.turn.status is not TurnStatus.BLOCKED:
                response.assistant_message.CopyFrom(_assistant(assistant))
            return response
        except Exception as e:
            await _abort(context, e)

    async def StreamTurn(  # noqa: N802
        self, request: spb.StreamTurnRequest, context: Context
    ) -> AsyncIterator[spb.StreamTurnResponse]:
        try:
            v = _Violations()
            action = request.WhichOneof("action")
            if action == "start":
                command = _turn_input(request.start, "start", v)
                v.raise_if_any()
                cid = command.conversation_id
                turn_id = await self.app.start_turn(command)
                after = 0
            elif action == "resume":
                cid = _conversation_id(request.resume.conversation, "resume.conversation", v)
                if not request.resume.turn_id:
                    v.add("resume.turn_id", "required")
                if request.resume.after_sequence < 0:
                    v.add("resume.after_sequence", "must not be negative")
                v.raise_if_any()
                turn_id, after = request.resume.turn_id, request.resume.after_sequence
            else:
                v.add("action", "start or resume is required")
                v.raise_if_any()
                return
            # A disconnect ends only this watch; the turn runs on and can be resumed.
            async for update in self.app.watch(cid, turn_id, after_sequence=after):
                yield spb.StreamTurnResponse(event=turn_event(update))
        except Exception as e:
            await _abort(context, e)

    async def Converse(  # noqa: N802
        self, request_iterator: AsyncIterator[spb.ConverseRequest], context: Context
    ) -> AsyncIterator[spb.ConverseResponse]:
        out: asyncio.Queue[spb.ConverseResponse | BaseException | None] = asyncio.Queue()
        running: dict[str, tuple[str, asyncio.Task[None]]] = {}

        async def forward(cid: str, turn_id: str) -> None:
            async for update in self.app.watch(cid, turn_id):
                await out.put(spb.ConverseResponse(event=turn_event(update)))

        async def read() -> None:
            try:
                async for message in request_iterator:
                    action = message.WhichOneof("action")
                    v = _Violations()
                    if action == "user_message":
                        command = _turn_input(message.user_message, "user_message", v)
                        v.raise_if_any()
                        turn_id = await self.app.start_turn(command)
                        task = asyncio.create_task(forward(command.conversation_id, turn_id))
                        running[turn_id] = (command.conversation_id, task)
                        task.add_done_callback(lambda t: _report(t, out))
                    elif action == "tool_result":
                        r = message.tool_result
                        cid = running.get(r.turn_id, ("", None))[0]
                        self.app.submit_tool_result(
                            cid, r.turn_id, r.call_id, result=r.result, error=r.error
                        )
                    elif action == "cancel":
                        c = message.cancel
                        cid = running.get(c.turn_id, ("", None))[0]
                        await self.app.cancel_turn(cid, c.turn_id, c.reason)
                    else:
                        v.add("action", "user_message, tool_result or cancel is required")
                        v.raise_if_any()
                # The client finished sending: end once every turn it started has ended.
                await asyncio.gather(*(t for _, t in running.values()), return_exceptions=True)
                await out.put(None)
            except Exception as e:
                await out.put(e)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    await _abort(context, item)
                    return
                yield item
        finally:
            reader.cancel()
            for _, task in running.values():
                task.cancel()
            with contextlib.suppress(BaseException):
                await reader

    # -- history ---------------------------------------------------------------

    async def ReadEvents(  # noqa: N802
        self, request: spb.ReadEventsRequest, context: Context
    ) -> spb.ReadEventsResponse:
        try:
            v = _Violations()
            query = _event_query(request, v)
            if not 0 <= request.page_size <= MAX_EVENTS_PAGE:
                v.add("page_size", f"must be between 0 and {MAX_EVENTS_PAGE}")
            v.raise_if_any()
            page = await self.history.read_events(
                query,
                page_size=request.page_size or DEFAULT_EVENTS_PAGE,
                page_token=request.page_token,
            )
            return spb.ReadEventsResponse(
                events=[log_event(e) for e in page.events], next_page_token=page.next_page_token
            )
        except Exception as e:
            await _abort(context, e)

    async def SubscribeEvents(  # noqa: N802
        self, request: spb.SubscribeEventsRequest, context: Context
    ) -> AsyncIterator[spb.SubscribeEventsResponse]:
        try:
            v = _Violations()
            query = _event_query(request, v)
            v.raise_if_any()
            async for item in self.history.subscribe(query):
                if isinstance(item, hist.CaughtUp):
                    position = "" if query.conversation_id is not None else str(item.position)
                    yield spb.SubscribeEventsResponse(
                        caught_up=spb.CaughtUp(version=item.version, position=position)
                    )
                else:
                    yield spb.SubscribeEventsResponse(events=[log_event(e) for e in item])
        except Exception as e:
            await _abort(context, e)

    async def ForkConversation(  # noqa: N802
        self, request: spb.ForkConversationRequest, context: Context
    ) -> spb.ForkConversationResponse:
        try:
            v = _Violations()
            cid = _conversation_id(request.name, "name", v)
            if request.HasField("version") and request.version < 1:
                v.add("version", "must be at least 1")
            if request.fork_conversation_id and not _ID.match(request.fork_conversation_id):
                v.add("fork_conversation_id", "1-63 letters, digits, - or _")
            _request_id(request.request_id, "request_id", v)
            v.raise_if_any()
            result = await self.history.fork(
                hist.ForkCommand(
                    source_id=cid,
                    version=request.version if request.HasField("version") else None,
                    fork_id=request.fork_conversation_id,
                    request_id=request.request_id,
                )
            )
            return spb.ForkConversationResponse(
                conversation=conversation_message(result.state),
                prefix_version=result.prefix_version,
                interrupted_turn_id=result.interrupted_turn_id,
            )
        except Exception as e:
            await _abort(context, e)

    async def VerifyConversation(  # noqa: N802
        self, request: spb.VerifyConversationRequest, context: Context
    ) -> spb.VerifyConversationResponse:
        try:
            v = _Violations()
            cid = _conversation_id(request.name, "name", v)
            v.raise_if_any()
            report = await self.history.verify(cid)
            return spb.VerifyConversationResponse(
                intact=report.ok,
                events_checked=report.events_checked,
                last_version=report.last_version,
                broken_version=report.broken_at_version or 0,
                problem=_PROBLEM[report.kind],
                problem_description=report.problem or "",
            )
        except Exception as e:
            await _abort(context, e)

    async def ExportConversation(  # noqa: N802
        self, request: spb.ExportConversationRequest, context: Context
    ) -> AsyncIterator[spb.ExportConversationResponse]:
        try:
            v = _Violations()
            cid = _conversation_id(request.name, "name", v)
            if request.format not in (hpb.EXPORT_FORMAT_JSONL, hpb.EXPORT_FORMAT_ATIF):
                v.add("format", "EXPORT_FORMAT_JSONL or EXPORT_FORMAT_ATIF")
            if request.HasField("version") and request.version < 1:
                v.add("version", "must be at least 1")
            v.raise_if_any()
            version = request.version if request.HasField("version") else None
            if request.format == hpb.EXPORT_FORMAT_JSONL:
                chunks = self.history.export_jsonl(cid, version=version)
            else:
                chunks = self.history.export_atif(cid, version=version)
            async for chunk in chunks:
                yield spb.ExportConversationResponse(data=chunk)
        except Exception as e:
            await _abort(context, e)

    async def ImportConversation(  # noqa: N802
        self, request_iterator: AsyncIterator[spb.ImportConversationRequest], context: Context
    ) -> spb.ImportConversationResponse:
        try:
            parts: list[bytes] = []
            size = 0
            async for message in request_iterator:
                size += len(message.data)
                if size > MAX_IMPORT_BYTES:
                    raise FieldViolationsError([("data", f"at most {MAX_IMPORT_BYTES} bytes")])
                parts.append(message.data)
            outcome = await self.history.import_jsonl(b"".join(parts))
            return spb.ImportConversationResponse(
                conversation=conversation_message(outcome.state),
                events_written=outcome.written,
                events_already_present=outcome.already_present,
            )
        except Exception as e:
            await _abort(context, e)


_PROBLEM = {
    None: hpb.VERIFICATION_PROBLEM_UNSPECIFIED,
    ProblemKind.VERSION_SEQUENCE: hpb.VERIFICATION_PROBLEM_VERSION_SEQUENCE,
    ProblemKind.HASH_CHAIN: hpb.VERIFICATION_PROBLEM_HASH_CHAIN,
    ProblemKind.FOLD: hpb.VERIFICATION_PROBLEM_FOLD,
}


def log_event(event: RecordedEvent) -> hpb.LogEvent:
    """The API message of a stored event (payload and metadata as their stored text)."""
    message = hpb.LogEvent(
        conversation=f"conversations/{hist.conversation_of(event.stream_id)}",
        stream_id=event.stream_id,
        version=event.stream_version,
        event_id=str(event.event_id),
        type=event.type,
        data_json=event.data_json,
        metadata_json=event.metadata_json,
        prev_hash=event.prev_hash,
        hash=event.hash,
        position=str(event.position),
    )
    message.record_time.FromDatetime(event.recorded_at)
    return message


def _event_query(
    request: spb.ReadEventsRequest | spb.SubscribeEventsRequest, v: _Violations
) -> hist.EventQuery:
    cid: str | None = None
    if request.conversation:
        cid = _conversation_id(request.conversation, "conversation", v)
        if request.after_position:
            v.add("after_position", "only for all conversations; use after_version")
    elif request.after_version:
        v.add("after_version", "only with a conversation; use after_position")
    if request.after_version < 0:
        v.add("after_version", "must not be negative")
    position = Position(0, 0)
    if request.after_position:
        try:
            position = Position.parse(request.after_position)
        except errors.InvalidArgumentError:
            v.add("after_position", "not a position from a LogEvent or CaughtUp")
    if len(request.event_types) > MAX_EVENT_TYPES:
        v.add("event_types", f"at most {MAX_EVENT_TYPES} types")
    for i, name in enumerate(request.event_types):
        if not name or len(name) > 128:
            v.add(f"event_types[{i}]", "1-128 characters")
    return hist.EventQuery(
        conversation_id=cid,
        after_version=request.after_version,
        after_position=position,
        types=frozenset(request.event_types) if request.event_types else None,
    )


async def _abort(context: Context, error: BaseException) -> NoReturn:
    # grpc's stubs lack abort_with_status; it raises like abort().
    await context.abort_with_status(to_status(error))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")


def _report(
    task: asyncio.Task[None], out: asyncio.Queue[spb.ConverseResponse | BaseException | None]
) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        assert error is not None
        out.put_nowait(error)
