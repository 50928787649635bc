"""The SDK's parts that need no service: credentials, the retry policy, status details."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from turnlog.v1 import errors_pb2
from turnlog_client import (
    Credentials,
    InvalidArgument,
    ResourceExhausted,
    RetryPolicy,
    TurnlogError,
    Unavailable,
)
from turnlog_client.credentials import is_loopback_target
from turnlog_client.errors import error_from_detail, error_from_rpc


class _FailedCall(grpc.RpcError):
    """What grpcio raises: a code, details and trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str, status: status_pb2.Status | None
    ) -> None:
        self._code = code
        self._details = details
        self._trailers = (
            () if status is None else (("grpc-status-details-bin", status.SerializeToString()),)
        )

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers


def _packed(*details: object) -> list[any_pb2.Any]:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return packed


def test_a_status_becomes_its_class_with_reason_metadata_and_violations() -> None:
    status = status_pb2.Status(
        code=3,
        message="the request is invalid",
        details=_packed(
            error_details_pb2.ErrorInfo(
                reason="INVALID_REQUEST", domain="turnlog.dev", metadata={"retryable": "false"}
            ),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="page_size", description="<0")
                ]
            ),
        ),
    )
    error = error_from_rpc(_FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "x", status))
    assert isinstance(error, InvalidArgument)
    assert error.reason == "INVALID_REQUEST"
    assert not error.retryable
    assert [(v.field, v.description) for v in error.field_violations] == [("page_size", "<0")]
    assert str(error) == "INVALID_ARGUMENT INVALID_REQUEST: the request is invalid"
    assert error.error_reason == errors_pb2.INVALID_REQUEST
    assert TurnlogError("x", reason="FROM_A_NEWER_SERVICE").error_reason == 0


def test_retry_info_and_retry_after_set_the_wait() -> None:
    status = status_pb2.Status(
        code=8,
        details=_packed(
            error_details_pb2.ErrorInfo(reason="TENANT_LIMIT_EXCEEDED"),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=250_000_000)),
        ),
    )
    error = error_from_rpc(_FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", status))
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after_s == 0.25
    assert error.retryable  # a delay was given
    assert RetryPolicy(initial_backoff_s=0.01).backoff_s(1, error) >= 0.25
    # Without RetryInfo, RESOURCE_EXHAUSTED (a message too large ...) is final.
    bare = error_from_rpc(_FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big", None))
    assert not bare.retryable


def test_a_transport_failure_is_unavailable_and_retryable() -> None:
    error = error_from_rpc(_FailedCall(grpc.StatusCode.UNAVAILABLE, "connection refused", None))
    assert isinstance(error, Unavailable)
    assert error.retryable
    assert error.reason == ""


def test_an_error_as_data_becomes_the_same_class() -> None:
    detail = errors_pb2.ErrorDetail(
        code=9, reason="TURN_IN_PROGRESS", message="busy", retryable=True, phase="start"
    )
    error = error_from_detail(detail)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.retryable
    assert error.metadata["phase"] == "start"


def test_backoff_grows_with_jitter_within_its_bounds() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2, max_backoff_s=1.0)
    for retry, bound in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        waits = [policy.backoff_s(retry) for _ in range(200)]
        assert all(0 <= w <= bound for w in waits)
        assert max(waits) > bound / 2  # jittered, not always the minimum
    retryable = TurnlogError("down", code=grpc.StatusCode.UNAVAILABLE)
    assert policy.should_retry(retryable, attempt=1, elapsed_s=0)
    assert not policy.should_retry(retryable, attempt=policy.max_attempts, elapsed_s=0)
    assert not policy.should_retry(retryable, attempt=1, elapsed_s=policy.deadline_s)
    final = TurnlogError("no", code=grpc.StatusCode.NOT_FOUND)
    assert not policy.should_retry(final, attempt=1, elapsed_s=0)


def test_plain_text_is_refused_beyond_loopback() -> None:
    assert is_loopback_target("127.0.0.1:50051")
    assert is_loopback_target("localhost:1")
    assert is_loopback_target("[::1]:50051")
    assert is_loopback_target("unix:/tmp/s")
    assert not is_loopback_target("10.0.0.2:50051")
    assert not is_loopback_target("turnlog.example:443")
    with pytest.raises(ValueError, match="plain text"):
        Credentials(token="t").channel("turnlog.example:443")
    assert Credentials(token="t").call_metadata() == (("authorization", "Bearer t"),)
    with pytest.raises(ValueError, match="needs its key"):
        Credentials.from_files(cert="c.pem")
