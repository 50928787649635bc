"""How the client proves who it is and secures its channel.

Three shapes, as the service accepts them (docs/security.md, docs/tls.md):

- a bearer token (a JWT or an API key) sent as `authorization: Bearer ...`
  call metadata on every call;
- TLS with the service's root certificates, optionally with a client
  certificate and key (mTLS, where the certificate is the identity);
- plain text, which the client only allows to a loopback address (`make
  serve`) unless told `allow_insecure=True`: a token sent in plain text
  beyond loopback could be read on the way.

The token goes in per-call metadata rather than gRPC call credentials
because gRPC only sends call credentials over TLS channels.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """What the client sends and trusts.

    Attributes:
        token: a JWT or API key sent with every call; None sends none
            (mTLS identities).
        tls: use TLS (implied by any certificate below).
        root_certificates: PEM of the CAs trusted for the service's
            certificate; None: the system's.
        certificate_chain: PEM of the client certificate (mTLS).
        private_key: PEM of its private key.
        allow_insecure: allow plain text beyond loopback.
    """

    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    allow_insecure: bool = False

    @classmethod
    def from_files(
        cls,
        *,
        token: str | None = None,
        ca: Path | str | None = None,
        cert: Path | str | None = None,
        key: Path | str | None = None,
    ) -> Credentials:
        """TLS credentials from PEM files (any of them); `cert` and `key` go together (mTLS)."""
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

        def read(path: Path | str | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(
            token=token,
            tls=True,
            root_certificates=read(ca),
            certificate_chain=read(cert),
            private_key=read(key),
        )

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(
            v is not None for v in (self.root_certificates, self.certificate_chain)
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries (the bearer token, if any)."""
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel to `target` ("host:port") secured as these credentials say.

        Raises:
            ValueError: plain text to an address that is not loopback without
                `allow_insecure`.
        """
        if self.uses_tls:
            secure = grpc.ssl_channel_credentials(
                root_certificates=self.root_certificates,
                private_key=self.private_key,
                certificate_chain=self.certificate_chain,
            )
            return grpc.aio.secure_channel(target, secure, options=options)
        if not (self.allow_insecure or is_loopback_target(target)):
            raise ValueError(
                f"refusing plain text to {target!r}, which is not loopback: "
                "use TLS (Credentials.from_files) or allow_insecure=True"
            )
        return grpc.aio.insecure_channel(target, options=options)


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target ("host:port", "[::1]:port", "unix:...") stays on this machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.split("://", 1)[-1]
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["Credentials", "is_loopback_target"]
