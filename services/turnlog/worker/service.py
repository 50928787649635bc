"""The gRPC adapter: `EngineService` over any `EngineBackend`.

Generate streams are multiplexed: one task reads the client's messages,
one task per request runs the backend, and every request's output goes
through one outgoing queue that the handler drains into the stream. A
request's failure becomes a `GenerationError` message; the stream ends only
when the client ends it (after its requests finished) or goes away, in which
case every request still running on it is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2

from turnlog import errors
from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc
from turnlog.worker import status
from turnlog.worker.backend import EngineBackend, RequestProgress

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: What request tasks queue for the stream: a bare delta (wrapped when sent,
#: see `_coalesce`), a whole response (done, error), or None: the stream may end.
_Queued = engine_pb2.GenerationDelta | engine_pb2.GenerateResponse
_Outgoing = _Queued | None


class _DrainState:
    """Worker-wide bookkeeping shared by all streams: in-flight tasks and draining."""

    def __init__(self) -> None:
        self.draining = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        self.idle.clear()
        task.add_done_callback(self._discard)

    def _discard(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not self.tasks:
            self.idle.set()


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return d


def _coalesce(batch: list[_Queued]) -> list[engine_pb2.GenerateResponse]:
    """Merge queued deltas into few messages, keeping each request's order.

    Deltas of one request are concatenated; deltas of different requests that
    were queued together go out as one `delta_batch`. A request's done or
    error is sent after its deltas. Under load this turns one message per
    token per request into about one message per engine step. Each delta is
    copied once, into the message that carries it.
    """
    out: list[engine_pb2.GenerateResponse] = []
    group: list[engine_pb2.GenerationDelta] = []
    merged: dict[str, engine_pb2.GenerationDelta] = {}

    def flush() -> None:
        if len(group) == 1:
            out.append(engine_pb2.GenerateResponse(delta=group[0]))
        elif group:
            response = engine_pb2.GenerateResponse()
            response.delta_batch.deltas.extend(group)
            out.append(response)
        group.clear()
        merged.clear()

    for item in batch:
        if isinstance(item, engine_pb2.GenerationDelta):
            into = merged.get(item.request_id)
            if into is None:
                merged[item.request_id] = item
                group.append(item)
            else:
                into.token_ids.extend(item.token_ids)
                into.text += item.text
                into.logprobs.extend(item.logprobs)
        else:
            flush()
            out.append(item)
    flush()
    return out


class _HeldDeltas:
    """One request's deltas on their way out, held per `min_delta_interval`.

    With no interval every delta goes at once. With one, the first goes at
    once and later ones are merged while they come sooner than the interval
    after the last one sent; a delta that comes later sends everything held.
    No timer: a request's deltas come every engine step, so a hold lasts at
    most the interval plus one step, and the end releases it (`release`).
    """

    __slots__ = ("_held", "_interval", "_last_sent", "_put")

    def __init__(self, interval_s: float, put: Callable[[_Queued], None]) -> None:
        self._interval = interval_s
        self._put = put
        self._held: engine_pb2.GenerationDelta | None = None
        self._last_sent = -math.inf

    def add(self, delta: engine_pb2.GenerationDelta) -> None:
        if self._interval <= 0:
            self._put(delta)
            return
        if self._held is None:
            self._held = delta
        else:
            self._held.token_ids.extend(delta.token_ids)
            self._held.text += delta.text
            self._held.logprobs.extend(delta.logprobs)
        now = time.monotonic()
        if now - self._last_sent >= self._interval:
            self._last_sent = now
            self.release()

    def release(self) -> None:
        """Send whatever is held (before the request's end)."""
        if self._held is not None:
            self._put(self._held)
            self._held = None


class _GenerateStream:
    """One Generate call: its reader, its request tasks and its outgoing queue."""

    _ids = itertools.count()

    def __init__(self, backend: EngineBackend, drain: _DrainState) -> None:
        self._backend = backend
        self._drain = drain
        self._prefix = f"s{next(self._ids)}"
        self._out: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reader_done = False

    async def run(
        self, requests: AsyncIterator[engine_pb2.GenerateRequest]
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                first = await self._out.get()
                if first is None:
                    return
                # One loop turn lets the other requests of the same engine step
                # queue their deltas, so they share a message.
                await asyncio.sleep(0)
                batch: list[_Queued] = [first]
                end = False
                while not self._out.empty():
                    item = self._out.get_nowait()
                    if item is None:
                        end = True
                        break
                    batch.append(item)
                for message in _coalesce(batch):
                    yield message
                if end:
                    return
        finally:
            reader.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            # Cancelling a request task aborts its request in the engine.
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    def _maybe_end(self) -> None:
        if self._reader_done and not self._tasks:
            self._out.put_nowait(None)

    async def _read(self, requests: AsyncIterator[engine_pb2.GenerateRequest]) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "start":
                    self._start(message.start)
                elif kind == "cancel":
                    self._cancel(message.cancel.request_id)
                else:
                    self._error("", errors.InvalidArgumentError("empty GenerateRequest"))
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away mid-read; run() cleans up
            log.debug("generate stream reader ended", exc_info=True)
        self._reader_done = True
        self._maybe_end()

    def _error(self, request_id: str, error: BaseException) -> None:
        self._out.put_nowait(
            engine_pb2.GenerateResponse(error=status.generation_error(request_id, error))
        )

    def _start(self, start: engine_pb2.StartGeneration) -> None:
        rid = start.request_id
        if not rid:
            self._error("", errors.InvalidArgumentError("request_id is required"))
            return
        if rid in self._tasks:
            self._error(
                rid,
                errors.AlreadyExistsError(
                    f"request {rid!r} is already running on this stream",
                    metadata={"requestId": rid},
                ),
            )
            return
        if self._drain.draining:
            self._error(rid, errors.EngineUnavailableError("the worker is shutting down"))
            return
        task = asyncio.create_task(self._run_request(start))
        self._tasks[rid] = task
        self._drain.add(task)

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is None:
            self._error(
                request_id,
                errors.NotFoundError(
                    f"no running request {request_id!r} on this stream",
                    metadata={"requestId": request_id},
                ),
            )
            return
        task.cancel()

    async def _run_request(self, start: engine_pb2.StartGeneration) -> None:
        rid = start.request_id
        progress = RequestProgress()
        put = self._out.put_nowait
        held = _HeldDeltas(start.min_delta_interval.ToNanoseconds() / 1e9, put)
        try:
            async for event in self._backend.generate(
                start, engine_request_id=f"{self._prefix}-{rid}", progress=progress
            ):
                if isinstance(event, engine_pb2.GenerationDelta):
                    held.add(event)
                else:
                    held.release()
                    put(engine_pb2.GenerateResponse(done=event))
        except asyncio.CancelledError:
            # Cancelled by a cancel message, by drain, or because the stream ended;
            # the backend has aborted the request. The message is lost in the last case.
            held.release()
            put(engine_pb2.GenerateResponse(done=self._cancelled_done(rid, progress)))
        except errors.TurnlogError as e:
            held.release()  # what was generated before the failure comes first
            self._error(rid, e)
        except Exception as e:
            log.exception("request %s failed in the engine", rid)
            held.release()
            self._error(rid, e)
        finally:
            self._tasks.pop(rid, None)
            self._maybe_end()

    @staticmethod
    def _cancelled_done(rid: str, progress: RequestProgress) -> engine_pb2.GenerationDone:
        now = time.monotonic()
        done = engine_pb2.GenerationDone(
            request_id=rid,
            finish_reason=engine_pb2.FINISH_REASON_CANCELLED,
            usage=engine_pb2.Usage(
                prompt_tokens=progress.prompt_tokens,
                completion_tokens=progress.completion_tokens,
                cached_prompt_tokens=progress.cached_prompt_tokens,
            ),
        )
        done.timings.total.CopyFrom(_duration(now - progress.arrival))
        if progress.first_token is not None:
            done.timings.time_to_first_token.CopyFrom(
                _duration(progress.first_token - progress.arrival)
            )
        return done


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    """`EngineService` over a backend, with graceful drain."""

    def __init__(self, backend: EngineBackend) -> None:
        self._backend = backend
        self._drain = _DrainState()

    @property
    def draining(self) -> bool:
        """True once `drain` started: new requests are refused."""
        return self._drain.draining

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests, let in-flight ones finish for `grace_s`, then abort the rest."""
        self._drain.draining = True
        try:
            await asyncio.wait_for(self._drain.idle.wait(), timeout=grace_s)
        except TimeoutError:
            tasks = list(self._drain.tasks)
            log.warning("aborting %d requests still running after %.1fs", len(tasks), grace_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def Generate(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterable[engine_pb2.GenerateRequest],
        context: grpc.aio.ServicerContext[engine_pb2.GenerateRequest, engine_pb2.GenerateResponse],
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        stream = _GenerateStream(self._backend, self._drain)
        async for message in stream.run(aiter(request_iterator)):
            yield message

    async def _unary(
        self, context: grpc.aio.ServicerContext[object, object], call: Callable[[], Awaitable[_T]]
    ) -> _T:
        try:
            return await call()
        except Exception as e:
            if not isinstance(e, errors.TurnlogError):
                log.exception("unary engine call failed")
            code, message, details = status.rich_status(e)
            await context.abort(
                code, message, trailing_metadata=(("grpc-status-details-bin", details),)
            )
            raise  # unreachable: abort raises

    async def Tokenize(  # noqa: N802
        self, request: engine_pb2.TokenizeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> engine_pb2.TokenizeResponse:
        return await self._unary(context, lambda: self._backend.tokenize(request))

    async def Detokenize(  # noqa: N802
        self,
        request: engine_pb2.DetokenizeRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> engine_pb2.DetokenizeResponse:
        return await self._unary(context, lambda: self._backend.detokenize(request))

    async def RenderChat(  # noqa: N802
        self,
        request: engine_pb2.RenderChatRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> engine_pb2.RenderChatResponse:
        return await self._unary(context, lambda: self._backend.render_chat(request))

    async def CountChatTokens(  # noqa: N802
        self,
        request: engine_pb2.CountChatTokensRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> engine_pb2.CountChatTokensResponse:
        return await self._unary(context, lambda: self._backend.count_chat_tokens(request))

    async def Embed(  # noqa: N802
        self, request: engine_pb2.EmbedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> engine_pb2.EmbedResponse:
        return await self._unary(context, lambda: self._backend.embed(request))

    async def GetModelInfo(  # noqa: N802
        self,
        request: engine_pb2.GetModelInfoRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> engine_pb2.GetModelInfoResponse:
        return await self._unary(context, self._backend.model_info)

    async def GetLoad(  # noqa: N802
        self, request: engine_pb2.GetLoadRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> engine_pb2.GetLoadResponse:
        load = await self._unary(context, self._backend.load)
        load.draining = self._drain.draining
        return load
