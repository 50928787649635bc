"""Errors across the engine protocol, both ways.

The worker sends a `TurnlogError` as a status code plus `google.rpc.ErrorInfo`
from the one table in `turnlog.grpc_errors` (per-request `GenerationError`
messages and unary RPC failures alike); the client turns them back into the
same `TurnlogError` subclass, chosen by the ErrorInfo reason, or by the
status code when the reason is unknown.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]

from turnlog import errors, grpc_errors
from turnlog.engine.v1 import engine_pb2

_ERROR_BY_CODE: dict[int, type[errors.TurnlogError]] = {
    code_pb2.INVALID_ARGUMENT: errors.InvalidArgumentError,
    code_pb2.OUT_OF_RANGE: errors.InvalidArgumentError,
    code_pb2.NOT_FOUND: errors.NotFoundError,
    code_pb2.ALREADY_EXISTS: errors.AlreadyExistsError,
    code_pb2.UNAVAILABLE: errors.EngineUnavailableError,
    code_pb2.CANCELLED: errors.OperationCancelledError,
    code_pb2.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    code_pb2.FAILED_PRECONDITION: errors.FailedPreconditionError,
    code_pb2.UNIMPLEMENTED: errors.UnsupportedByModelError,
}


def _all_subclasses(cls: type[errors.TurnlogError]) -> list[type[errors.TurnlogError]]:
    found: list[type[errors.TurnlogError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def _error_by_reason() -> dict[str, type[errors.TurnlogError]]:
    table: dict[str, type[errors.TurnlogError]] = {}
    for cls in _all_subclasses(errors.TurnlogError):
        # Only classes built from (message, metadata) can be rebuilt from the
        # wire; the others (VersionConflictError...) never cross this protocol.
        if cls.__init__ is errors.TurnlogError.__init__:
            table.setdefault(cls.reason, cls)
    table["INTERNAL"] = errors.EngineInternalError
    return table


def generation_error(request_id: str, error: BaseException) -> engine_pb2.GenerationError:
    """A per-request GenerationError message for an error."""
    return engine_pb2.GenerationError(
        request_id=request_id,
        code=grpc_errors.code_of(error),
        message=grpc_errors.public_message(error),
        error_info=grpc_errors.error_info_of(error),
    )


def rich_status(error: BaseException) -> tuple[grpc.StatusCode, str, bytes]:
    """Status code, message and serialized google.rpc.Status for ending a unary RPC."""
    status = grpc_errors.status_of(error)
    grpc_code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    return grpc_code, status.message, status.SerializeToString()


def error_from(
    code: int, message: str, info: error_details_pb2.ErrorInfo | None
) -> errors.TurnlogError:
    """Rebuild the TurnlogError a worker reported (by reason, else by status code)."""
    metadata = dict(info.metadata) if info is not None else {}
    metadata.pop("retryable", None)
    cls: type[errors.TurnlogError] | None = None
    if info is not None and info.reason:
        cls = _error_by_reason().get(info.reason)
    if cls is None:
        cls = _ERROR_BY_CODE.get(code, errors.EngineInternalError)
    return cls(message or cls.reason, metadata=metadata)


def error_from_rpc(error: grpc.aio.AioRpcError) -> errors.TurnlogError:
    """Rebuild a TurnlogError from a failed RPC, reading ErrorInfo from the rich status."""
    info: error_details_pb2.ErrorInfo | None = None
    metadata: Any = error.trailing_metadata() or ()
    for key, value in metadata:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                candidate = error_details_pb2.ErrorInfo()
                if detail.Unpack(candidate):
                    info = candidate
    code = error.code().value[0]
    if info is None and code in (code_pb2.UNAVAILABLE, code_pb2.UNKNOWN):
        return errors.EngineUnavailableError("engine worker unavailable")
    return error_from(code, error.details() or "", info)
