"""Errors the service reports, as exception classes.

The service ends a failed call with a `google.rpc.Status` in the trailing
metadata (`grpc-status-details-bin`): an `ErrorInfo` (domain `turnlog.dev`,
a reason, lowerCamel metadata such as `retryable`), a `BadRequest` with
field violations for INVALID_ARGUMENT, and a `RetryInfo` when the caller
should wait before trying again. `error_from_rpc` turns that into one
`TurnlogError` subclass per status code, so callers catch `NotFound` or
`InvalidArgument` instead of comparing codes. The status is parsed here with
googleapis-common-protos alone (grpcio-status is not a dependency of the
client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]

from turnlog.v1 import errors_pb2

#: The ErrorInfo domain of the service's errors.
ERROR_DOMAIN = "turnlog.dev"
_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of an INVALID_ARGUMENT request (`google.rpc.BadRequest`)."""

    field: str
    description: str


class TurnlogError(Exception):
    """A call to the service failed.

    Attributes:
        code: the gRPC status code.
        message: what went wrong, safe to show; not meant to be parsed.
        reason: the `ErrorInfo` reason (an `ErrorReason` name such as
            "CONVERSATION_NOT_FOUND"); "" when the status carried none (a
            transport failure, for example).
        metadata: the reason's metadata (lowerCamel keys).
        retryable: whether trying again (with backoff) may work: the
            service's `retryable` metadata when it sent one, else true for
            UNAVAILABLE and for RESOURCE_EXHAUSTED with a retry delay.
        retry_after_s: how long the service asked the caller to wait
            (`RetryInfo`, or the `retryAfterMs` metadata); None when it did
            not say.
        field_violations: for INVALID_ARGUMENT, each bad field.
    """

    #: The status code of this class (subclasses set it).
    status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.status_code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after_s = retry_after_s
        self.field_violations = tuple(field_violations)
        if retryable is None:
            retryable = self.code == grpc.StatusCode.UNAVAILABLE or (
                self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s is not None
            )
        self.retryable = retryable

    @property
    def error_reason(self) -> errors_pb2.ErrorReason.ValueType:
        """`reason` as an `ErrorReason` value; ERROR_REASON_UNSPECIFIED for one this client
        does not know (a newer service's): treat the error by its status code then."""
        try:
            return errors_pb2.ErrorReason.Value(self.reason)
        except ValueError:
            return errors_pb2.ERROR_REASON_UNSPECIFIED

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class Cancelled(TurnlogError):
    status_code = grpc.StatusCode.CANCELLED


class Unknown(TurnlogError):
    status_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(TurnlogError):
    """The request broke a documented limit; `field_violations` lists each bad field."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(TurnlogError):
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(TurnlogError):
    status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TurnlogError):
    status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(TurnlogError):
    status_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(TurnlogError):
    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(TurnlogError):
    status_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(TurnlogError):
    """A concurrency check failed (`expected_version`); `metadata` says the actual version."""

    status_code = grpc.StatusCode.ABORTED


class OutOfRange(TurnlogError):
    status_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(TurnlogError):
    status_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(TurnlogError):
    status_code = grpc.StatusCode.INTERNAL


class Unavailable(TurnlogError):
    """The service (or something it needs) could not be reached; usually retryable."""

    status_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(TurnlogError):
    status_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(TurnlogError):
    """No valid credential was sent (none, expired, revoked or unknown)."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


_CLASSES: dict[grpc.StatusCode, type[TurnlogError]] = {
    cls.status_code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_class(code: grpc.StatusCode) -> type[TurnlogError]:
    """The exception class of a status code."""
    return _CLASSES.get(code, TurnlogError)


def _retryable(metadata: Mapping[str, str]) -> bool | None:
    value = metadata.get("retryable")
    return None if value is None else value == "true"


def error_from_rpc(error: grpc.RpcError) -> TurnlogError:
    """The `TurnlogError` of a failed call (sync or asyncio), from its status and details."""
    call: Any = error  # a grpc.Call (sync) or grpc.aio.AioRpcError: both have these
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    trailers: Sequence[tuple[str, str | bytes]] = call.trailing_metadata() or ()
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after_s: float | None = None
    for key, value in trailers:
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        if status.message:
            message = status.message
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                reason = info.reason
                metadata.update(info.metadata)
            elif detail.Is(bad.DESCRIPTOR) and detail.Unpack(bad):
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad.field_violations
                )
            elif detail.Is(retry.DESCRIPTOR) and detail.Unpack(retry):
                retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
    if retry_after_s is None and "retryAfterMs" in metadata:
        try:
            retry_after_s = int(metadata["retryAfterMs"]) / 1000
        except ValueError:
            retry_after_s = None
    return error_class(code)(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        retryable=_retryable(metadata),
        retry_after_s=retry_after_s,
        field_violations=violations,
    )


def error_from_detail(detail: errors_pb2.ErrorDetail) -> TurnlogError:
    """The `TurnlogError` of an error carried as data (a Converse `ActionRejected`, a failed turn)."""
    code = _BY_NUMBER.get(detail.code, grpc.StatusCode.UNKNOWN)
    metadata = dict(detail.metadata)
    if detail.phase:
        metadata.setdefault("phase", detail.phase)
    return error_class(code)(
        detail.message,
        code=code,
        reason=detail.reason,
        metadata=metadata,
        retryable=detail.retryable,
    )


# The google.rpc.Code numbers equal grpc.StatusCode's; checked once here so a
# mismatch cannot go unnoticed.
assert _BY_NUMBER[code_pb2.FAILED_PRECONDITION] == grpc.StatusCode.FAILED_PRECONDITION

__all__ = [
    "ERROR_DOMAIN",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "TurnlogError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_class",
    "error_from_detail",
    "error_from_rpc",
]
