"""Short-lived certificates for loopback mTLS: a throwaway CA and what it issues.

`turnlog serve --spawn-worker` uses this to secure the connection to its own
child worker without any setup: a CA made for one run signs a server
certificate for 127.0.0.1/localhost and a client certificate, and the CA's
key is dropped once they are issued, so it can sign nothing else. Tests use
it to make the certificates they need.

This is not a way to run a PKI: production certificates come from a real CA
(an organisation's CA, cert-manager, Vault...); see docs/tls.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: How long issued certificates are valid by default: a process's lifetime, with room.
DEFAULT_VALIDITY = datetime.timedelta(days=30)
#: Backdating of not-before, so that a peer whose clock is a little behind accepts them.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate and its private key, both PEM.

    `key_pem` is secret: write it with `write_private` (mode 0600), never log it.
    """

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate (serial number, subject, ...)."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (0644) and the key (0600, created so: never readable by others)."""
        cert_path.write_bytes(self.cert_pem)
        write_private(key_path, self.key_pem)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class CertificateAuthority:
    """A CA made on the spot; it issues server and client certificates.

    Its key lives only in this object: drop the object and nothing more can
    be signed.
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        validity: datetime.timedelta,
    ) -> None:
        self._key = key
        self._cert = cert
        self._validity = validity
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(
        cls, common_name: str, *, validity: datetime.timedelta = DEFAULT_VALIDITY
    ) -> CertificateAuthority:
        """A new self-signed CA named `common_name`, valid for `validity` from now."""
        key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, validity)

    def _issue(
        self,
        common_name: str,
        usage: x509.ObjectIdentifier,
        hosts: Sequence[str],
    ) -> IssuedCertificate:
        key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + self._validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def issue_server(self, common_name: str, *, hosts: Sequence[str]) -> IssuedCertificate:
        """A server certificate for `hosts` (IP addresses or DNS names), for TLS servers."""
        if not hosts:
            raise ValueError("a server certificate needs at least one host name or address")
        return self._issue(common_name, ExtendedKeyUsageOID.SERVER_AUTH, hosts)

    def issue_client(self, common_name: str) -> IssuedCertificate:
        """A client certificate named `common_name`, for mTLS clients."""
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, ())


def write_private(path: Path, data: bytes) -> None:
    """Write key material to a new file created with mode 0600 (no window where others can read).

    An existing file at `path` is replaced by a new one (rename), never reopened.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
