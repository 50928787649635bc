"""The conversation service's errors on the wire, mapped once for every handler.

Codes and ErrorInfo come from the one table in `turnlog.grpc_errors` (shared
with the engine worker's adapter); this module adds what only this API
sends, a `google.rpc.BadRequest` with one field violation per invalid
request field, and `maps_errors`, the decorator that ends every handler's
failure with its status.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar, overload

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from turnlog import errors, grpc_errors

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

_Self = TypeVar("_Self")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


#: At most this many field violations go out in one status (the rest are counted).
MAX_VIOLATIONS = 20
#: At most this many are spelled out in the status message and ErrorInfo metadata.
MAX_VIOLATIONS_IN_MESSAGE = 5
#: Field paths are cut to this many characters (a map key is part of its path).
MAX_FIELD_PATH = 160


class FieldViolationsError(errors.InvalidArgumentError):
    """Request fields failed validation; carries one violation per field."""

    reason = "INVALID_REQUEST"

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        # Bounded: a status travels in trailers, and a client refuses trailers
        # past 8 KiB (it would see RESOURCE_EXHAUSTED instead of this error).
        shown = tuple((f[:MAX_FIELD_PATH], d) for f, d in violations[:MAX_VIOLATIONS])
        metadata = {"fields": ",".join(f for f, _ in shown[:MAX_VIOLATIONS_IN_MESSAGE])}
        if len(violations) > len(shown):
            metadata["moreViolations"] = str(len(violations) - len(shown))
        super().__init__(
            "invalid request: "
            + "; ".join(f"{f}: {d}" for f, d in shown[:MAX_VIOLATIONS_IN_MESSAGE])
            + ("; …" if len(violations) > MAX_VIOLATIONS_IN_MESSAGE else ""),
            metadata=metadata,
        )
        self.violations = shown


def to_status(error: BaseException) -> grpc.Status:
    """The gRPC status (with details) for any error raised by a handler."""
    if not isinstance(error, errors.TurnlogError):
        log.error("internal error in a request handler", exc_info=error)
    extra = []
    violations: Sequence[tuple[str, str]] = ()
    if isinstance(error, FieldViolationsError):
        violations = error.violations
    elif isinstance(error, errors.PageTokenError):
        violations = (("page_token", error.message),)
    elif isinstance(error, errors.InvalidArgumentError) and error.metadata.get("field"):
        # Found past the validation table (a page token that is not ours):
        # still a field violation, so every malformed field reads the same.
        violations = ((error.metadata["field"], error.message),)
    retry_after_ms = (
        error.metadata.get("retryAfterMs")
        if isinstance(error, errors.ResourceExhaustedError)
        else None
    )
    if retry_after_ms is not None and retry_after_ms.isdigit():
        extra.append(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=int(retry_after_ms) // 1000,
                    nanos=int(retry_after_ms) % 1000 * 1_000_000,
                )
            )
        )
    if violations:
        extra.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            )
        )
    return rpc_status.to_status(grpc_errors.status_of(error, extra))


async def abort(context: Context, error: BaseException) -> NoReturn:
    """End the call with the status of `error`."""
    # grpc's stubs lack abort_with_status; it raises like abort().
    await context.abort_with_status(to_status(error))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")


@overload
def maps_errors(
    handler: Callable[[_Self, _Request, Context], AsyncIterator[_Response]],
) -> Callable[[_Self, _Request, Context], AsyncIterator[_Response]]: ...


@overload
def maps_errors(
    handler: Callable[[_Self, _Request, Context], Coroutine[Any, Any, _Response]],
) -> Callable[[_Self, _Request, Context], Coroutine[Any, Any, _Response]]: ...


def maps_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Ends the call with the status of any exception the handler raises (unary or streaming).

    A cancel (the client went away) is not an error and passes through. A
    streaming handler is closed as soon as the call ends, so its own
    clean-up runs at once.
    """
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def streaming(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async with contextlib.aclosing(handler(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except Exception as e:
                await abort(context, e)

        return streaming

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: Context) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as e:
            await abort(context, e)

    return unary


__all__ = [
    "Context",
    "FieldViolationsError",
    "abort",
    "maps_errors",
    "to_status",
]
