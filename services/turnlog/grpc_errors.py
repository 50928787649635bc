"""The one table from turnlog errors to gRPC status codes, and what a status carries.

Both gRPC adapters, the conversation service and the engine worker, send
errors through here: a `google.rpc.Code` chosen by this table, a message safe
to show, and a `google.rpc.ErrorInfo` (reason, domain `turnlog.dev`,
lowerCamel metadata with `retryable` always set). An exception that is not a
`TurnlogError` is a bug: it goes out as INTERNAL with a fixed message, never
its own text.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import any_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]

from turnlog import errors

# Most specific first: the first class an error is an instance of decides.
STATUS_TABLE: tuple[tuple[type[errors.TurnlogError], int], ...] = (
    (errors.ContextLengthExceededError, code_pb2.INVALID_ARGUMENT),
    (errors.InvalidArgumentError, code_pb2.INVALID_ARGUMENT),
    (errors.NotFoundError, code_pb2.NOT_FOUND),
    (errors.AlreadyExistsError, code_pb2.ALREADY_EXISTS),
    (errors.VersionConflictError, code_pb2.ABORTED),
    (errors.DuplicateEventError, code_pb2.ABORTED),
    (errors.FailedPreconditionError, code_pb2.FAILED_PRECONDITION),
    (errors.StorageUnavailableError, code_pb2.UNAVAILABLE),
    (errors.EngineUnavailableError, code_pb2.UNAVAILABLE),
    (errors.DeadlineExceededError, code_pb2.DEADLINE_EXCEEDED),
    (errors.UnauthenticatedError, code_pb2.UNAUTHENTICATED),
    (errors.PermissionDeniedError, code_pb2.PERMISSION_DENIED),
    (errors.ResourceExhaustedError, code_pb2.RESOURCE_EXHAUSTED),
    (errors.OperationCancelledError, code_pb2.CANCELLED),
    (errors.UnsupportedByModelError, code_pb2.UNIMPLEMENTED),
    (errors.IntegrityError, code_pb2.DATA_LOSS),
    (errors.EngineInternalError, code_pb2.INTERNAL),
)

#: What a client sees of an error that is not a TurnlogError.
INTERNAL_MESSAGE = "internal error"


def code_of(error: BaseException) -> int:
    """The google.rpc.Code for an error (INTERNAL when no row matches)."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    internal: int = code_pb2.INTERNAL
    return internal


def _classes(cls: type[errors.TurnlogError]) -> list[type[errors.TurnlogError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_classes(sub))
    return found


def code_of_reason(reason: str) -> int:
    """The google.rpc.Code that errors of `reason` go out with (INTERNAL when unknown).

    For errors recorded as data (a failed turn keeps its reason, not its
    class): looked up among the `TurnlogError` classes defined so far, at
    each call, so that those of modules imported later count too.
    """
    for cls in _classes(errors.TurnlogError):
        if cls.reason == reason:
            return code_of(cls.__new__(cls))  # the table reads only the type
    internal: int = code_pb2.INTERNAL
    return internal


def public_message(error: BaseException) -> str:
    """A TurnlogError's own message (written to be shown); a fixed text otherwise."""
    return error.message if isinstance(error, errors.TurnlogError) else INTERNAL_MESSAGE


def error_info_of(error: BaseException) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo for an error; anything not a TurnlogError is a bare INTERNAL."""
    if isinstance(error, errors.TurnlogError):
        metadata = {**error.metadata, "retryable": "true" if error.retryable else "false"}
        reason = error.reason
    else:
        metadata, reason = {"retryable": "false"}, errors.TurnlogError.reason
    return error_details_pb2.ErrorInfo(reason=reason, domain=errors.ERROR_DOMAIN, metadata=metadata)


def status_of(
    error: BaseException, extra_details: Iterable[message.Message] = ()
) -> status_pb2.Status:
    """The google.rpc.Status for an error: code, safe message, ErrorInfo, then extras."""
    details = []
    for detail in (error_info_of(error), *extra_details):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    return status_pb2.Status(code=code_of(error), message=public_message(error), details=details)
