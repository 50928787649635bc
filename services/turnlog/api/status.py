"""The conversation service's errors on the wire.

Codes and ErrorInfo come from the one table in `turnlog.grpc_errors`; this
module adds what only this API sends: a `google.rpc.BadRequest` with one
field violation per invalid request field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from turnlog import errors, grpc_errors

log = logging.getLogger(__name__)


class FieldViolationsError(errors.InvalidArgumentError):
    """Request fields failed validation; carries one violation per field."""

    reason = "INVALID_REQUEST"

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        super().__init__(
            "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations),
            metadata={"fields": ",".join(f for f, _ in violations)},
        )
        self.violations = tuple(violations)


def to_status(error: BaseException) -> grpc.Status:
    """The gRPC status (with details) for any error raised by a handler."""
    if not isinstance(error, errors.TurnlogError):
        log.error("internal error in a request handler", exc_info=error)
    extra = []
    if isinstance(error, FieldViolationsError):
        extra.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in error.violations
                ]
            )
        )
    return rpc_status.to_status(grpc_errors.status_of(error, extra))
