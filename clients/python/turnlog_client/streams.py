"""The client's long-lived calls: a turn's events, a Converse turn, and a log subscription.

Each is an async iterator that remembers how far it got, so that a cut
connection costs the caller nothing:

- `TurnStream` (StreamTurn) remembers the turn and the last sequence number
  it yielded; when the stream breaks with a retryable error (or ends before
  `turn_ended`) it sends `ResumeTurn{after_sequence}` and carries on, so
  the caller sees every event once, in order, with no gap.
- `Subscription` (SubscribeEvents) remembers the last event's version or
  position, the `caught_up` marker and every `checkpoint`, and resubscribes
  after the furthest of them.
- `ConverseTurn` (Converse) runs one turn on a bidirectional stream and
  answers the service's client-side tool calls with the caller's callbacks;
  cut off, it reads the rest of the turn over a resumed StreamTurn (the
  service cancels the turns of a broken Converse).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

import grpc

from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import history_pb2 as hpb
from turnlog_client.errors import (
    FailedPrecondition,
    TurnlogError,
    error_from_detail,
    error_from_rpc,
)

if TYPE_CHECKING:
    from turnlog_client.aio import AsyncTurnlogClient

#: A client-side tool: given the call (name, call id, arguments as JSON
#: text), returns the result text, sync or async. An exception becomes the
#: call's error.
ToolCallback = Callable[[pb.ToolCall], str | Awaitable[str]]


class TurnStream:
    """A turn's events from StreamTurn, resumed transparently after a cut connection.

    Iterate it (`async for event in stream`) for `TurnEvent`s; it ends after
    `turn_ended`. `turn_id` and `last_sequence` say how far it got (resume
    elsewhere with `AsyncTurnlogClient.resume_turn`); `resumes` counts the
    reconnections it made.
    """

    def __init__(
        self, client: AsyncTurnlogClient, request: spb.StreamTurnRequest, conversation: str
    ) -> None:
        self._client = client
        self._request = request
        self.conversation = conversation
        self.turn_id = request.resume.turn_id if request.HasField("resume") else ""
        self.last_sequence = request.resume.after_sequence if request.HasField("resume") else 0
        self.resumes = 0
        self.ended: spb.TurnEnded | None = None
        self._events = self._run()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> spb.TurnEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop reading (the turn goes on on the service)."""
        await self._events.aclose()

    async def cancel(self, reason: str = "") -> spb.CancelTurnResponse:
        """Cancel the turn (CancelTurn); the stream then ends with its `turn_ended`."""
        if not self.turn_id:
            raise RuntimeError("the turn has not started yet")
        return await self._client.cancel_turn(self.conversation, self.turn_id, reason=reason)

    def _next_request(self) -> spb.StreamTurnRequest:
        if not self.turn_id:
            # Not started as far as we know: the same start again (the same
            # request id, so the service watches the same turn, never a second).
            return self._request
        return spb.StreamTurnRequest(
            resume=spb.ResumeTurn(
                conversation=self.conversation,
                turn_id=self.turn_id,
                after_sequence=self.last_sequence,
            )
        )

    async def _run(self) -> AsyncGenerator[spb.TurnEvent, None]:
        policy = self._client.retry_policy
        attempt = 0
        started = time.monotonic()
        while True:
            attempt += 1
            call = self._client.stub.StreamTurn(
                self._next_request(), metadata=self._client.call_metadata
            )
            failure: TurnlogError
            try:
                async for response in call:
                    event = response.event
                    if event.sequence <= self.last_sequence:
                        continue  # already yielded before a resume
                    attempt, started = 0, time.monotonic()
                    self.turn_id = event.turn_id
                    self.last_sequence = event.sequence
                    if event.HasField("turn_ended"):
                        self.ended = event.turn_ended
                    yield event
                    if self.ended is not None:
                        return
                # The stream ended before the turn did (a replica shutting
                # down): as good as cut.
                failure = TurnlogError(
                    "the stream ended before the turn", code=grpc.StatusCode.UNAVAILABLE
                )
            except grpc.aio.AioRpcError as e:
                failure = error_from_rpc(e)
                if not policy.should_retry(failure, attempt, time.monotonic() - started):
                    raise failure from e
            finally:
                call.cancel()
            if not policy.should_retry(failure, attempt, time.monotonic() - started):
                raise failure
            self.resumes += 1
            await asyncio.sleep(policy.backoff_s(max(attempt, 1), failure))


class ConverseTurn:
    """One turn on a Converse stream, answering client-side tool calls with callbacks.

    Iterate it for `TurnEvent`s (it ends after `turn_ended`); when the
    service awaits a client-side tool (`tool_execution_started.client_side`),
    the callback registered under the tool's name runs (a sync callback in a
    worker thread, so it never blocks the event loop) and its result, or its
    exception as the call's error, goes back before the next event is read.
    `cancel()` asks the service to cancel the turn. Refusals of the turn's
    user message raise; refusals of later actions (a cancel that came too
    late) are kept in `rejections`.

    A cut connection: the service cancels the turns of a Converse stream
    that breaks (docs/conversation.md), so the SDK reads the rest of the
    turn's events over a `StreamTurn` resumed after the last sequence seen
    (or started with the same request id, when the cut came before the
    turn's first event: that watches the same turn, never a second), with
    `TurnStream`'s retries. The caller sees the turn end (cancelled, "the
    client disconnected") with no gap and no duplicate, instead of an
    error, and may send the message again. While it reads that way, tool
    calls are answered with `SubmitToolResults` (answers the cut stream may
    have lost are sent again: the same answer twice has no effect) and
    `cancel()` uses `CancelTurn`. `resumes` counts such switches.
    """

    def __init__(
        self,
        client: AsyncTurnlogClient,
        turn_input: spb.TurnInput,
        tools: Mapping[str, ToolCallback],
    ) -> None:
        self._client = client
        self._input = turn_input
        self._tools = dict(tools)
        self._call: Any = None
        self._write_lock = asyncio.Lock()
        self._cancel_reason: str | None = None
        self._over_stream_turn = False
        #: Answers sent whose ToolExecutionFinished has not come yet, by call id.
        self._unconfirmed: dict[str, spb.ToolResult] = {}
        self.turn_id = ""
        self.last_sequence = 0
        self.ended: spb.TurnEnded | None = None
        self.rejections: list[TurnlogError] = []
        self.tool_calls_answered = 0
        self.resumes = 0
        self._events = self._run()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> spb.TurnEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def cancel(self, reason: str = "") -> None:
        """Ask the service to cancel the turn; events go on until its `turn_ended`."""
        self._cancel_reason = reason
        if not self.turn_id or self.ended is not None:
            return  # sent once the turn has started
        if self._over_stream_turn:
            await self._client.cancel_turn(self._input.conversation, self.turn_id, reason=reason)
        else:
            await self._write(
                spb.ConverseRequest(cancel=spb.CancelTurn(turn_id=self.turn_id, reason=reason))
            )

    async def _write(self, request: spb.ConverseRequest) -> None:
        """Sends on the Converse stream; a failure shows as the stream's error when read."""
        async with self._write_lock:
            if self._call is None or self.ended is not None:
                return
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.write(request)

    async def _answer(self, call: pb.ToolCall) -> spb.ToolResult:
        result = spb.ToolResult(turn_id=self.turn_id, call_id=call.call_id)
        callback = self._tools.get(call.name)
        if callback is None:
            result.error = f"no client-side handler for tool {call.name!r}"
            return result
        try:
            if inspect.iscoroutinefunction(callback):
                value = await callback(call)
            else:
                value = await asyncio.to_thread(callback, call)
                if inspect.isawaitable(value):
                    value = await value
        except Exception as e:
            result.error = f"{type(e).__name__}: {e}"
            return result
        result.result = str(value)
        return result

    def _note(self, event: spb.TurnEvent) -> bool:
        """Records how far the turn got; False for an event already yielded."""
        if event.sequence and event.sequence <= self.last_sequence:
            return False
        self.turn_id = event.turn_id
        self.last_sequence = event.sequence or self.last_sequence
        if event.HasField("tool_execution_finished"):
            self._unconfirmed.pop(event.tool_execution_finished.execution.call.call_id, None)
        if event.HasField("turn_ended"):
            self.ended = event.turn_ended
        return True

    async def _tool_call(self, event: spb.TurnEvent) -> spb.ToolResult | None:
        """The answer to a client-side tool call the event asks for, if it asks for one."""
        started = event.tool_execution_started
        if not (event.HasField("tool_execution_started") and started.client_side):
            return None
        answer = await self._answer(started.call)
        self._unconfirmed[answer.call_id] = answer
        self.tool_calls_answered += 1
        return answer

    async def _run(self) -> AsyncGenerator[spb.TurnEvent, None]:
        conversing = self._conversing()
        try:
            async for event in conversing:
                yield event
            return
        except TurnlogError as error:
            if not (error.retryable and self.ended is None):
                raise
        finally:
            await conversing.aclose()
        self.resumes += 1
        self._over_stream_turn = True
        streaming = self._streaming()
        try:
            async for event in streaming:
                yield event
        finally:
            await streaming.aclose()

    async def _conversing(self) -> AsyncGenerator[spb.TurnEvent, None]:
        """The turn on its Converse stream, until it ends or the stream breaks."""
        # No request iterator: requests are written with call.write().
        self._call = self._client.stub.Converse(metadata=self._client.call_metadata)  # type: ignore[call-arg]
        try:
            await self._write(spb.ConverseRequest(user_message=self._input))
            async for response in self._call:
                if response.HasField("action_rejected"):
                    rejected = response.action_rejected
                    error = error_from_detail(rejected.error)
                    if rejected.action_index == 1:
                        raise error
                    self.rejections.append(error)
                    continue
                event = response.event
                first = not self.turn_id
                if not self._note(event):
                    continue
                if self.ended is not None:
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await self._call.done_writing()
                yield event
                if self.ended is not None:
                    return
                if first and self._cancel_reason is not None:
                    await self.cancel(self._cancel_reason)
                answer = await self._tool_call(event)
                if answer is not None:
                    await self._write(spb.ConverseRequest(tool_result=answer))
            raise TurnlogError("the stream ended before the turn", code=grpc.StatusCode.UNAVAILABLE)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from e
        finally:
            self._call.cancel()

    async def _streaming(self) -> AsyncGenerator[spb.TurnEvent, None]:
        """The rest of the turn over StreamTurn, answering tools with SubmitToolResults."""
        name = self._input.conversation
        if self.turn_id:
            stream = self._client.resume_turn(name, self.turn_id, self.last_sequence)
        else:
            # Cut before the turn was seen to start: start it over StreamTurn
            # with the same request id, which watches the same turn if the
            # user message did arrive (never a second turn).
            stream = TurnStream(self._client, spb.StreamTurnRequest(start=self._input), name)
        try:
            if self._unconfirmed and self.turn_id:
                # The cut stream may have lost them; the same answer twice is harmless.
                with contextlib.suppress(FailedPrecondition):
                    await self._client.submit_tool_results(
                        name, self.turn_id, list(self._unconfirmed.values())
                    )
            if self._cancel_reason is not None:
                await self.cancel(self._cancel_reason)
            async for event in stream:
                if not self._note(event):
                    continue
                yield event
                if self.ended is not None:
                    return
                answer = await self._tool_call(event)
                if answer is not None:
                    await self._client.submit_tool_results(name, self.turn_id, [answer])
        finally:
            await stream.aclose()


class Subscription:
    """SubscribeEvents, resubscribing after the last event, caught_up or checkpoint seen.

    Iterate it for `LogEvent`s; it never ends by itself (stop with
    `aclose()`, or leave the loop). `caught_up` turns true at the catch-up's
    end; `version` (one conversation) and `position` (all conversations) say
    where a new subscription would continue (`resume_after`), and include
    checkpoints, so a resumed filtered subscription skips what was scanned.
    """

    def __init__(
        self,
        client: AsyncTurnlogClient,
        *,
        conversation: str,
        after_version: int,
        after_position: str,
        event_types: Sequence[str],
        view: hpb.EventView.ValueType,
    ) -> None:
        self._client = client
        self.conversation = conversation
        self.version = after_version
        self.position = after_position
        self._event_types = list(event_types)
        self._view = view
        self.caught_up = False
        self.checkpoints = 0
        self.resubscriptions = 0
        self._events = self._run()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> hpb.LogEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    def _request(self) -> spb.SubscribeEventsRequest:
        return spb.SubscribeEventsRequest(
            conversation=self.conversation,
            after_version=self.version if self.conversation else 0,
            after_position="" if self.conversation else self.position,
            event_types=self._event_types,
            view=self._view,
        )

    async def _run(self) -> AsyncGenerator[hpb.LogEvent, None]:
        policy = self._client.retry_policy
        attempt = 0
        started = time.monotonic()
        while True:
            attempt += 1
            call = self._client.stub.SubscribeEvents(
                self._request(), metadata=self._client.call_metadata
            )
            try:
                async for response in call:
                    attempt, started = 0, time.monotonic()
                    if response.HasField("caught_up"):
                        self.caught_up = True
                        self.version = max(self.version, response.caught_up.version)
                        self.position = response.caught_up.position or self.position
                    elif response.HasField("checkpoint"):
                        self.checkpoints += 1
                        self.position = response.checkpoint.position
                    for event in response.events:
                        self.version = event.version
                        self.position = event.position or self.position
                        yield event
                failure = TurnlogError("the subscription ended", code=grpc.StatusCode.UNAVAILABLE)
            except grpc.aio.AioRpcError as e:
                failure = error_from_rpc(e)
                if not policy.should_retry(failure, attempt, time.monotonic() - started):
                    raise failure from e
            finally:
                call.cancel()
            if not policy.should_retry(failure, attempt, time.monotonic() - started):
                raise failure
            self.resubscriptions += 1
            await asyncio.sleep(policy.backoff_s(max(attempt, 1), failure))


__all__ = ["ConverseTurn", "Subscription", "ToolCallback", "TurnStream"]
