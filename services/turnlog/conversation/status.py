"""The one table from turnlog errors to gRPC status codes, and the status they carry.

Every error leaves the service as a `google.rpc.Status` whose details hold a
`google.rpc.ErrorInfo` (reason, domain `turnlog.errors.ERROR_DOMAIN`,
lowerCamel metadata: `retryable` always, plus the error's own keys such as
`actualVersion`, `turnId`) and, for field validation, a `google.rpc.BadRequest`.
An error that is not a `TurnlogError` is a bug: it is logged and sent as
INTERNAL with a fixed message, never its text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from turnlog import errors
from turnlog.conversation.application import (
    ConversationArchivedError,
    TurnInProgressError,
    TurnNotRunningHereError,
)

log = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of decides.
STATUS_TABLE: tuple[tuple[type[errors.TurnlogError], int], ...] = (
    (errors.ContextLengthExceededError, code_pb2.INVALID_ARGUMENT),
    (errors.InvalidArgumentError, code_pb2.INVALID_ARGUMENT),
    (errors.NotFoundError, code_pb2.NOT_FOUND),
    (errors.AlreadyExistsError, code_pb2.ALREADY_EXISTS),
    (errors.VersionConflictError, code_pb2.ABORTED),
    (errors.DuplicateEventError, code_pb2.ABORTED),
    (TurnInProgressError, code_pb2.FAILED_PRECONDITION),
    (ConversationArchivedError, code_pb2.FAILED_PRECONDITION),
    (TurnNotRunningHereError, code_pb2.FAILED_PRECONDITION),
    (errors.StorageUnavailableError, code_pb2.UNAVAILABLE),
    (errors.EngineUnavailableError, code_pb2.UNAVAILABLE),
    (errors.DeadlineExceededError, code_pb2.DEADLINE_EXCEEDED),
    (errors.OperationCancelledError, code_pb2.CANCELLED),
    (errors.UnsupportedByModelError, code_pb2.UNIMPLEMENTED),
    (errors.IntegrityError, code_pb2.DATA_LOSS),
    (errors.EngineInternalError, code_pb2.INTERNAL),
)


class FieldViolationsError(errors.InvalidArgumentError):
    """Request fields failed validation; carries one violation per field."""

    reason = "INVALID_REQUEST"

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        super().__init__(
            "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations),
            metadata={"fields": ",".join(f for f, _ in violations)},
        )
        self.violations = tuple(violations)


def code_of(error: errors.TurnlogError) -> int:
    """The google.rpc.Code of a turnlog error (INTERNAL when no row matches)."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    internal: int = code_pb2.INTERNAL
    return internal


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: BaseException) -> grpc.Status:
    """The gRPC status (with details) for any error raised by a handler."""
    if not isinstance(error, errors.TurnlogError):
        log.error("internal error in a request handler", exc_info=error)
        error = errors.TurnlogError("internal error")
    code = code_of(error)
    metadata = {**error.metadata, "retryable": "true" if error.retryable else "false"}
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=errors.ERROR_DOMAIN, metadata=metadata
    )
    details = [_pack(info)]
    if isinstance(error, FieldViolationsError):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in error.violations
            ]
        )
        details.append(_pack(bad))
    # Deliberate errors carry messages written to be shown; internal ones
    # were replaced above by a fixed text.
    status = status_pb2.Status(code=code, message=error.message, details=details)
    return rpc_status.to_status(status)
