"""`TurnlogClient`: the blocking client, run on the asyncio client.

Every method is `AsyncTurnlogClient`'s own, run on a private event loop in
a daemon thread that this client owns; nothing is written twice. Why not a
second implementation over grpcio's sync stubs: retries, resume, Converse
tool callbacks and subscriptions would each need a second copy that could
drift from the first. The price is one thread per client, and results that
cross a thread boundary (a `concurrent.futures` hand-off per call or event).

A method returning a stream returns a blocking iterator with the same
attributes (`turn_id`, `last_sequence`, `caught_up`, ...) and `cancel()`
where the stream has one. Ctrl-C while a call waits cancels that call on the
loop and raises `KeyboardInterrupt` in the caller's thread, as a blocking
call would.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import history_pb2 as hpb
from turnlog_client.aio import DEFAULT_TARGET, AsyncTurnlogClient
from turnlog_client.credentials import Credentials
from turnlog_client.retry import RetryPolicy
from turnlog_client.streams import ConverseTurn, Subscription, TurnStream

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")


class _LoopThread:
    """An event loop running in a daemon thread; runs coroutines on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="turnlog-client", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C (or anything else) in the waiting thread
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _next(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


class BlockingIterator(Generic[S, T]):
    """A blocking iterator over one of the async client's streams (`stream`).

    Attributes of the stream (`turn_id`, `caught_up` ...) read through.
    """

    def __init__(self, loop: _LoopThread, stream: S) -> None:
        self._loop = loop
        self.stream = stream

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        try:
            return self._loop.run(_next(self.stream))  # type: ignore[arg-type]
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop reading; the call is cancelled."""
        aclose = getattr(self.stream, "aclose", None)
        if aclose is not None and not self._loop.loop.is_closed():
            self._loop.run(aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class BlockingTurnStream(BlockingIterator[TurnStream, spb.TurnEvent]):
    """`TurnStream`, blocking."""

    def cancel(self, reason: str = "") -> spb.CancelTurnResponse:
        return self._loop.run(self.stream.cancel(reason))


class BlockingConverseTurn(BlockingIterator[ConverseTurn, spb.TurnEvent]):
    """`ConverseTurn`, blocking; `cancel()` may be called from any thread."""

    def cancel(self, reason: str = "") -> None:
        asyncio.run_coroutine_threadsafe(self.stream.cancel(reason), self._loop.loop).result()


def _blocking(
    method: Callable[Concatenate[AsyncTurnlogClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[TurnlogClient, P], T]:
    def call(self: TurnlogClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(method(self._aio, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


def _iterating(
    method: Callable[Concatenate[AsyncTurnlogClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[TurnlogClient, P], BlockingIterator[AsyncIterator[T], T]]:
    def call(
        self: TurnlogClient, /, *args: P.args, **kwargs: P.kwargs
    ) -> BlockingIterator[AsyncIterator[T], T]:
        return BlockingIterator(self._loop, method(self._aio, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


def _wrapping(
    method: Callable[Concatenate[AsyncTurnlogClient, P], S],
    wrapper: Callable[[_LoopThread, S], T],
) -> Callable[Concatenate[TurnlogClient, P], T]:
    def call(self: TurnlogClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return wrapper(self._loop, method(self._aio, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


class TurnlogClient:
    """A blocking client of the conversation service; the same arguments as `AsyncTurnlogClient`.

    Use it as a context manager, or call `close()`: it owns a thread.
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
        self._aio = AsyncTurnlogClient(
            target,
            token=token,
            credentials=credentials,
            retry=retry,
            timeout_s=timeout_s,
            channel_options=channel_options,
        )
        self._loop = _LoopThread()

    @property
    def aio(self) -> AsyncTurnlogClient:
        """The asyncio client underneath (its coroutines run on this client's loop only)."""
        return self._aio

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            self._loop.run(self._aio.close())
            self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    create_conversation = _blocking(AsyncTurnlogClient.create_conversation)
    get_conversation = _blocking(AsyncTurnlogClient.get_conversation)
    list_conversations = _iterating(AsyncTurnlogClient.list_conversations)
    archive_conversation = _blocking(AsyncTurnlogClient.archive_conversation)
    unarchive_conversation = _blocking(AsyncTurnlogClient.unarchive_conversation)
    update_conversation = _blocking(AsyncTurnlogClient.update_conversation)
    send_message = _blocking(AsyncTurnlogClient.send_message)
    stream_turn = _wrapping(AsyncTurnlogClient.stream_turn, BlockingTurnStream)
    resume_turn = _wrapping(AsyncTurnlogClient.resume_turn, BlockingTurnStream)
    converse = _wrapping(AsyncTurnlogClient.converse, BlockingConverseTurn)
    cancel_turn = _blocking(AsyncTurnlogClient.cancel_turn)
    submit_tool_results = _blocking(AsyncTurnlogClient.submit_tool_results)
    compact_conversation = _blocking(AsyncTurnlogClient.compact_conversation)
    list_turns = _iterating(AsyncTurnlogClient.list_turns)
    list_messages = _iterating(AsyncTurnlogClient.list_messages)
    read_events = _iterating(AsyncTurnlogClient.read_events)
    transcript = _blocking(AsyncTurnlogClient.transcript)
    subscribe_events = _wrapping(
        AsyncTurnlogClient.subscribe_events, BlockingIterator[Subscription, hpb.LogEvent]
    )
    fork_conversation = _blocking(AsyncTurnlogClient.fork_conversation)
    verify_conversation = _blocking(AsyncTurnlogClient.verify_conversation)
    verify_locally = _blocking(AsyncTurnlogClient.verify_locally)
    export_conversation = _blocking(AsyncTurnlogClient.export_conversation)
    import_conversation = _blocking(AsyncTurnlogClient.import_conversation)


__all__ = ["BlockingConverseTurn", "BlockingIterator", "BlockingTurnStream", "TurnlogClient"]
