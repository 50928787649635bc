"""The one table between turnlog errors and gRPC status codes, for the engine protocol.

The worker turns a `TurnlogError` into a status code plus `google.rpc.ErrorInfo`
(per-request `GenerationError` messages and unary RPC failures alike); the
client turns them back into the same `TurnlogError` subclass, chosen by the
ErrorInfo reason, or by the status code when the reason is unknown.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]

from turnlog import errors
from turnlog.engine.v1 import engine_pb2

# Ordered most specific first: the first matching class wins.
_CODE_BY_ERROR: tuple[tuple[type[errors.TurnlogError], int], ...] = (
    (errors.InvalidArgumentError, code_pb2.INVALID_ARGUMENT),
    (errors.NotFoundError, code_pb2.NOT_FOUND),
    (errors.AlreadyExistsError, code_pb2.ALREADY_EXISTS),
    (errors.EngineUnavailableError, code_pb2.UNAVAILABLE),
    (errors.OperationCancelledError, code_pb2.CANCELLED),
    (errors.DeadlineExceededError, code_pb2.DEADLINE_EXCEEDED),
    (errors.UnsupportedByModelError, code_pb2.FAILED_PRECONDITION),
    (errors.VersionConflictError, code_pb2.ABORTED),
)

_ERROR_BY_CODE: dict[int, type[errors.TurnlogError]] = {
    code_pb2.INVALID_ARGUMENT: errors.InvalidArgumentError,
    code_pb2.OUT_OF_RANGE: errors.InvalidArgumentError,
    code_pb2.NOT_FOUND: errors.NotFoundError,
    code_pb2.ALREADY_EXISTS: errors.AlreadyExistsError,
    code_pb2.UNAVAILABLE: errors.EngineUnavailableError,
    code_pb2.CANCELLED: errors.OperationCancelledError,
    code_pb2.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    code_pb2.FAILED_PRECONDITION: errors.UnsupportedByModelError,
    code_pb2.UNIMPLEMENTED: errors.UnsupportedByModelError,
}

# Messages of errors that are not TurnlogErrors never reach a client.
INTERNAL_MESSAGE = "internal engine error"


def _all_subclasses(cls: type[errors.TurnlogError]) -> list[type[errors.TurnlogError]]:
    found: list[type[errors.TurnlogError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def _error_by_reason() -> dict[str, type[errors.TurnlogError]]:
    table: dict[str, type[errors.TurnlogError]] = {}
    for cls in _all_subclasses(errors.TurnlogError):
        # VersionConflictError has a different constructor; it never crosses this protocol.
        if cls is not errors.VersionConflictError:
            table.setdefault(cls.reason, cls)
    table["INTERNAL"] = errors.EngineInternalError
    return table


def code_for(error: BaseException) -> int:
    """The google.rpc.Code for an error (INTERNAL for anything not a TurnlogError)."""
    for cls, code in _CODE_BY_ERROR:
        if isinstance(error, cls):
            return code
    return int(code_pb2.INTERNAL)


def error_info_for(error: BaseException) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo for an error; non-turnlog errors become a bare ENGINE_INTERNAL."""
    if isinstance(error, errors.TurnlogError):
        metadata = dict(error.metadata)
        metadata["retryable"] = "true" if error.retryable else "false"
        return error_details_pb2.ErrorInfo(
            reason=error.reason, domain=errors.ERROR_DOMAIN, metadata=metadata
        )
    return error_details_pb2.ErrorInfo(
        reason=errors.EngineInternalError.reason,
        domain=errors.ERROR_DOMAIN,
        metadata={"retryable": "false"},
    )


def public_message(error: BaseException) -> str:
    """The message a client may see: a TurnlogError's own, never str() of anything else."""
    if isinstance(error, errors.TurnlogError):
        return error.message
    return INTERNAL_MESSAGE


def generation_error(request_id: str, error: BaseException) -> engine_pb2.GenerationError:
    """A per-request GenerationError message for an error."""
    return engine_pb2.GenerationError(
        request_id=request_id,
        code=code_for(error),
        message=public_message(error),
        error_info=error_info_for(error),
    )


def rich_status(error: BaseException) -> tuple[grpc.StatusCode, str, bytes]:
    """Status code, message and serialized google.rpc.Status for ending a unary RPC."""
    code = code_for(error)
    message = public_message(error)
    detail = any_pb2.Any()
    detail.Pack(error_info_for(error))
    status = status_pb2.Status(code=code, message=message, details=[detail])
    grpc_code = next(c for c in grpc.StatusCode if c.value[0] == code)
    return grpc_code, message, status.SerializeToString()


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
