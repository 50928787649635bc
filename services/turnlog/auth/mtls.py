"""Identities from verified client certificates (mutual TLS), mapped to tenants.

gRPC puts a client certificate's names into the call's auth context
(`ServicerContext.auth_context()`) only after the TLS handshake verified the
certificate against the server's trusted client CAs, and only when the
server asks for client certificates and verifies them
(`grpc.ssl_server_credentials(..., require_client_auth=True)`). So a name
there is proof enough; a name that is not configured proves nothing.

The auth context maps property names to lists of bytes:

    transport_security_type        [b"ssl"]
    x509_common_name               [b"billing"]
    x509_subject_alternative_name  [b"billing.svc.example.com", b"spiffe://example.com/billing"]
    x509_pem_cert                  [b"-----BEGIN CERTIFICATE-----..."]

Configured names are matched exactly (no wildcards, no case folding).
Subject alternative names are tried first, as RFC 6125 asks; the common
name only when no SAN is configured. If the configured SANs of one
certificate disagree on tenant or scopes, the certificate is refused rather
than one being picked.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509

from turnlog.auth.principal import Principal, Scope, is_valid_name
from turnlog.errors import CredentialExpiredError, CredentialInvalidError

_SECURITY_TYPE = "transport_security_type"
_COMMON_NAME = "x509_common_name"
_SAN = "x509_subject_alternative_name"
_PEM = "x509_pem_cert"


@dataclass(frozen=True, slots=True, kw_only=True)
class MtlsIdentity:
    """One configured certificate name and what it may do.

    Attributes:
        name: a certificate's common name or one of its subject alternative
            names (DNS name, URI such as a SPIFFE id, e-mail, IP address).
        tenant: the tenant a certificate with this name acts for.
        scopes: what it may do.
    """

    name: str
    tenant: str
    scopes: frozenset[Scope]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an mTLS identity needs a certificate name")
        if not is_valid_name(self.tenant):
            raise ValueError(f"mTLS identity {self.name!r}: the tenant is not a valid name")


class MtlsIdentities:
    """The configured certificate names: makes principals from auth contexts."""

    def __init__(
        self, identities: Iterable[MtlsIdentity], *, clock: Callable[[], float] = time.time
    ) -> None:
        """Map certificate names to tenants.

        Args:
            identities: the configured names.
            clock: Unix seconds, for certificate expiry.

        Raises:
            ValueError: a name is configured twice.
        """
        self._clock = clock
        self._by_name: dict[str, MtlsIdentity] = {}
        for identity in identities:
            if identity.name in self._by_name:
                raise ValueError(f"mTLS identity {identity.name!r} is configured twice")
            self._by_name[identity.name] = identity

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def verify(self, auth_context: Mapping[str, Iterable[bytes]]) -> Principal | None:
        """The principal of the call's client certificate, or None when it has none.

        Raises:
            CredentialInvalidError: the certificate's names are not configured,
                or its configured names disagree.
            CredentialExpiredError: the certificate has expired (a handshake
                would have refused it; this matters for re-checks of long
                streams, and guards a misconfigured server).
        """
        if list(auth_context.get(_SECURITY_TYPE, ())) != [b"ssl"]:
            return None
        sans = [_text(v) for v in auth_context.get(_SAN, ())]
        common_names = [_text(v) for v in auth_context.get(_COMMON_NAME, ())]
        if not sans and not common_names:
            return None
        matched = [self._by_name[n] for n in sans if n in self._by_name] or [
            self._by_name[n] for n in common_names if n in self._by_name
        ]
        if not matched:
            raise CredentialInvalidError("the client certificate is not mapped to a tenant")
        if len({(m.tenant, m.scopes) for m in matched}) > 1:
            raise CredentialInvalidError(
                "the client certificate's names are mapped to different tenants or scopes"
            )
        identity = matched[0]
        pem = list(auth_context.get(_PEM, ()))
        expires_at = _not_valid_after(bytes(pem[0])) if pem else None
        if expires_at is not None and expires_at <= self._clock():
            raise CredentialExpiredError("the client certificate has expired")
        return Principal(
            tenant=identity.tenant,
            subject=identity.name,
            scopes=identity.scopes,
            expires_at=expires_at,
            method="mtls",
            key_id=identity.name,
        )

    def still_valid(self, principal: Principal) -> None:
        """Check that an mTLS principal may still act: its name still maps the same way.

        Raises:
            CredentialExpiredError: the certificate has expired.
            CredentialInvalidError: its name is no longer mapped to that tenant
                with those scopes.
            ValueError: the principal did not come from a client certificate.
        """
        if principal.method != "mtls" or principal.key_id is None:
            raise ValueError("the principal was not verified by a client certificate")
        if principal.expires_at is not None and principal.expires_at <= self._clock():
            raise CredentialExpiredError("the client certificate has expired")
        identity = self._by_name.get(principal.key_id)
        if identity is None or identity.tenant != principal.tenant:
            raise CredentialInvalidError("the client certificate is no longer mapped")
        if not principal.scopes <= identity.scopes:
            raise CredentialInvalidError("the client certificate's scopes have changed")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@functools.lru_cache(maxsize=256)
def _not_valid_after(pem: bytes) -> float | None:
    """The certificate's notAfter in Unix seconds; None when it cannot be parsed."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return certificate.not_valid_after_utc.timestamp()
