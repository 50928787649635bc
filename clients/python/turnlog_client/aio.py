"""`AsyncTurnlogClient`: the asyncio client of `turnlog.v1.ConversationService`.

This is the one implementation of every call; `TurnlogClient` (sync.py)
runs it on a private event loop thread. What it adds over the generated
stub:

- credentials on every call (`Credentials`: a bearer token, TLS, mTLS);
- request ids: every write that takes a `request_id` gets a uuid4 when the
  caller gives none, chosen once per call so that its retries repeat it;
- retries (`RetryPolicy`) of idempotent calls only: reads, and writes the
  service deduplicates by request id;
- errors as `TurnlogError` subclasses carrying reason, metadata and
  `retryable`;
- paging iterators over list and read RPCs (every item once);
- resumable turn streams, Converse turns with client-side tool callbacks,
  subscriptions that resume after their last checkpoint (streams.py);
- `transcript()`: a conversation folded on the client from its typed events.

Resource names may be given as "conversations/ID" or as the bare ID.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

import grpc
from google.protobuf import field_mask_pb2

from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb
from turnlog_client.credentials import Credentials
from turnlog_client.errors import TurnlogError, error_from_rpc
from turnlog_client.retry import RetryPolicy
from turnlog_client.streams import ConverseTurn, Subscription, ToolCallback, TurnStream
from turnlog_client.transcript import Transcript
from turnlog_client.verify import StreamReport, verify_events

#: Where `make serve` listens.
DEFAULT_TARGET: Final = "127.0.0.1:50051"
#: Import data is sent in parts of this size.
IMPORT_PART_BYTES: Final = 1 << 20
#: gRPC's own reconnection backoff grows to 120 s by default; a client that
#: retries a restarted service wants it to reconnect within its retry window.
CHANNEL_OPTIONS: Final = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
_UNSET: Final = object()


def conversation_name(conversation: str) -> str:
    """ "conversations/ID" for an ID or a name."""
    return (
        conversation
        if conversation.startswith("conversations/")
        else f"conversations/{conversation}"
    )


def new_request_id() -> str:
    """A fresh idempotency key (uuid4)."""
    return str(uuid.uuid4())


class AsyncTurnlogClient:
    """An asyncio client of the conversation service.

    Args:
        target: "host:port" of the service.
        token: a bearer token (shorthand for `Credentials(token=...)`).
        credentials: token and TLS settings; plain text is allowed to
            loopback only unless they say otherwise.
        retry: the retry policy of idempotent calls.
        timeout_s: the deadline of each attempt of a unary call that does
            not run a turn (None: no deadline).
        channel_options: extra gRPC channel options.

    The channel opens on the first call (inside the running event loop);
    `close()` (or `async with`) closes it.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        credentials: Credentials | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = 30.0,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if credentials is None:
            credentials = Credentials(token=token)
        elif token is not None:
            raise ValueError("give the token inside credentials, or token= alone")
        self.target = target
        self.credentials = credentials
        self.retry_policy = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.call_metadata = credentials.call_metadata()
        self._options = (*CHANNEL_OPTIONS, *channel_options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: sgrpc.ConversationServiceAsyncStub | None = None

    @property
    def stub(self) -> sgrpc.ConversationServiceAsyncStub:
        """The generated stub on this client's channel (opened on first use)."""
        if self._stub is None:
            self._channel = self.credentials.channel(self.target, self._options)
            self._stub = sgrpc.ConversationServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        self._channel = self._stub = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the one unary call path ----------------------------------------------

    async def _unary(
        self, method: str, request: Any, *, idempotent: bool, timeout_s: Any = _UNSET
    ) -> Any:
        """Calls `method` with `request`, retrying per the policy when `idempotent`."""
        timeout = self.timeout_s if timeout_s is _UNSET else timeout_s
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await getattr(self.stub, method)(
                    request, metadata=self.call_metadata, timeout=timeout
                )
            except grpc.aio.AioRpcError as e:
                error = error_from_rpc(e)
                elapsed = time.monotonic() - started
                if not (idempotent and self.retry_policy.should_retry(error, attempt, elapsed)):
                    raise error from e
            await asyncio.sleep(self.retry_policy.backoff_s(attempt, error))

    async def _paged(self, method: str, request: Any, items: str) -> AsyncIterator[Any]:
        """Every item of every page of a list RPC, once."""
        while True:
            response = await self._unary(method, request, idempotent=True)
            for item in getattr(response, items):
                yield item
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    # -- conversations ------------------------------------------------------------

    async def create_conversation(
        self,
        *,
        system_prompt: str = "",
        conversation_id: str = "",
        defaults: pb.TurnDefaults | None = None,
        tools: Iterable[pb.ToolDefinition] = (),
        guardrail_profile: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> pb.Conversation:
        """Creates a conversation (retried safely: idempotent by `request_id`)."""
        request = spb.CreateConversationRequest(
            request_id=request_id or new_request_id(),
            conversation_id=conversation_id,
            system_prompt=system_prompt,
            defaults=defaults,
            tools=list(tools),
            guardrail_profile=guardrail_profile,
            labels=dict(labels or {}),
        )
        response = await self._unary("CreateConversation", request, idempotent=True)
        return response.conversation  # type: ignore[no-any-return]

    async def get_conversation(
        self,
        conversation: str,
        *,
        version: int | None = None,
        message_limit: int = 0,
        turn_limit: int = 0,
    ) -> pb.Conversation:
        """A conversation folded by the service (the latest messages and turns; see limits)."""
        request = spb.GetConversationRequest(
            name=conversation_name(conversation),
            version=version,
            message_limit=message_limit,
            turn_limit=turn_limit,
        )
        response = await self._unary("GetConversation", request, idempotent=True)
        return response.conversation  # type: ignore[no-any-return]

    def list_conversations(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        show_archived: bool = False,
        page_size: int = 0,
    ) -> AsyncIterator[pb.Conversation]:
        """Every conversation (newest first), page after page."""
        request = spb.ListConversationsRequest(
            labels=dict(labels or {}), show_archived=show_archived, page_size=page_size
        )
        return self._paged("ListConversations", request, "conversations")

    async def archive_conversation(
        self, conversation: str, *, expected_version: int | None = None
    ) -> pb.Conversation:
        """Archives a conversation (retried only without `expected_version`)."""
        request = spb.ArchiveConversationRequest(
            name=conversation_name(conversation), expected_version=expected_version
        )
        response = await self._unary(
            "ArchiveConversation", request, idempotent=expected_version is None
        )
        return response.conversation  # type: ignore[no-any-return]

    async def unarchive_conversation(
        self, conversation: str, *, expected_version: int | None = None
    ) -> pb.Conversation:
        """Lets an archived conversation take turns again."""
        request = spb.UnarchiveConversationRequest(
            name=conversation_name(conversation), expected_version=expected_version
        )
        response = await self._unary(
            "UnarchiveConversation", request, idempotent=expected_version is None
        )
        return response.conversation  # type: ignore[no-any-return]

    async def update_conversation(
        self,
        conversation: pb.Conversation,
        update_mask: Sequence[str],
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
    ) -> pb.Conversation:
        """Replaces the settings named in `update_mask` (e.g. ["system_prompt", "labels"])."""
        request = spb.UpdateConversationRequest(
            conversation=conversation,
            update_mask=field_mask_pb2.FieldMask(paths=list(update_mask)),
            expected_version=expected_version,
            request_id=request_id or new_request_id(),
        )
        request.conversation.name = conversation_name(conversation.name)
        response = await self._unary("UpdateConversation", request, idempotent=True)
        return response.conversation  # type: ignore[no-any-return]

    # -- turns --------------------------------------------------------------------

    @staticmethod
    def _turn_input(
        conversation: str,
        content: str,
        request_id: str | None,
        options: pb.TurnDefaults | None,
        expected_version: int | None,
    ) -> spb.TurnInput:
        return spb.TurnInput(
            conversation=conversation_name(conversation),
            content=content,
            request_id=request_id or new_request_id(),
            options=options,
            expected_version=expected_version,
        )

    async def send_message(
        self,
        conversation: str,
        content: str,
        *,
        request_id: str | None = None,
        options: pb.TurnDefaults | None = None,
        expected_version: int | None = None,
        timeout_s: float | None = None,
    ) -> spb.SendMessageResponse:
        """Runs one turn and returns it completed; retried safely (one turn per request id)."""
        request = spb.SendMessageRequest(
            input=self._turn_input(conversation, content, request_id, options, expected_version)
        )
        return await self._unary(  # type: ignore[no-any-return]
            "SendMessage", request, idempotent=True, timeout_s=timeout_s
        )

    def stream_turn(
        self,
        conversation: str,
        content: str,
        *,
        request_id: str | None = None,
        options: pb.TurnDefaults | None = None,
        expected_version: int | None = None,
    ) -> TurnStream:
        """Runs one turn and streams its events, resuming after a cut connection."""
        turn_input = self._turn_input(conversation, content, request_id, options, expected_version)
        return TurnStream(self, spb.StreamTurnRequest(start=turn_input), turn_input.conversation)

    def resume_turn(self, conversation: str, turn_id: str, after_sequence: int = 0) -> TurnStream:
        """A turn's events after `after_sequence` (while it runs or after it ended)."""
        name = conversation_name(conversation)
        request = spb.StreamTurnRequest(
            resume=spb.ResumeTurn(conversation=name, turn_id=turn_id, after_sequence=after_sequence)
        )
        return TurnStream(self, request, name)

    def converse(
        self,
        conversation: str,
        content: str,
        *,
        tools: Mapping[str, ToolCallback] | None = None,
        request_id: str | None = None,
        options: pb.TurnDefaults | None = None,
        expected_version: int | None = None,
    ) -> ConverseTurn:
        """Runs one turn over Converse, answering client-side tool calls with `tools`."""
        turn_input = self._turn_input(conversation, content, request_id, options, expected_version)
        return ConverseTurn(self, turn_input, tools or {})

    async def cancel_turn(
        self, conversation: str, turn_id: str, *, reason: str = ""
    ) -> spb.CancelTurnResponse:
        """Cancels a running turn from anywhere; answers once it ended (retried safely)."""
        request = spb.CancelTurnRequest(
            conversation=conversation_name(conversation), turn_id=turn_id, reason=reason
        )
        return await self._unary("CancelTurn", request, idempotent=True, timeout_s=None)  # type: ignore[no-any-return]

    async def submit_tool_results(
        self, conversation: str, turn_id: str, results: Sequence[spb.ToolResult]
    ) -> spb.SubmitToolResultsResponse:
        """Answers client-side tool calls a turn awaits (the same answer again is harmless)."""
        request = spb.SubmitToolResultsRequest(
            conversation=conversation_name(conversation), turn_id=turn_id, results=list(results)
        )
        return await self._unary("SubmitToolResults", request, idempotent=True)  # type: ignore[no-any-return]

    async def compact_conversation(
        self,
        conversation: str,
        *,
        request_id: str | None = None,
        expected_version: int | None = None,
    ) -> spb.CompactConversationResponse:
        """Summarizes the window's turns now (idempotent by `request_id`)."""
        request = spb.CompactConversationRequest(
            name=conversation_name(conversation),
            request_id=request_id or new_request_id(),
            expected_version=expected_version,
        )
        return await self._unary(  # type: ignore[no-any-return]
            "CompactConversation", request, idempotent=True, timeout_s=None
        )

    def list_turns(self, conversation: str, *, page_size: int = 0) -> AsyncIterator[pb.Turn]:
        """Every turn of a conversation, oldest first."""
        request = spb.ListTurnsRequest(
            conversation=conversation_name(conversation), page_size=page_size
        )
        return self._paged("ListTurns", request, "turns")

    def list_messages(
        self,
        conversation: str,
        *,
        turn_id: str = "",
        newest_first: bool = False,
        page_size: int = 0,
    ) -> AsyncIterator[pb.Message]:
        """Every message of a conversation (or of one turn), oldest first unless `newest_first`."""
        request = spb.ListMessagesRequest(
            conversation=conversation_name(conversation),
            turn_id=turn_id,
            newest_first=newest_first,
            page_size=page_size,
        )
        return self._paged("ListMessages", request, "messages")

    # -- history ------------------------------------------------------------------

    def read_events(
        self,
        conversation: str = "",
        *,
        after_version: int = 0,
        after_position: str = "",
        event_types: Sequence[str] = (),
        view: hpb.EventView.ValueType = hpb.EVENT_VIEW_TYPED,
        page_size: int = 0,
    ) -> AsyncIterator[hpb.LogEvent]:
        """Stored events of one conversation (by version) or all (log order), typed by default."""
        request = spb.ReadEventsRequest(
            conversation=conversation_name(conversation) if conversation else "",
            after_version=after_version,
            after_position=after_position,
            event_types=list(event_types),
            view=view,
            page_size=page_size,
        )
        return self._paged("ReadEvents", request, "events")

    async def transcript(self, conversation: str, *, version: int | None = None) -> Transcript:
        """The conversation's messages and turns, folded here from its typed events.

        Args:
            conversation: the conversation.
            version: fold only up to this version (None: all events now readable).
        """
        transcript = Transcript()
        async for event in self.read_events(conversation, view=hpb.EVENT_VIEW_TYPED):
            if version is not None and event.version > version:
                break
            transcript.apply(event)
        return transcript

    def subscribe_events(
        self,
        conversation: str = "",
        *,
        after_version: int = 0,
        after_position: str = "",
        event_types: Sequence[str] = (),
        view: hpb.EventView.ValueType = hpb.EVENT_VIEW_TYPED,
    ) -> Subscription:
        """Stored events, then live ones; resubscribes after the last event or checkpoint."""
        return Subscription(
            self,
            conversation=conversation_name(conversation) if conversation else "",
            after_version=after_version,
            after_position=after_position,
            event_types=event_types,
            view=view,
        )

    async def verify_locally(self, conversation: str) -> StreamReport:
        """Checks the conversation's hash chain here, from its stored events (not the service's word).

        Reads every event with its stored text and recomputes each hash
        (`verify_events`); see `verify_conversation` for the service's own
        check, which also folds the history.
        """
        events = [e async for e in self.read_events(conversation, view=hpb.EVENT_VIEW_RAW)]
        reports = verify_events(events)
        if not reports:
            stream = conversation_name(conversation).removeprefix("conversations/")
            return StreamReport(f"conversation-{stream}", 0, 0)
        [report] = reports
        return report

    async def fork_conversation(
        self,
        conversation: str,
        *,
        version: int | None = None,
        fork_conversation_id: str = "",
        request_id: str | None = None,
    ) -> spb.ForkConversationResponse:
        """Starts a new conversation from a version of this one (idempotent by `request_id`)."""
        request = spb.ForkConversationRequest(
            name=conversation_name(conversation),
            version=version,
            fork_conversation_id=fork_conversation_id,
            request_id=request_id or new_request_id(),
        )
        return await self._unary("ForkConversation", request, idempotent=True)  # type: ignore[no-any-return]

    async def verify_conversation(self, conversation: str) -> spb.VerifyConversationResponse:
        """The service's check of the hash chain and the fold."""
        request = spb.VerifyConversationRequest(name=conversation_name(conversation))
        return await self._unary("VerifyConversation", request, idempotent=True)  # type: ignore[no-any-return]

    async def export_conversation(
        self,
        conversation: str,
        *,
        format: hpb.ExportFormat.ValueType = hpb.EXPORT_FORMAT_JSONL,
        version: int | None = None,
    ) -> bytes:
        """The whole export file (JSONL by default: `verify_export` checks it offline)."""
        request = spb.ExportConversationRequest(
            name=conversation_name(conversation), format=format, version=version
        )
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            parts: list[bytes] = []
            try:
                async for response in self.stub.ExportConversation(
                    request, metadata=self.call_metadata, timeout=self.timeout_s
                ):
                    parts.append(response.data)
                return b"".join(parts)
            except grpc.aio.AioRpcError as e:
                error = error_from_rpc(e)
                if not self.retry_policy.should_retry(error, attempt, time.monotonic() - started):
                    raise error from e
            await asyncio.sleep(self.retry_policy.backoff_s(attempt, error))

    async def import_conversation(self, data: bytes) -> spb.ImportConversationResponse:
        """Stores a JSONL export (importing twice changes nothing, so it is retried safely)."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            parts = (
                spb.ImportConversationRequest(data=data[i : i + IMPORT_PART_BYTES])
                for i in range(0, len(data), IMPORT_PART_BYTES)
            )
            try:
                return await self.stub.ImportConversation(
                    parts, metadata=self.call_metadata, timeout=self.timeout_s
                )
            except grpc.aio.AioRpcError as e:
                error = error_from_rpc(e)
                if not self.retry_policy.should_retry(error, attempt, time.monotonic() - started):
                    raise error from e
            await asyncio.sleep(self.retry_policy.backoff_s(attempt, error))


__all__ = [
    "DEFAULT_TARGET",
    "AsyncTurnlogClient",
    "TurnlogError",
    "conversation_name",
    "new_request_id",
]
