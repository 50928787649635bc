"""mTLS identities: certificate names mapped to tenants, from gRPC's auth context.

Most tests use auth-context dicts shaped as gRPC makes them; one runs a real
TLS handshake with a client certificate through grpc.aio, so that shape is
checked against gRPC itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from turnlog.auth.mtls import MtlsIdentities, MtlsIdentity
from turnlog.auth.principal import Scope
from turnlog.errors import CredentialExpiredError, CredentialInvalidError

BILLING = MtlsIdentity(
    name="billing.svc.example.com", tenant="acme", scopes=frozenset({Scope.READ, Scope.WRITE})
)
REPORTS = MtlsIdentity(name="reports", tenant="acme", scopes=frozenset({Scope.HISTORY}))
SPIFFE = MtlsIdentity(
    name="spiffe://example.com/billing", tenant="acme", scopes=frozenset({Scope.ADMIN})
)


def context(
    *, common_name: str | None = None, sans: Sequence[str] = (), pem: bytes | None = None
) -> dict[str, list[bytes]]:
    """An auth context as grpc.aio gives it for a TLS call with a verified client certificate."""
    found: dict[str, list[bytes]] = {"transport_security_type": [b"ssl"]}
    if common_name is not None:
        found["x509_common_name"] = [common_name.encode()]
    if sans:
        found["x509_subject_alternative_name"] = [san.encode() for san in sans]
    if pem is not None:
        found["x509_pem_cert"] = [pem]
    return found


def test_a_configured_san_maps_to_its_tenant_and_scopes() -> None:
    identities = MtlsIdentities([BILLING, REPORTS])

    principal = identities.verify(context(common_name="billing", sans=[BILLING.name]))

    assert principal is not None
    assert (principal.tenant, principal.subject, principal.scopes) == (
        "acme",
        BILLING.name,
        BILLING.scopes,
    )
    assert (principal.method, principal.key_id) == ("mtls", BILLING.name)


def test_the_common_name_counts_only_when_no_san_is_configured() -> None:
    identities = MtlsIdentities([BILLING, REPORTS])

    by_cn = identities.verify(context(common_name="reports", sans=["unconfigured.example.com"]))
    by_san = identities.verify(context(common_name="reports", sans=[BILLING.name]))

    assert by_cn is not None
    assert by_cn.subject == "reports"
    assert by_san is not None
    assert by_san.subject == BILLING.name


def test_a_certificate_whose_names_are_not_configured_is_refused() -> None:
    identities = MtlsIdentities([BILLING])

    with pytest.raises(CredentialInvalidError, match="not mapped"):
        identities.verify(context(common_name="intruder", sans=["intruder.example.com"]))


def test_configured_sans_that_disagree_refuse_the_certificate() -> None:
    identities = MtlsIdentities([BILLING, SPIFFE])

    with pytest.raises(CredentialInvalidError, match="different"):
        identities.verify(context(sans=[BILLING.name, SPIFFE.name]))


@pytest.mark.parametrize(
    "auth_context",
    [
        {},
        {"transport_security_type": [b"insecure"], "x509_common_name": [b"reports"]},
        {"transport_security_type": [b"ssl"]},
    ],
    ids=["plaintext", "not-tls", "tls-without-client-certificate"],
)
def test_no_verified_client_certificate_means_no_identity(
    auth_context: Mapping[str, Sequence[bytes]],
) -> None:
    assert MtlsIdentities([REPORTS]).verify(auth_context) is None


def test_a_name_configured_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        MtlsIdentities([REPORTS, REPORTS])


@dataclass
class Pki:
    ca_pem: bytes
    server_key: bytes
    server_cert: bytes
    client_key: bytes
    client_cert: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: x509.Name | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    sans: Sequence[x509.GeneralName] = (),
    ca: bool = False,
    not_after: datetime.datetime | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(not_after or now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pki() -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("turnlog test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "localhost",
        server_key,
        issuer=ca.subject,
        issuer_key=ca_key,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(
        "billing",
        client_key,
        issuer=ca.subject,
        issuer_key=ca_key,
        sans=[
            x509.DNSName(BILLING.name),
            x509.UniformResourceIdentifier("spiffe://example.com/billing"),
        ],
    )
    pem = serialization.Encoding.PEM
    return Pki(
        ca_pem=ca.public_bytes(pem),
        server_key=_key_pem(server_key),
        server_cert=server.public_bytes(pem),
        client_key=_key_pem(client_key),
        client_cert=client.public_bytes(pem),
    )


async def test_a_real_tls_handshake_yields_the_identity_of_the_client_certificate() -> None:
    pki = _pki()
    seen: list[Mapping[str, Iterable[bytes]]] = []

    async def call(
        request: bytes, servicer_context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        seen.append(servicer_context.auth_context())
        return b""

    handler = grpc.method_handlers_generic_handler(
        "turnlog.test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key, pki.server_cert)],
        root_certificates=pki.ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_pem,
            private_key=pki.client_key,
            certificate_chain=pki.client_cert,
        )
        async with grpc.aio.secure_channel(f"localhost:{port}", channel_credentials) as channel:
            call_echo = channel.unary_unary("/turnlog.test.Echo/Call", None, None)
            await call_echo(b"", timeout=30)
    finally:
        await server.stop(grace=None)

    assert len(seen) == 1
    principal = MtlsIdentities([BILLING, REPORTS]).verify(seen[0])
    assert principal is not None
    assert (principal.tenant, principal.subject) == ("acme", BILLING.name)
    # The certificate's notAfter, a day from now, bounds the principal.
    assert principal.expires_at is not None
    assert time.time() < principal.expires_at < time.time() + 2 * 86400


def test_an_expired_certificate_is_refused_and_ends_its_principal() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    pem = _certificate("reports", key, not_after=soon).public_bytes(serialization.Encoding.PEM)
    clock = [time.time()]
    identities = MtlsIdentities([REPORTS], clock=lambda: clock[0])
    principal = identities.verify(context(common_name="reports", pem=pem))
    assert principal is not None
    identities.still_valid(principal)

    clock[0] += 2 * 3600

    with pytest.raises(CredentialExpiredError):
        identities.still_valid(principal)
    with pytest.raises(CredentialExpiredError):
        identities.verify(context(common_name="reports", pem=pem))


def test_an_unmapped_name_fails_still_valid() -> None:
    principal = MtlsIdentities([REPORTS]).verify(context(common_name="reports"))
    assert principal is not None

    with pytest.raises(CredentialInvalidError, match="no longer mapped"):
        MtlsIdentities([BILLING]).still_valid(principal)
    narrowed = MtlsIdentity(name="reports", tenant="acme", scopes=frozenset())
    with pytest.raises(CredentialInvalidError, match="scopes"):
        MtlsIdentities([narrowed]).still_valid(principal)
