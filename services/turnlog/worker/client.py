"""The engine client: multiplexed Generate streams to one or more workers.

`EngineClient` is what the conversation service uses. It keeps one
`WorkerConnection` per worker; each connection holds ONE long-lived Generate
stream that carries all of its requests (one background task reads the stream
and feeds per-request queues). Requests are async iterators of
`GenerationDelta`s ending with one `GenerationDone`; failures are raised as
`turnlog.errors` exceptions.

Usage::

    async with EngineClient(["127.0.0.1:50061", "127.0.0.1:50062"]) as engine:
        start = engine_pb2.StartGeneration(prompt_text="Hello", sampling=...)
        async for event in engine.generate(start, affinity_key=conversation_id):
            if isinstance(event, engine_pb2.GenerationDelta):
                print(event.text, end="")

Guarantees:
    - Cancelling the consuming task (or closing the iterator early) sends a
      cancel for the request, which aborts it in the engine.
    - A worker that dies or restarts fails its in-flight requests with
      `EngineUnavailableError`; the next request opens a new stream (the
      channel reconnects by itself, with a short backoff).
    - A request is retried on another (or the same, reconnected) worker only
      on a retryable failure before its first token; after a token has been
      yielded a failure is final.
    - With an `affinity_key`, a conversation stays on one worker while that
      worker is healthy (its prefix cache stays warm); otherwise the least
      loaded healthy worker is chosen, by this client's in-flight requests
      plus the load the worker last reported through GetLoad.

TLS: a target given as a `WorkerTarget` with credentials (or any target,
with the client's `credentials`) is reached over TLS; a plain address with
no credentials is plaintext, as before. With `ReloadingChannelCredentials`
the certificate files are read again when the connection to a worker is
opened anew after its stream failed, so rotated client certificates are
used from the next connection on without a restart (see turnlog.tls).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from turnlog import errors
from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc
from turnlog.tls import ChannelCredentialsSource, current_channel_credentials
from turnlog.worker import status

log = logging.getLogger(__name__)

GenerationEvent = engine_pb2.GenerationDelta | engine_pb2.GenerationDone
_Item = engine_pb2.GenerateResponse | errors.TurnlogError

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Find a restarted worker quickly instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Notice a silently dead worker (no RST) on an idle stream.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
#: Seconds `EngineClient.served_models` waits for a worker's GetModelInfo.
MODEL_INFO_TIMEOUT_S = 5.0
#: Seconds calls still running on a replaced channel (new credentials) get to finish.
REPLACED_CHANNEL_GRACE_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerTarget:
    """A worker's address and how to secure the connection to it.

    Attributes:
        address: host:port. Its host is the name the worker's certificate
            must carry (an IP address needs an IP subject alternative name).
        credentials: TLS credentials (with a client certificate for a worker
            that requires mTLS), or None for plaintext.
    """

    address: str
    credentials: ChannelCredentialsSource | None = None


class _Stream:
    """One Generate call and the requests multiplexed on it."""

    def __init__(
        self, stub: engine_pb2_grpc.EngineServiceStub, on_dead: Callable[[_Stream], None]
    ) -> None:
        self._outgoing: asyncio.Queue[engine_pb2.GenerateRequest | None] = asyncio.Queue()
        self.pending: dict[str, asyncio.Queue[_Item]] = {}
        self.dead = False
        self._on_dead = on_dead
        # grpc-stubs types only the sync API; this is a grpc.aio StreamStreamCall.
        self._call: Any = stub.Generate()  # type: ignore[call-arg]
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    async def _write(self) -> None:
        # One writer task: grpc.aio allows one write in flight per call.
        try:
            while True:
                message = await self._outgoing.get()
                if message is None:
                    await self._call.done_writing()
                    return
                await self._call.write(message)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the reader reports the failure

    def send(self, message: engine_pb2.GenerateRequest) -> None:
        self._outgoing.put_nowait(message)

    async def _read(self) -> None:
        failure: errors.TurnlogError
        try:
            async for response in self._call:
                kind = response.WhichOneof("kind")
                if kind == "delta_batch":
                    for delta in response.delta_batch.deltas:
                        queue = self.pending.get(delta.request_id)
                        if queue is not None:
                            queue.put_nowait(engine_pb2.GenerateResponse(delta=delta))
                    continue
                if kind == "delta":
                    rid = response.delta.request_id
                elif kind == "done":
                    rid = response.done.request_id
                else:
                    rid = response.error.request_id
                queue = self.pending.get(rid)
                if queue is not None:
                    queue.put_nowait(response)
                elif kind == "error":
                    log.warning("engine error for no pending request: %s", response.error.message)
            failure = errors.EngineUnavailableError("the engine worker ended the stream")
        except grpc.aio.AioRpcError as e:
            failure = errors.EngineUnavailableError(
                "the engine worker connection failed", metadata={"grpcCode": e.code().name}
            )
        except asyncio.CancelledError:
            failure = errors.EngineUnavailableError("the engine connection was closed")
        self.dead = True
        self._writer.cancel()
        for queue in self.pending.values():
            queue.put_nowait(failure)
        self.pending.clear()
        self._on_dead(self)

    async def close(self) -> None:
        self.dead = True
        self._call.cancel()
        self._writer.cancel()
        self._reader.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)


class RequestStream:
    """The events of one request: `GenerationDelta`s, then one `GenerationDone`.

    An async iterator (and async context manager). Raises the `TurnlogError`
    the worker reported for the request, or `EngineUnavailableError` when the
    stream to the worker fails. If the consumer is cancelled while waiting,
    or closes the iterator (`aclose`, leaving `async with`, or dropping it)
    before the end, a cancel is sent and the worker aborts the request.
    """

    def __init__(
        self,
        connection: WorkerConnection,
        stream: _Stream,
        request_id: str,
        queue: asyncio.Queue[_Item],
    ) -> None:
        self.request_id = request_id
        self._connection = connection
        self._stream = stream
        self._queue = queue
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = self._queue.get_nowait() if not self._queue.empty() else await self._queue.get()
        except asyncio.CancelledError:
            self._end(cancel=True)
            raise
        if isinstance(item, errors.TurnlogError):
            self._end(cancel=False)
            raise item
        kind = item.WhichOneof("kind")
        if kind == "delta":
            self._connection.healthy = True
            return item.delta
        self._end(cancel=False)
        if kind == "done":
            return item.done
        e = item.error
        raise status.error_from(
            e.code, e.message, e.error_info if e.HasField("error_info") else None
        )

    def _end(self, *, cancel: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self._connection.in_flight -= 1
        self._stream.pending.pop(self.request_id, None)
        if cancel and not self._stream.dead:
            self._stream.send(
                engine_pb2.GenerateRequest(
                    cancel=engine_pb2.CancelGeneration(request_id=self.request_id)
                )
            )

    async def aclose(self) -> None:
        """Stop reading; cancels the request if it has not ended."""
        self._end(cancel=True)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end(cancel=True)

    def __del__(self) -> None:
        if not self._finished:
            with contextlib.suppress(Exception):
                self._end(cancel=True)


class WorkerConnection:
    """A connection to one engine worker, with one multiplexed Generate stream.

    Args:
        target: the worker's gRPC address (host:port).
        credentials: TLS credentials for the connection; None for plaintext.
            With `ReloadingChannelCredentials`, a connection opened after the
            stream failed uses the files as they are then.
        channel_options: extra gRPC channel options.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: ChannelCredentialsSource | None = None,
        channel_options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        self.target = target
        self._credentials_source = credentials
        self._options = [*CHANNEL_OPTIONS, *channel_options]
        self._channel_credentials: grpc.ChannelCredentials | None = None
        self._channel = self._open_channel(
            None if credentials is None else current_channel_credentials(credentials)
        )
        self._stub = engine_pb2_grpc.EngineServiceStub(self._channel)
        self._replaced: set[asyncio.Task[None]] = set()
        self._stream: _Stream | None = None
        self.in_flight = 0
        self.healthy = True
        self.reported_load = 0
        self.draining = False
        self._closed = False
        #: The model this worker serves, as its GetModelInfo names it (None
        #: until asked, and again after it was found unreachable).
        self.served_model: str | None = None

    def _open_channel(self, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        self._channel_credentials = credentials
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(self.target, credentials, options=self._options)

    def _renew_channel_if_credentials_changed(self) -> None:
        """Open a new channel when the credentials changed; only between streams.

        Called only while no Generate stream is alive (the last one failed, or
        none was opened yet), so a working stream is never dropped for new
        credentials; the old channel's unary calls get a grace to finish.
        """
        if self._credentials_source is None:
            return
        fresh = current_channel_credentials(self._credentials_source)
        if fresh is self._channel_credentials:
            return
        old = self._channel
        self._channel = self._open_channel(fresh)
        self._stub = engine_pb2_grpc.EngineServiceStub(self._channel)
        log.info("engine worker %s: connecting with renewed TLS credentials", self.target)
        task = asyncio.create_task(old.close(REPLACED_CHANNEL_GRACE_S))
        self._replaced.add(task)
        task.add_done_callback(self._replaced.discard)

    def _unary_stub(self) -> engine_pb2_grpc.EngineServiceAsyncStub:
        if self._stream is None or self._stream.dead:
            self._renew_channel_if_credentials_changed()
        return self._stub

    def _stream_died(self, stream: _Stream) -> None:
        if self._stream is stream:
            self._stream = None
            self.healthy = False

    def _current_stream(self) -> _Stream:
        if self._closed:
            raise errors.EngineUnavailableError("the engine connection is closed")
        if self._stream is None or self._stream.dead:
            self._renew_channel_if_credentials_changed()
            self._stream = _Stream(self._stub, self._stream_died)
        return self._stream

    def generate(self, start: engine_pb2.StartGeneration) -> RequestStream:
        """Start one request on this worker's shared stream.

        Returns an async iterator of `GenerationDelta`s ending with one
        `GenerationDone` (see `RequestStream`). Assigns a request id if
        `start` has none.

        Raises:
            EngineUnavailableError: the connection is closed.
            AlreadyExistsError: the request id is already running here.
        """
        if not start.request_id:
            start.request_id = uuid.uuid4().hex
        rid = start.request_id
        stream = self._current_stream()
        if rid in stream.pending:
            raise errors.AlreadyExistsError(
                f"request {rid!r} is already running", metadata={"requestId": rid}
            )
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        stream.pending[rid] = queue
        stream.send(engine_pb2.GenerateRequest(start=start))
        self.in_flight += 1
        return RequestStream(self, stream, rid, queue)

    async def tokenize(self, request: engine_pb2.TokenizeRequest) -> engine_pb2.TokenizeResponse:
        """Token ids of a text (see EngineService.Tokenize)."""
        try:
            return await self._unary_stub().Tokenize(request)
        except grpc.aio.AioRpcError as e:
            raise status.error_from_rpc(e) from e

    async def detokenize(
        self, request: engine_pb2.DetokenizeRequest
    ) -> engine_pb2.DetokenizeResponse:
        """Text of token ids (see EngineService.Detokenize)."""
        try:
            return await self._unary_stub().Detokenize(request)
        except grpc.aio.AioRpcError as e:
            raise status.error_from_rpc(e) from e

    async def render_chat(
        self, request: engine_pb2.RenderChatRequest
    ) -> engine_pb2.RenderChatResponse:
        """A chat rendered with the model's template (see EngineService.RenderChat)."""
        try:
            return await self._unary_stub().RenderChat(request)
        except grpc.aio.AioRpcError as e:
            raise status.error_from_rpc(e) from e

    async def count_chat_tokens(
        self, request: engine_pb2.CountChatTokensRequest
    ) -> engine_pb2.CountChatTokensResponse:
        """Token counts of a chat's parts (see EngineService.CountChatTokens)."""
        try:
            return await self._unary_stub().CountChatTokens(request)
        except grpc.aio.AioRpcError as e:
            raise status.error_from_rpc(e) from e

    async def embed(self, request: engine_pb2.EmbedRequest) -> engine_pb2.EmbedResponse:
        """Embeddings (see EngineService.Embed)."""
        try:
            return await self._unary_stub().Embed(request)
        except grpc.aio.AioRpcError as e:
            raise status.error_from_rpc(e) from e

    async def model_info(self) -> engine_pb2.GetModelInfoResponse:
        """Facts about the served model (also remembered in `served_model`)."""
        try:
            info = await self._unary_stub().GetModelInfo(engine_pb2.GetModelInfoRequest())
        except grpc.aio.AioRpcError as e:
            raise status.error_from_rpc(e) from e
        self.served_model = info.model
        return info

    async def get_load(self, timeout_s: float | None = None) -> engine_pb2.GetLoadResponse:
        """The worker's load; also refreshes `healthy`, `reported_load` and `draining`."""
        try:
            load = await self._unary_stub().GetLoad(engine_pb2.GetLoadRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            self.healthy = False
            self.served_model = None  # it may come back with another model
            raise status.error_from_rpc(e) from e
        self.healthy = not load.draining
        self.draining = load.draining
        self.reported_load = load.running_requests + load.waiting_requests
        return load

    async def close(self) -> None:
        """Close the stream (failing pending requests) and the channel."""
        self._closed = True
        if self._stream is not None:
            await self._stream.close()
            self._stream = None
        await self._channel.close(None)
        replaced = list(self._replaced)
        for task in replaced:
            task.cancel()
        await asyncio.gather(*replaced, return_exceptions=True)


class EngineClient:
    """Requests balanced over engine workers, with conversation affinity and retries.

    Args:
        targets: workers, as addresses (host:port) or `WorkerTarget`s. All
            must serve the same model.
        credentials: TLS credentials for the targets given as plain
            addresses; None (the default) connects to those in plaintext. A
            `WorkerTarget` brings its own.
        retries: extra attempts for a request that fails retryably before its
            first token.
        retry_backoff_s: pause before a retry, multiplied by the attempt number.
        load_poll_interval_s: how often GetLoad refreshes load and health;
            0 disables polling (load then comes from in-flight counts only).
        max_affinity_keys: how many conversation-to-worker bindings to remember.
    """

    def __init__(
        self,
        targets: Sequence[str | WorkerTarget],
        *,
        credentials: ChannelCredentialsSource | None = None,
        retries: int = 2,
        retry_backoff_s: float = 0.2,
        load_poll_interval_s: float = 1.0,
        max_affinity_keys: int = 100_000,
    ) -> None:
        if not targets:
            raise ValueError("at least one engine worker target is needed")
        self.workers = [
            WorkerConnection(t, credentials=credentials)
            if isinstance(t, str)
            else WorkerConnection(t.address, credentials=t.credentials)
            for t in targets
        ]
        self._retries = retries
        self._retry_backoff_s = retry_backoff_s
        self._poll_interval_s = load_poll_interval_s
        self._affinity: OrderedDict[str, WorkerConnection] = OrderedDict()
        self._max_affinity_keys = max_affinity_keys
        self._round_robin = itertools.count()
        self._poller: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EngineClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start polling worker load (if enabled). Connections open lazily."""
        if self._poll_interval_s > 0 and self._poller is None:
            self._poller = asyncio.create_task(self._poll_load())

    async def close(self) -> None:
        """Stop polling and close every connection; pending requests fail."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await asyncio.gather(*(w.close() for w in self.workers))

    async def refresh_load(self) -> None:
        """Ask every worker for its load now (updates health too)."""

        async def one(worker: WorkerConnection) -> None:
            with contextlib.suppress(errors.TurnlogError):
                await worker.get_load(timeout_s=max(self._poll_interval_s, 1.0))

        await asyncio.gather(*(one(w) for w in self.workers))

    async def _poll_load(self) -> None:
        while True:
            await self.refresh_load()
            await asyncio.sleep(self._poll_interval_s)

    def _score(self, worker: WorkerConnection) -> int:
        # The worker's reported load includes this client's own requests at poll
        # time; in-flight counts are current, so take the larger of the two.
        return max(worker.in_flight, worker.reported_load)

    async def served_models(self) -> frozenset[str]:
        """The models the reachable workers serve (GetModelInfo, asked once per worker).

        A worker not asked yet (or found unreachable since) is asked now; one
        that does not answer counts for nothing.
        """

        async def ask(worker: WorkerConnection) -> None:
            # A worker that does not answer soon (a silent network) counts for nothing.
            with contextlib.suppress(errors.TurnlogError, TimeoutError):
                async with asyncio.timeout(MODEL_INFO_TIMEOUT_S):
                    await worker.model_info()

        await asyncio.gather(*(ask(w) for w in self.workers if w.served_model is None))
        return frozenset(w.served_model for w in self.workers if w.served_model is not None)

    def pick_worker(
        self,
        affinity_key: str | None = None,
        *,
        exclude: Sequence[WorkerConnection] = (),
        model: str = "",
    ) -> WorkerConnection:
        """The worker for a request: the conversation's own while healthy, else least loaded.

        With `model`, only a worker known to serve it (`served_models`).

        Raises:
            EngineUnavailableError: no worker serves `model` now.
        """
        pool = self.workers
        if model:
            pool = [w for w in self.workers if w.served_model == model]
            if not pool:
                raise errors.EngineUnavailableError(
                    "no connected engine worker serves the model", metadata={"model": model}
                )
        if affinity_key is not None:
            bound = self._affinity.get(affinity_key)
            if bound is not None and bound.healthy and bound not in exclude and bound in pool:
                self._affinity.move_to_end(affinity_key)
                return bound
        candidates = [w for w in pool if w.healthy and w not in exclude]
        if not candidates:
            # Nobody known healthy: try anyone (the stream reconnects), the excluded last.
            candidates = [w for w in pool if w not in exclude] or list(pool)
        offset = next(self._round_robin)
        n = len(candidates)
        rotated = [candidates[(offset + i) % n] for i in range(n)]
        chosen = min(rotated, key=self._score)
        if affinity_key is not None:
            self._affinity[affinity_key] = chosen
            self._affinity.move_to_end(affinity_key)
            while len(self._affinity) > self._max_affinity_keys:
                self._affinity.popitem(last=False)
        return chosen

    def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        affinity_key: str | None = None,
        model: str = "",
    ) -> PooledRequestStream:
        """Run one request on a chosen worker, retrying before the first token.

        `model`: only on a worker that serves it (known from `served_models`);
        empty: any worker.

        Returns an async iterator of `GenerationDelta`s ending with one
        `GenerationDone`. Iterating raises a `turnlog.errors.TurnlogError`
        on failure (`EngineUnavailableError` when no worker could run it).
        Closing the iterator early, or cancelling the consuming task, cancels
        the request in the engine.
        """
        if not start.request_id:
            start.request_id = uuid.uuid4().hex
        return PooledRequestStream(self, start, affinity_key, model)

    def _any_worker(self) -> WorkerConnection:
        return self.pick_worker(None)

    async def tokenize(self, request: engine_pb2.TokenizeRequest) -> engine_pb2.TokenizeResponse:
        """Tokenize on any healthy worker."""
        return await self._any_worker().tokenize(request)

    async def detokenize(
        self, request: engine_pb2.DetokenizeRequest
    ) -> engine_pb2.DetokenizeResponse:
        """Detokenize on any healthy worker."""
        return await self._any_worker().detokenize(request)

    async def render_chat(
        self, request: engine_pb2.RenderChatRequest, *, affinity_key: str | None = None
    ) -> engine_pb2.RenderChatResponse:
        """Render a chat on the conversation's worker (or any healthy one)."""
        return await self.pick_worker(affinity_key).render_chat(request)

    async def count_chat_tokens(
        self, request: engine_pb2.CountChatTokensRequest, *, affinity_key: str | None = None
    ) -> engine_pb2.CountChatTokensResponse:
        """Count a chat's parts on the conversation's worker (or any healthy one)."""
        return await self.pick_worker(affinity_key).count_chat_tokens(request)

    async def embed(self, request: engine_pb2.EmbedRequest) -> engine_pb2.EmbedResponse:
        """Embed on any healthy worker."""
        return await self._any_worker().embed(request)

    async def model_info(self) -> engine_pb2.GetModelInfoResponse:
        """Model facts from any healthy worker."""
        return await self._any_worker().model_info()


class PooledRequestStream:
    """One request through `EngineClient`: a `RequestStream` plus retries.

    A retryable failure before the first event moves the request to another
    worker (or the same one, reconnected), up to the client's retry budget;
    once an event has been returned, failures are final.
    """

    def __init__(
        self,
        client: EngineClient,
        start: engine_pb2.StartGeneration,
        affinity_key: str | None,
        model: str = "",
    ) -> None:
        self.request_id = start.request_id
        self._model = model
        self._client = client
        self._start = start
        self._key = affinity_key
        self._current: RequestStream | None = None
        self._started = False
        self._finished = False
        self._attempt = 0
        self._tried: list[WorkerConnection] = []
        self.worker: WorkerConnection | None = None

    def __aiter__(self) -> PooledRequestStream:
        return self

    def start(self) -> None:
        """Send the request now instead of at the first read.

        The worker starts generating while the caller does other work; its
        output waits here. Never raises: a worker that cannot take the
        request is tried again (and any failure reported) by the first read.
        """
        if self._current is not None or self._finished:
            return
        try:
            self.worker = self._client.pick_worker(
                self._key, exclude=self._tried, model=self._model
            )
            self._current = self.worker.generate(self._start)
        except errors.TurnlogError:
            self.worker = None

    async def __anext__(self) -> GenerationEvent:
        if self._finished:
            raise StopAsyncIteration
        while True:
            try:
                if self._current is None:
                    self.worker = self._client.pick_worker(
                        self._key, exclude=self._tried, model=self._model
                    )
                    self._current = self.worker.generate(self._start)
                event = await self._current.__anext__()
            except StopAsyncIteration:
                self._finished = True
                raise
            except errors.TurnlogError as e:
                client = self._client
                if self._started or not e.retryable or self._attempt >= client._retries:
                    self._finished = True
                    raise
                self._attempt += 1
                if self.worker is not None:
                    self._tried.append(self.worker)
                if len(self._tried) >= len(client.workers):
                    self._tried.clear()
                self._current = None
                log.info("retrying request %s after %s", self.request_id, e.reason)
                await asyncio.sleep(client._retry_backoff_s * self._attempt)
                continue
            self._started = True
            if isinstance(event, engine_pb2.GenerationDone):
                self._finished = True
            return event

    async def aclose(self) -> None:
        """Stop reading; cancels the request if it has not ended."""
        self._finished = True
        if self._current is not None:
            await self._current.aclose()

    async def __aenter__(self) -> PooledRequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
