"""The turn-control RPCs: StreamTurn, Converse, CancelTurn and SubmitToolResults.

Thin, like `conversations`: parse, call `ConversationApplication`, build the
response (`messages`); errors become statuses in `status.maps_errors`.
`SendMessage` and `CompactConversation` (unary turns) live in
`conversations`. Cancels and client tool results reach a turn on whichever
replica runs it (`turnlog.conversation.control`).

In `Converse`, a refused action (a user message while a turn runs or on an
archived conversation, a result for a call not awaited, a cancel of a turn
not running, ...) is answered with `ConverseResponse.action_rejected` and
the stream goes on; requests that fail validation, a lost credential, and a
user message to a conversation that does not exist (or is another
tenant's: NOT_FOUND, as for every other RPC) still end the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from turnlog import errors
from turnlog.api.authentication import own_tenant
from turnlog.api.messages import action_rejected, turn_event, turn_message
from turnlog.api.requests import conversation_id, turn_input
from turnlog.api.status import Context, maps_errors
from turnlog.conversation.application import ConversationApplication
from turnlog.conversation.control import MAX_WAIT_S, ToolResultInput
from turnlog.v1 import conversation_service_pb2 as spb

#: The cancel reason recorded for the turns of a Converse session that broke off.
SESSION_ENDED = "the client disconnected"

#: Time kept back from a call's deadline to answer it (DEADLINE_EXCEEDED from
#: the service, which says what to do, rather than the client's own).
_DEADLINE_MARGIN_S = 0.25


def _wait_s(context: Context) -> float:
    """How long a call may wait for a turn: its deadline (less a margin), at most `MAX_WAIT_S`."""
    remaining = context.time_remaining()
    if remaining is None:
        return MAX_WAIT_S
    return max(0.05, min(MAX_WAIT_S, remaining - _DEADLINE_MARGIN_S))


class TurnRpcs:
    """The streaming and turn-control RPCs of `turnlog.v1.ConversationService` (part of `ConversationServicer`)."""

    app: ConversationApplication

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
    async def CancelTurn(  # noqa: N802
        self, request: spb.CancelTurnRequest, context: Context
    ) -> spb.CancelTurnResponse:
        ended = await self.app.cancel_and_wait(
            conversation_id(request.conversation),
            request.turn_id,
            request.reason,
            tenant=own_tenant(),
            timeout_s=_wait_s(context),
        )
        return spb.CancelTurnResponse(
            turn=turn_message(ended.turn), conversation_version=ended.conversation_version
        )

    @maps_errors
    async def SubmitToolResults(  # noqa: N802
        self, request: spb.SubmitToolResultsRequest, context: Context
    ) -> spb.SubmitToolResultsResponse:
        call_ids = await self.app.submit_tool_results(
            conversation_id(request.conversation),
            request.turn_id,
            [
                ToolResultInput(call_id=r.call_id, result=r.result, error=r.error)
                for r in request.results
            ],
            tenant=own_tenant(),
            timeout_s=_wait_s(context),
        )
        return spb.SubmitToolResultsResponse(call_ids=call_ids)

    @maps_errors
    async def Converse(  # noqa: N802
        self, request_iterator: AsyncIterator[spb.ConverseRequest], context: Context
    ) -> AsyncIterator[spb.ConverseResponse]:
        tenant = own_tenant()
        out: asyncio.Queue[spb.ConverseResponse | BaseException | None] = asyncio.Queue()
        #: The turns this session started: turn id -> (conversation, the task forwarding it).
        running: dict[str, tuple[str, asyncio.Task[None]]] = {}
        #: Tool results and cancels being carried out (each answers itself).
        actions: set[asyncio.Task[None]] = set()
        conversation = ""  # the session's conversation, from its first user message

        async def forward(cid: str, turn_id: str) -> None:
            async for update in self.app.watch(cid, turn_id, tenant=tenant):
                await out.put(spb.ConverseResponse(event=turn_event(update)))

        def act(index: int, turn_id: str, work: Coroutine[Any, Any, object]) -> None:
            """Carry out one action in a task of its own; a refusal answers that action only."""

            async def run() -> None:
                try:
                    await work
                except errors.TurnlogError as e:
                    await out.put(action_rejected(index, turn_id, e))

            task = asyncio.create_task(run())
            actions.add(task)
            task.add_done_callback(actions.discard)
            task.add_done_callback(lambda t: _report(t, out))

        def session_turn(turn_id: str) -> str:
            """The conversation of a turn this session may act on."""
            cid = running[turn_id][0] if turn_id in running else conversation
            if not cid:
                raise errors.NotFoundError(
                    f"turn {turn_id!r} not found", metadata={"turnId": turn_id}
                )
            return cid

        async def cancel(cid: str, turn_id: str, reason: str) -> None:
            letter = await self.app.cancel_turn(cid, turn_id, reason, tenant=tenant)
            if letter is not None:
                # On another replica: withdraw the letter once the turn has
                # ended (untaken if it ended first); this stream shows the end.
                try:
                    with contextlib.suppress(errors.TurnlogError):
                        await self.app.turn_end(cid, turn_id, tenant=tenant)
                finally:
                    await self.app.control.withdraw(letter)

        async def read() -> None:
            nonlocal conversation
            try:
                index = 0
                async for message in request_iterator:
                    index += 1
                    # Each message has passed validation; `action` is required.
                    action = message.WhichOneof("action")
                    if action == "user_message":
                        command = turn_input(message.user_message, tenant=tenant)
                        try:
                            turn_id = await self.app.start_turn(command)
                        except errors.NotFoundError:
                            raise  # no such conversation (of this tenant): no session at all
                        except errors.TurnlogError as e:
                            await out.put(action_rejected(index, "", e))
                            continue
                        conversation = command.conversation_id
                        if turn_id in running:
                            continue  # a retry of a request id: its turn is forwarded already
                        task = asyncio.create_task(forward(command.conversation_id, turn_id))
                        running[turn_id] = (command.conversation_id, task)
                        task.add_done_callback(lambda t: _report(t, out))
                    elif action == "tool_result":
                        r = message.tool_result
                        try:
                            cid = session_turn(r.turn_id)
                        except errors.TurnlogError as e:
                            await out.put(action_rejected(index, r.turn_id, e))
                            continue
                        result = ToolResultInput(call_id=r.call_id, result=r.result, error=r.error)
                        act(
                            index,
                            r.turn_id,
                            self.app.submit_tool_results(cid, r.turn_id, [result], tenant=tenant),
                        )
                    else:
                        c = message.cancel
                        try:
                            cid = session_turn(c.turn_id)
                        except errors.TurnlogError as e:
                            await out.put(action_rejected(index, c.turn_id, e))
                            continue
                        act(index, c.turn_id, cancel(cid, c.turn_id, c.reason))
                # The client finished sending: end once every turn it started
                # has ended and every action is answered.
                await asyncio.gather(*(t for _, t in running.values()), return_exceptions=True)
                await asyncio.gather(*actions, return_exceptions=True)
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
                    raise item
                yield item
        finally:
            reader.cancel()
            for task in list(actions):
                task.cancel()
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


def _report(
    task: asyncio.Task[None], out: asyncio.Queue[spb.ConverseResponse | BaseException | None]
) -> None:
    """A forwarding or action task that failed unexpectedly ends the stream with its error."""
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        assert error is not None
        out.put_nowait(error)


__all__ = ["SESSION_ENDED", "TurnRpcs"]
