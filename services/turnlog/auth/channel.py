"""A client channel that sends a credential with every call.

gRPC's own call credentials are only sent over TLS channels; a local
service on loopback (`make serve`) is plain text. `credentialed_channel`
adds the credential as call metadata through client interceptors instead,
over either kind of channel. Tests, benchmarks and local tools use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying `token` (a JWT or an API key)."""
    return (("authorization", f"Bearer {token}"),)


if TYPE_CHECKING:
    _UU = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _US = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _SU = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _SS = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UU = grpc.aio.UnaryUnaryClientInterceptor
    _US = grpc.aio.UnaryStreamClientInterceptor
    _SU = grpc.aio.StreamUnaryClientInterceptor
    _SS = grpc.aio.StreamStreamClientInterceptor


class _AddMetadata:
    """Adds fixed metadata to a call's details."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _details(self, details: Any) -> Any:
        extra = grpc.aio.Metadata(*self._metadata)
        for key, value in details.metadata or ():
            extra.add(key, value)
        return details._replace(metadata=extra)


# grpc.aio files each interceptor under the first call kind it is an instance
# of, so each kind needs an object of its own.
class _UnaryUnary(_AddMetadata, _UU):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_AddMetadata, _US):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_AddMetadata, _SU):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_AddMetadata, _SS):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def credentialed_channel(
    target: str,
    token: str | None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to `target` sending `token` as a bearer credential on every call.

    Args:
        target: host:port.
        token: a JWT or API key; None sends none (mTLS identities, tests of refusals).
        credentials: TLS channel credentials; None for a plain-text channel.
        options: channel options.
    """
    interceptors: list[Any] = []
    if token is not None:
        metadata = bearer_metadata(token)
        kinds = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
        interceptors = [kind(metadata) for kind in kinds]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


__all__ = ["bearer_metadata", "credentialed_channel"]
