"""The conversation RPCs: create, get, list, archive, update, unarchive, list turns and
messages, and unary turns (streamed ones and turn control: `turns`).

Thin: parse the request (`requests`; the validation interceptor has checked it), call
`ConversationApplication`, build the response (`messages`). Errors become
statuses in `status.maps_errors`; no business rule lives here.
"""

from __future__ import annotations

from turnlog import errors
from turnlog.api import page_tokens
from turnlog.api.access import TenantAccess
from turnlog.api.authentication import own_tenant
from turnlog.api.messages import (
    assistant_message,
    chat_message,
    compaction_message,
    conversation_message,
    decision_message,
    execution_message,
    turn_message,
)
from turnlog.api.requests import (
    DEFAULT_CONVERSATION_LIMIT,
    DEFAULT_MESSAGES_PAGE,
    DEFAULT_PAGE_SIZE,
    DEFAULT_TURNS_PAGE,
    MAX_CONVERSATION_LIMIT,
    MAX_MESSAGES_PAGE,
    MAX_PAGE_SIZE,
    MAX_TURNS_PAGE,
    conversation_id,
    microseconds,
    tool_definitions,
    turn_input,
    turn_options,
    update_command,
)
from turnlog.api.status import Context, maps_errors
from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    ListQuery,
)
from turnlog.conversation.paging import page_size
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
        state = await self.app.create(
            CreateConversation(
                tenant=own_tenant(),
                request_id=request.request_id,
                conversation_id=request.conversation_id,
                system_prompt=request.system_prompt,
                defaults=turn_options(request.defaults),
                tools=tool_definitions(request.tools),
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
        return spb.GetConversationResponse(
            conversation=conversation_message(
                state,
                message_limit=_limit(request.message_limit),
                turn_limit=_limit(request.turn_limit),
            )
        )

    @maps_errors
    async def ListConversations(  # noqa: N802
        self, request: spb.ListConversationsRequest, context: Context
    ) -> spb.ListConversationsResponse:
        page, cursor = await self.app.list_conversations(
            ListQuery(
                tenant=await self.read_tenant("ListConversations"),
                page_size=page_size(
                    request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE
                ),
                page_token=page_tokens.cursor_of(request),
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
            next_page_token=page_tokens.token_for(request, cursor),
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
    async def UpdateConversation(  # noqa: N802
        self, request: spb.UpdateConversationRequest, context: Context
    ) -> spb.UpdateConversationResponse:
        state = await self.app.update(update_command(request, tenant=own_tenant()))
        return spb.UpdateConversationResponse(conversation=conversation_message(state))

    @maps_errors
    async def UnarchiveConversation(  # noqa: N802
        self, request: spb.UnarchiveConversationRequest, context: Context
    ) -> spb.UnarchiveConversationResponse:
        expected = request.expected_version if request.HasField("expected_version") else None
        state = await self.app.unarchive(
            conversation_id(request.name), tenant=own_tenant(), expected_version=expected
        )
        return spb.UnarchiveConversationResponse(conversation=conversation_message(state))

    @maps_errors
    async def ListTurns(  # noqa: N802
        self, request: spb.ListTurnsRequest, context: Context
    ) -> spb.ListTurnsResponse:
        page = await self.app.list_turns(
            conversation_id(request.conversation),
            tenant=await self.read_tenant("ListTurns", request.conversation),
            page_size=page_size(
                request.page_size, default=DEFAULT_TURNS_PAGE, maximum=MAX_TURNS_PAGE
            ),
            cursor=page_tokens.cursor_of(request),
        )
        return spb.ListTurnsResponse(
            turns=[turn_message(t) for t in page.items],
            next_page_token=page_tokens.token_for(request, page.next_cursor),
            total_size=page.total_size,
        )

    @maps_errors
    async def ListMessages(  # noqa: N802
        self, request: spb.ListMessagesRequest, context: Context
    ) -> spb.ListMessagesResponse:
        page = await self.app.list_messages(
            conversation_id(request.conversation),
            tenant=await self.read_tenant("ListMessages", request.conversation),
            page_size=page_size(
                request.page_size, default=DEFAULT_MESSAGES_PAGE, maximum=MAX_MESSAGES_PAGE
            ),
            cursor=page_tokens.cursor_of(request),
            turn_id=request.turn_id,
            newest_first=request.newest_first,
        )
        return spb.ListMessagesResponse(
            messages=[chat_message(m) for m in page.items],
            next_page_token=page_tokens.token_for(request, page.next_cursor),
            total_size=page.total_size,
        )

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


def _limit(requested: int) -> int:
    """GetConversation's message_limit or turn_limit, coerced as a page size is."""
    return page_size(requested, default=DEFAULT_CONVERSATION_LIMIT, maximum=MAX_CONVERSATION_LIMIT)
