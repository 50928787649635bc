"""Authentication and authorization of every RPC: one interceptor, one scope table.

`Authentication` runs before anything else looks at a call (the validation
interceptor and the handlers come after it). It sees the method name and
the call's metadata and transport identity, asks the `Authenticator` for
the verified `Principal`, and checks the scope `SCOPES` names for the
method. A call without a valid credential ends UNAUTHENTICATED, one without
the scope PERMISSION_DENIED; both with an `ErrorInfo` reason, and nothing of
the request is read: the body stays raw bytes until the caller is known.

Handlers read the caller with `caller()` and take the tenant only from it:
`own_tenant()` for writes and reads of the caller's own conversations;
`api.access.TenantAccess.read_tenant` for reads an administrator may widen
to every tenant (and which are then recorded).

Live streams (`StreamTurn`, `Converse`, `SubscribeEvents`, `ExportConversation`)
end UNAUTHENTICATED when the credential that opened them expires, or when a
periodic re-check finds it revoked (its JWKS key or API key removed). The
watch costs one timer task per stream and a flag test per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import grpc

from turnlog import errors
from turnlog.api.limits import TenantRateLimiter
from turnlog.api.status import Context, abort
from turnlog.auth.principal import Principal, Scope
from turnlog.v1 import conversation_service_pb2

log = logging.getLogger(__name__)

_SERVICE: Final = conversation_service_pb2.DESCRIPTOR.services_by_name["ConversationService"]


def _method(name: str) -> str:
    return f"/{_SERVICE.full_name}/{name}"


#: The scope each RPC of the conversation service needs (ADMIN holds every
#: scope). A method of that service missing here is refused to everyone, and
#: tests/security checks that every RPC has a row.
SCOPES: Final[Mapping[str, Scope]] = {
    _method("CreateConversation"): Scope.WRITE,
    _method("GetConversation"): Scope.READ,
    _method("ListConversations"): Scope.READ,
    _method("ArchiveConversation"): Scope.WRITE,
    _method("SendMessage"): Scope.WRITE,
    _method("CompactConversation"): Scope.WRITE,
    _method("StreamTurn"): Scope.WRITE,
    _method("Converse"): Scope.WRITE,
    _method("ReadEvents"): Scope.HISTORY,
    _method("SubscribeEvents"): Scope.HISTORY,
    _method("ForkConversation"): Scope.WRITE,
    _method("VerifyConversation"): Scope.HISTORY,
    _method("ExportConversation"): Scope.HISTORY,
    _method("ImportConversation"): Scope.IMPORT,
    _method("CancelTurn"): Scope.WRITE,
    _method("SubmitToolResults"): Scope.WRITE,
    _method("UpdateConversation"): Scope.WRITE,
    _method("UnarchiveConversation"): Scope.WRITE,
    _method("ListTurns"): Scope.READ,
    _method("ListMessages"): Scope.READ,
}

#: Methods answered without a credential: health checking only (load
#: balancers and orchestrators probe it; it says nothing about any tenant).
PUBLIC_METHODS: Final = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

#: Methods that need a credential but no scope (server reflection: the schema).
ANY_SCOPE_PREFIXES: Final = ("/grpc.reflection.",)

#: Seconds between re-checks of a live stream's credential for revocation.
DEFAULT_RECHECK_INTERVAL_S: Final = 30.0

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor

_CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("turnlog_caller")


class Authenticates(Protocol):
    """What the interceptor needs of an authenticator (`turnlog.auth.Authenticator`)."""

    async def authenticate(
        self, metadata: Iterable[tuple[str, str | bytes]], auth_context: Mapping[str, Any]
    ) -> Principal: ...

    async def recheck(self, principal: Principal) -> None: ...

    async def aclose(self) -> None: ...


class InsecureAuthenticator:
    """Every call is the default tenant with every scope but admin: `turnlog serve --insecure` only."""

    def __init__(self, tenant: str = "default") -> None:
        # Not admin: an administrator's reads are recorded, and here every
        # caller would be one.
        self.principal = dataclasses.replace(
            Principal.insecure(tenant), scopes=frozenset(Scope) - {Scope.ADMIN}
        )

    async def authenticate(
        self, metadata: Iterable[tuple[str, str | bytes]], auth_context: Mapping[str, Any]
    ) -> Principal:
        return self.principal

    async def recheck(self, principal: Principal) -> None:
        return None

    async def aclose(self) -> None:
        return None


def caller() -> Principal:
    """The verified caller of the RPC being handled (set by `Authentication`)."""
    try:
        return _CALLER.get()
    except LookupError:
        raise AssertionError(
            "no authenticated caller: is the Authentication interceptor on?"
        ) from None


def own_tenant() -> str:
    """The caller's tenant: what it writes, and reads as its own."""
    return caller().tenant


def required_scope(method: str) -> Scope | None:
    """The scope `method` needs; None when any authenticated caller may call it.

    Raises:
        ScopeMissingError: a method of the conversation service with no row
            (refused to everyone, so a new RPC is closed until it gets one).
    """
    scope = SCOPES.get(method)
    if scope is not None:
        return scope
    if method.startswith(ANY_SCOPE_PREFIXES):
        return None
    raise errors.ScopeMissingError(
        "this method is not open to any scope", metadata={"requiredScope": "admin"}
    )


class Authentication(_Interceptor):
    """Admits every call (but health checks) before all else: credential, scope, tenant rate."""

    def __init__(
        self,
        authenticator: Authenticates,
        *,
        rate_limiter: TenantRateLimiter | None = None,
        recheck_interval_s: float = DEFAULT_RECHECK_INTERVAL_S,
    ) -> None:
        self.authenticator = authenticator
        self.rate_limiter = rate_limiter
        self.recheck_interval_s = recheck_interval_s
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Any = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in PUBLIC_METHODS:
            return cast(Handler, handler)
        known = self._guarded.get(method)
        if known is None or known[0] is not handler:
            known = self._guarded[method] = (handler, self._guard(handler, method))
        return known[1]

    async def _admit(self, context: Context, method: str) -> Principal:
        """The caller, authenticated and holding the method's scope; else the call ends."""
        try:
            principal = await self.authenticator.authenticate(
                context.invocation_metadata() or (), context.auth_context()
            )
            scope = required_scope(method)
            if scope is not None and not principal.has(scope):
                raise errors.ScopeMissingError(
                    f"this call needs the {scope.value!r} scope",
                    metadata={"requiredScope": scope.value},
                )
            if self.rate_limiter is not None:
                self.rate_limiter.admit(principal.tenant)
        except errors.TurnlogError as e:
            # The method name only: never the credential or the request.
            log.info("refused %s: %s", method, e.reason)
            await abort(context, e)
        except Exception as e:  # a bug: INTERNAL, logged once (never the credential)
            await abort(context, e)
        return principal

    def _guard(self, handler: Handler, method: str) -> Handler:
        """`handler` behind authentication; its request parsed only once the caller is known."""
        parse: Any = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer
        admit = self._admit
        watch = self._watch

        async def parsed(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in requests:
                yield parse(raw)

        if handler.unary_unary is not None:
            unary_unary: Any = handler.unary_unary

            async def admitted_unary_unary(raw: bytes, context: Context) -> Any:
                _CALLER.set(await admit(context, method))
                return await unary_unary(parse(raw), context)

            return grpc.unary_unary_rpc_method_handler(
                cast(Any, admitted_unary_unary), None, serialize
            )
        if handler.stream_unary is not None:
            stream_unary: Any = handler.stream_unary

            async def admitted_stream_unary(
                requests: AsyncIterator[bytes], context: Context
            ) -> Any:
                _CALLER.set(await admit(context, method))
                return await stream_unary(parsed(requests), context)

            return grpc.stream_unary_rpc_method_handler(
                cast(Any, admitted_stream_unary), None, serialize
            )
        streaming: Any = handler.unary_stream or handler.stream_stream
        client_streams = handler.unary_stream is None
        if not inspect.isasyncgenfunction(streaming):
            # A handler that writes with context.write (reflection): no
            # expiry watch, it answers one request at a time.
            async def admitted_writer(request: Any, context: Context) -> Any:
                _CALLER.set(await admit(context, method))
                arg = parsed(request) if client_streams else parse(request)
                return await streaming(arg, context)

            factory = (
                grpc.stream_stream_rpc_method_handler
                if client_streams
                else grpc.unary_stream_rpc_method_handler
            )
            return factory(cast(Any, admitted_writer), None, serialize)

        async def admitted_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            principal = await admit(context, method)
            _CALLER.set(principal)
            arg = parsed(request) if client_streams else parse(request)
            try:
                async with contextlib.aclosing(streaming(arg, context)) as responses:
                    async for response in watch(principal, responses):
                        yield response
            except errors.UnauthenticatedError as e:
                await abort(context, e)

        factory = (
            grpc.stream_stream_rpc_method_handler
            if client_streams
            else grpc.unary_stream_rpc_method_handler
        )
        return factory(cast(Any, admitted_stream), None, serialize)

    async def _watch(
        self, principal: Principal, responses: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        """`responses`, ended with UNAUTHENTICATED once the credential expires or is revoked.

        A timer task wakes at the expiry or the next re-check. It cancels
        this task only while it waits inside `responses` (where the
        cancellation lands in code that handles it); if the credential ends
        while a response is being sent, the stream ends before the next one.
        """
        task = asyncio.current_task()
        assert task is not None
        state = _WatchState()
        timer = asyncio.create_task(self._expire(principal, task, state))
        try:
            while True:
                state.waiting = True
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if state.ended is None:
                        raise
                    task.uncancel()
                    raise state.ended from None
                finally:
                    state.waiting = False
                if state.ended is not None:
                    raise state.ended
                yield response
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer

    async def _expire(
        self, principal: Principal, task: asyncio.Task[Any], state: _WatchState
    ) -> None:
        """Sleeps until the credential ends, then ends the stream (see `_watch`)."""
        while True:
            now = time.time()
            wake = now + self.recheck_interval_s
            if principal.expires_at is not None:
                wake = min(wake, principal.expires_at)
            await asyncio.sleep(max(0.0, wake - now))
            try:
                if principal.expires_at is not None and time.time() >= principal.expires_at:
                    raise errors.CredentialExpiredError("the credential expired")
                await self.authenticator.recheck(principal)
            except errors.UnauthenticatedError as e:
                log.info("ending a stream: its credential ended (%s)", e.reason)
                state.ended = e
                if state.waiting:
                    task.cancel()
                return


class _WatchState:
    __slots__ = ("ended", "waiting")

    def __init__(self) -> None:
        self.ended: errors.UnauthenticatedError | None = None
        self.waiting = False


__all__ = [
    "PUBLIC_METHODS",
    "SCOPES",
    "Authenticates",
    "Authentication",
    "InsecureAuthenticator",
    "caller",
    "own_tenant",
    "required_scope",
]
