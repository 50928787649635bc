"""The history RPCs: read and follow events, fork, verify, export and import.

Thin: parse the request (`requests`; already validated), call `HistoryService`,
build the response (`messages`). Errors become statuses in
`status.maps_errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from turnlog.api import page_tokens
from turnlog.api.access import TenantAccess
from turnlog.api.authentication import caller, own_tenant
from turnlog.api.messages import PROBLEM, conversation_message, log_event
from turnlog.api.requests import (
    DEFAULT_EVENTS_PAGE,
    MAX_EVENTS_PAGE,
    MAX_IMPORT_BYTES,
    EventView,
    conversation_id,
    event_query,
    event_view,
)
from turnlog.api.status import Context, FieldViolationsError, maps_errors
from turnlog.auth.principal import Scope
from turnlog.conversation.paging import page_size
from turnlog.history import service as history_service
from turnlog.storage import RecordedEvent
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import history_pb2 as hpb

#: What embedding a LogEvent in a response's repeated field adds, at most: its
#: tag and length.
_EMBEDDING_BYTES = 6


class _LogEvents:
    """The LogEvent messages of one call's events, in the requested view.

    `size` is what the page and batch caps count: for the stored text alone
    the `event_size` bound, else the measured message, which is kept until
    `message` sends it, so that no event is converted twice.
    """

    def __init__(self, view: EventView) -> None:
        self.view = view
        self._built: dict[object, hpb.LogEvent] = {}
        self.size = self._measured if view.typed else history_service.event_size

    def _build(self, event: RecordedEvent) -> hpb.LogEvent:
        return log_event(event, raw=self.view.raw, typed=self.view.typed)

    def _measured(self, event: RecordedEvent) -> int:
        built = self._built.get(event.event_id)
        if built is None:
            built = self._built[event.event_id] = self._build(event)
        return built.ByteSize() + _EMBEDDING_BYTES

    def message(self, event: RecordedEvent) -> hpb.LogEvent:
        """The event's message (the one measured, if it was)."""
        built = self._built.pop(event.event_id, None)
        return self._build(event) if built is None else built


class HistoryRpcs(TenantAccess):
    """The history RPCs of `turnlog.v1.ConversationService` (a part of `ConversationServicer`)."""

    history: history_service.HistoryService

    @maps_errors
    async def ReadEvents(  # noqa: N802
        self, request: spb.ReadEventsRequest, context: Context
    ) -> spb.ReadEventsResponse:
        tenant = await self.read_tenant("ReadEvents", request.conversation)
        events = _LogEvents(event_view(request))
        page = await self.history.read_events(
            event_query(request, tenant=tenant),
            page_size=page_size(
                request.page_size, default=DEFAULT_EVENTS_PAGE, maximum=MAX_EVENTS_PAGE
            ),
            page_token=page_tokens.cursor_of(request),
            size=events.size,
        )
        return spb.ReadEventsResponse(
            events=[events.message(e) for e in page.events],
            next_page_token=page_tokens.token_for(request, page.next_page_token),
        )

    @maps_errors
    async def SubscribeEvents(  # noqa: N802
        self, request: spb.SubscribeEventsRequest, context: Context
    ) -> AsyncIterator[spb.SubscribeEventsResponse]:
        tenant = await self.read_tenant("SubscribeEvents", request.conversation)
        query = event_query(request, tenant=tenant)
        events = _LogEvents(event_view(request))
        async for item in self.history.subscribe(query, size=events.size):
            if isinstance(item, history_service.CaughtUp):
                position = "" if query.conversation_id is not None else str(item.position)
                yield spb.SubscribeEventsResponse(
                    caught_up=spb.CaughtUp(version=item.version, position=position)
                )
            elif isinstance(item, history_service.Checkpoint):
                yield spb.SubscribeEventsResponse(
                    checkpoint=spb.Checkpoint(position=str(item.position))
                )
            else:
                yield spb.SubscribeEventsResponse(events=[events.message(e) for e in item])

    @maps_errors
    async def ForkConversation(  # noqa: N802
        self, request: spb.ForkConversationRequest, context: Context
    ) -> spb.ForkConversationResponse:
        result = await self.history.fork(
            history_service.ForkCommand(
                source_id=conversation_id(request.name),
                version=request.version if request.HasField("version") else None,
                fork_id=request.fork_conversation_id,
                request_id=request.request_id,
                tenant=own_tenant(),
            )
        )
        return spb.ForkConversationResponse(
            conversation=conversation_message(result.state),
            prefix_version=result.prefix_version,
            interrupted_turn_id=result.interrupted_turn_id,
        )

    @maps_errors
    async def VerifyConversation(  # noqa: N802
        self, request: spb.VerifyConversationRequest, context: Context
    ) -> spb.VerifyConversationResponse:
        report = await self.history.verify(
            conversation_id(request.name),
            tenant=await self.read_tenant("VerifyConversation", request.name),
        )
        return spb.VerifyConversationResponse(
            intact=report.ok,
            events_checked=report.events_checked,
            last_version=report.last_version,
            broken_version=report.broken_at_version or 0,
            problem=PROBLEM[report.kind],
            problem_description=report.problem or "",
        )

    @maps_errors
    async def ExportConversation(  # noqa: N802
        self, request: spb.ExportConversationRequest, context: Context
    ) -> AsyncIterator[spb.ExportConversationResponse]:
        cid = conversation_id(request.name)
        version = request.version if request.HasField("version") else None
        tenant = await self.read_tenant("ExportConversation", request.name)
        if request.format == hpb.EXPORT_FORMAT_JSONL:
            chunks = self.history.export_jsonl(cid, version=version, tenant=tenant)
        else:
            chunks = self.history.export_atif(cid, version=version, tenant=tenant)
        async for chunk in chunks:
            yield spb.ExportConversationResponse(data=chunk)

    @maps_errors
    async def ImportConversation(  # noqa: N802
        self, request_iterator: AsyncIterator[spb.ImportConversationRequest], context: Context
    ) -> spb.ImportConversationResponse:
        parts: list[bytes] = []
        size = 0
        async for message in request_iterator:
            size += len(message.data)
            if size > MAX_IMPORT_BYTES:
                raise FieldViolationsError([("data", f"at most {MAX_IMPORT_BYTES} bytes")])
            parts.append(message.data)
        # An administrator imports a file into the tenant it names; anyone
        # else only a file of their own tenant.
        principal = caller()
        outcome = await self.history.import_jsonl(
            b"".join(parts), tenant=None if principal.has(Scope.ADMIN) else principal.tenant
        )
        return spb.ImportConversationResponse(
            conversation=conversation_message(outcome.state),
            events_written=outcome.written,
            events_already_present=outcome.already_present,
        )
