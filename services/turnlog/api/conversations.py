"""The conversation RPCs: create, get, list, archive, and turns (unary, streamed, bidi).

Thin: parse the request (`requests`; the validation interceptor has checked it), call
`ConversationApplication`, build the response (`messages`). Errors become
statuses in `status.maps_errors`; no business rule lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from turnlog import errors
from turnlog.api import paging
from turnlog.api.access import TenantAccess
from turnlog.api.authentication import own_tenant
from turnlog.api.messages import (
    assistant_message,
    compaction_message,
    conversation_message,
    decision_message,
    execution_message,
    turn_event,
    turn_message,
)
from turnlog.api.requests import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    conversation_id,
    microseconds,
    turn_input,
    turn_options,
)
from turnlog.api.status import Context, maps_errors
from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    ListQuery,
)
from turnlog.domain import events as ev
from turnlog.domain.state import Turn, TurnStatus
from turnlog.v1 import conversation_service_pb2 as spb


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


class ConversationRpcs(TenantAccess):
    """The conversation RPCs of `turnlog.v1.ConversationService` (a part of `ConversationServicer`)."""

    app: ConversationApplication

    @maps_errors
    async def CreateConversation(  # noqa: N802 (gRPC method name)
        self, request: spb.CreateConversationRequest, context: Context
    ) -> spb.CreateConversationResponse:
        tools = tuple(
            ev.ToolDefinition(
                name=tool.name,
                description=tool.description,
                parameters_json_schema=tool.parameters_json_schema or "{}",
                client_side=tool.client_side,
            )
            for tool in request.tools
        )
        state = await self.app.create(
            CreateConversation(
                tenant=own_tenant(),
                request_id=request.request_id,
                conversation_id=request.conversation_id,
                system_prompt=request.system_prompt,
                defaults=turn_options(request.defaults),
                tools=tools,
                guardrail_profile=request.guardrail_profile,
                labels=tuple(sorted(request.labels.items())),
            )
        )
        return spb.CreateConversationResponse(conversation=conversation_message(state))

    @maps_errors
    async def GetConversation(  # noqa: N802
        self, request: spb.GetConversationRequest, context: Context
    ) -> spb.GetConversationResponse:
        version = request.version if request.HasField("version") else None
        state = await self.app.load(
            conversation_id(request.name),
            tenant=await self.read_tenant("GetConversation", request.name),
            version=version,
        )
        return spb.GetConversationResponse(conversation=conversation_message(state))

    @maps_errors
    async def ListConversations(  # noqa: N802
        self, request: spb.ListConversationsRequest, context: Context
    ) -> spb.ListConversationsResponse:
        page, cursor = await self.app.list_conversations(
            ListQuery(
                tenant=await self.read_tenant("ListConversations"),
                page_size=paging.page_size(
                    request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE
                ),
                page_token=paging.open(request),
                labels=tuple(sorted(request.labels.items())),
                created_after_us=(
                    microseconds(request.create_time_after)
                    if request.HasField("create_time_after")
                    else None
                ),
                created_before_us=(
                    microseconds(request.create_time_before)
                    if request.HasField("create_time_before")
                    else None
                ),
                show_archived=request.show_archived,
            )
        )
        return spb.ListConversationsResponse(
            conversations=[conversation_message(s.state, full=False) for s in page],
            next_page_token=paging.seal(request, cursor),
        )

    @maps_errors
    async def ArchiveConversation(  # noqa: N802
        self, request: spb.ArchiveConversationRequest, context: Context
    ) -> spb.ArchiveConversationResponse:
        expected = request.expected_version if request.HasField("expected_version") else None
        state = await self.app.archive(
            conversation_id(request.name), tenant=own_tenant(), expected_version=expected
        )
        return spb.ArchiveConversationResponse(conversation=conversation_message(state))

    @maps_errors
    async def SendMessage(  # noqa: N802
        self, request: spb.SendMessageRequest, context: Context
    ) -> spb.SendMessageResponse:
        command = turn_input(request.input, tenant=own_tenant())
        # The turn runs on even if this call's deadline passes; a retry
        # with the same request id returns it.
        result = await self.app.send(command)
        ended = result.ended
        _raise_if_no_worker(ended.turn)
        response = spb.SendMessageResponse(
            turn=turn_message(ended.turn),
            tool_executions=[execution_message(f) for f in result.tool_executions],
            guardrail_decisions=[decision_message(d) for d in result.decisions],
            conversation_version=ended.conversation_version,
        )
        assistant = result.assistant_message
        if assistant is not None and ended.turn.status is not TurnStatus.BLOCKED:
            response.assistant_message.CopyFrom(assistant_message(assistant))
        return response

    @maps_errors
    async def CompactConversation(  # noqa: N802
        self, request: spb.CompactConversationRequest, context: Context
    ) -> spb.CompactConversationResponse:
        expected = request.expected_version if request.HasField("expected_version") else None
        result = await self.app.compact(
            conversation_id(request.name),
            tenant=own_tenant(),
            request_id=request.request_id,
            expected_version=expected,
        )
        ended = result.ended
        _raise_if_no_worker(ended.turn)
        response = spb.CompactConversationResponse(
            turn=turn_message(ended.turn),
            guardrail_decisions=[decision_message(d) for d in result.decisions],
            conversation_version=ended.conversation_version,
        )
        for update in result.updates:
            if isinstance(update.payload, ev.ContextCompacted):
                response.compaction.CopyFrom(compaction_message(update.payload))
        return response

    @maps_errors
    async def StreamTurn(  # noqa: N802
        self, request: spb.StreamTurnRequest, context: Context
    ) -> AsyncIterator[spb.StreamTurnResponse]:
        # `action` is a required oneof (validation.REQUIRED_ONEOFS).
        if request.WhichOneof("action") == "start":
            command = turn_input(request.start, tenant=own_tenant())
            cid = command.conversation_id
            turn_id = await self.app.start_turn(command)
            after = 0
        else:
            cid = conversation_id(request.resume.conversation)
            turn_id, after = request.resume.turn_id, request.resume.after_sequence
        # A disconnect ends only this watch; the turn runs on and can be resumed.
        async for update in self.app.watch(cid, turn_id, tenant=own_tenant(), after_sequence=after):
            yield spb.StreamTurnResponse(event=turn_event(update))

    @maps_errors
    async def Converse(  # noqa: N802
        self, request_iterator: AsyncIterator[spb.ConverseRequest], context: Context
    ) -> AsyncIterator[spb.ConverseResponse]:
        out: asyncio.Queue[spb.ConverseResponse | BaseException | None] = asyncio.Queue()
        running: dict[str, tuple[str, asyncio.Task[None]]] = {}

        async def forward(cid: str, turn_id: str) -> None:
            async for update in self.app.watch(cid, turn_id, tenant=own_tenant()):
                await out.put(spb.ConverseResponse(event=turn_event(update)))

        async def read() -> None:
            try:
                async for message in request_iterator:
                    # Each message has passed validation; `action` is required.
                    action = message.WhichOneof("action")
                    if action == "user_message":
                        command = turn_input(message.user_message, tenant=own_tenant())
                        turn_id = await self.app.start_turn(command)
                        task = asyncio.create_task(forward(command.conversation_id, turn_id))
                        running[turn_id] = (command.conversation_id, task)
                        task.add_done_callback(lambda t: _report(t, out))
                    elif action == "tool_result":
                        r = message.tool_result
                        cid = running.get(r.turn_id, ("", None))[0]
                        self.app.submit_tool_result(
                            cid,
                            r.turn_id,
                            r.call_id,
                            result=r.result,
                            error=r.error,
                            tenant=own_tenant(),
                        )
                    else:
                        c = message.cancel
                        cid = running.get(c.turn_id, ("", None))[0]
                        await self.app.cancel_turn(cid, c.turn_id, c.reason, tenant=own_tenant())
                # The client finished sending: end once every turn it started has ended.
                await asyncio.gather(*(t for _, t in running.values()), return_exceptions=True)
                await out.put(None)
            except Exception as e:
                await out.put(e)

        tenant = own_tenant()
        reader = asyncio.create_task(read())
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            for turn_id, (cid, task) in running.items():
                if not task.done():
                    # The session ended under a running turn (the client went
                    # away, or the stream failed): nobody can answer its tools
                    # or cancel it any more, so it is cancelled (aborted in the
                    # worker, TurnCancelled recorded). A StreamTurn is not.
                    with contextlib.suppress(errors.TurnlogError):
                        await self.app.cancel_turn(cid, turn_id, SESSION_ENDED, tenant=tenant)
                task.cancel()
            with contextlib.suppress(BaseException):
                await reader


#: The cancel reason recorded for the turns of a Converse session that broke off.
SESSION_ENDED = "the client disconnected"


def _report(
    task: asyncio.Task[None], out: asyncio.Queue[spb.ConverseResponse | BaseException | None]
) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        assert error is not None
        out.put_nowait(error)
