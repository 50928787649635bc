"""gRPC credentials from certificate files, read again when the files change.

Servers (`turnlog serve`'s public port, `turnlog worker`) take a `TlsFiles`:
`server_credentials` checks the files at most once per `check_interval_s`
when a client connects, by their size, mtime and inode only, and re-reads
them when they changed. A new pair that does not load (half-written, key
not matching the certificate, not PEM) is logged at WARNING, by path, and
the certificate in use stays until the files are fixed. Connections already
open keep the certificate they were made with; new ones get the new one.
No restart is needed.

Clients (the service towards its workers, tests towards the service) take
channel credentials. `channel_credentials` reads the files once;
`ReloadingChannelCredentials` re-reads them when they changed, and
`turnlog.worker.client.EngineClient` asks it again each time it reconnects
to a worker whose stream failed, so a rotated client certificate is used
from the next connection on (gRPC's Python API cannot swap the
credentials of an open channel).

Key material is never logged: messages name files, subjects, serial numbers
and expiry dates only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

log = logging.getLogger(__name__)

#: How often, at most, the files are looked at (on a new connection), in seconds.
RELOAD_CHECK_INTERVAL_S = 1.0


class TlsFilesError(ValueError):
    """Certificate files that cannot be used: missing, unreadable, not PEM, or not a pair.

    The message names the file and the problem, never its content.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    """A server's certificate files.

    Attributes:
        cert: PEM certificate chain, the server's own certificate first.
        key: PEM private key of that certificate (unencrypted; keep it 0600).
        ca: PEM bundle of the CA certificates that client certificates must
            chain to (needed with `require_client_cert`, unused without).
    """

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True, slots=True)
class _Material:
    """PEM bytes that were checked to load, and a summary that is safe to log."""

    cert_chain: bytes | None
    key: bytes | None
    ca: bytes | None
    summary: str


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsFilesError(f"cannot read the {what} {path}: {e.strerror}") from None


def _certificates(path: Path, what: str) -> tuple[bytes, list[x509.Certificate]]:
    data = _read(path, what)
    try:
        return data, x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFilesError(f"the {what} {path} holds no PEM certificate") from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load(*, cert: Path | None, key: Path | None, ca: Path | None) -> _Material:
    """Read and check the files; raises TlsFilesError (message without key material)."""
    chain_pem = key_pem = ca_pem = None
    summary = ""
    if cert is not None and key is not None:
        chain_pem, chain = _certificates(cert, "certificate chain")
        key_pem = _read(key, "private key")
        try:
            private_key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise TlsFilesError(
                f"the private key {key} is not an unencrypted PEM private key"
            ) from None
        leaf = chain[0]
        if _spki(private_key.public_key()) != _spki(leaf.public_key()):
            raise TlsFilesError(f"the private key {key} does not belong to the certificate {cert}")
        summary = (
            f"certificate {leaf.subject.rfc4514_string()} serial {leaf.serial_number:x} "
            f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if ca is not None:
        ca_pem, _ = _certificates(ca, "CA bundle")
        summary = f"{summary}, CA bundle {ca}" if summary else f"CA bundle {ca}"
    return _Material(chain_pem, key_pem, ca_pem, summary)


_Stamp = tuple[tuple[int, int, int] | None, ...]


class _WatchedFiles:
    """Certificate files, loaded again when their stamp (mtime, size, inode) changes.

    `poll` looks at the files at most once per interval and is safe to call
    from any thread (gRPC calls server fetchers on its own threads).
    """

    def __init__(
        self,
        *,
        cert: Path | None,
        key: Path | None,
        ca: Path | None,
        check_interval_s: float,
        role: str,
    ) -> None:
        self._cert, self._key, self._ca = cert, key, ca
        self._paths = [p for p in (cert, key, ca) if p is not None]
        self._interval = check_interval_s
        self._role = role
        self._lock = threading.Lock()
        self._loaded_stamp = self._stamp()
        # Fails loudly at start: a server must not come up without its certificate.
        self.material = self._load()
        self._rejected_stamp: _Stamp | None = None
        self._next_check = time.monotonic() + check_interval_s
        log.info("%s TLS: %s", role, self.material.summary)

    def _stamp(self) -> _Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _load(self) -> _Material:
        return _load(cert=self._cert, key=self._key, ca=self._ca)

    def poll(self) -> _Material | None:
        """New material if the files changed and load; None if unchanged or not usable."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_check:
                return None
            self._next_check = now + self._interval
            stamp = self._stamp()
            if stamp in (self._loaded_stamp, self._rejected_stamp):
                return None
            try:
                material = self._load()
            except TlsFilesError as e:
                if self._stamp() != stamp:
                    return None  # still being written: look again next time
                self._rejected_stamp = stamp
                log.warning(
                    "%s TLS: the new certificate files do not load, keeping the ones in use: %s",
                    self._role,
                    e,
                )
                return None
            if self._stamp() != stamp:
                return None  # changed while being read: look again next time
            self._loaded_stamp = stamp
            self._rejected_stamp = None
            self.material = material
        log.info("%s TLS reloaded: %s", self._role, material.summary)
        return material


def _server_configuration(material: _Material) -> grpc.ServerCertificateConfiguration:
    assert material.key is not None
    assert material.cert_chain is not None
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert_chain)], root_certificates=material.ca
    )


def server_credentials(
    files: TlsFiles,
    *,
    require_client_cert: bool,
    check_interval_s: float = RELOAD_CHECK_INTERVAL_S,
) -> grpc.ServerCredentials:
    """Server credentials from `files`, re-read when they change (see the module doc).

    Args:
        files: the server's certificate chain and key, and with
            `require_client_cert` the CA bundle that client certificates
            must chain to.
        require_client_cert: mTLS: refuse a client that presents no
            certificate, or one that does not chain to `files.ca`.
        check_interval_s: look at the files at most this often (on new
            connections).

    Raises:
        TlsFilesError: the files do not load now.
        ValueError: `require_client_cert` without `files.ca`, or a CA bundle
            without it (gRPC would not ask for client certificates, so the
            bundle would give a false sense of checking).
    """
    if require_client_cert and files.ca is None:
        raise ValueError("requiring client certificates needs a CA bundle to verify them")
    if not require_client_cert and files.ca is not None:
        raise ValueError("a client CA bundle is only used when client certificates are required")
    watched = _WatchedFiles(
        cert=files.cert,
        key=files.key,
        ca=files.ca,
        check_interval_s=check_interval_s,
        role="server",
    )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # gRPC calls this before every TLS handshake; None keeps the current configuration.
        try:
            material = watched.poll()
        except Exception:
            log.warning("server TLS: checking the certificate files failed", exc_info=True)
            return None
        return None if material is None else _server_configuration(material)

    # grpc-stubs types the fetcher as never returning None; gRPC documents None as "no change".
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
    return grpc.dynamic_ssl_server_credentials(
        _server_configuration(watched.material),
        fetcher,
        require_client_authentication=require_client_cert,
    )


def _check_pair(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")


def _channel_credentials(material: _Material) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=material.key,
        certificate_chain=material.cert_chain,
    )


def channel_credentials(
    *, ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client credentials from files, read once (see `ReloadingChannelCredentials`).

    Args:
        ca: PEM bundle of the CA certificates the server's certificate must chain to.
        cert: the client's PEM certificate chain, for servers that require
            one (mTLS); with `key`.
        key: the client certificate's PEM private key.

    Raises:
        TlsFilesError: the files do not load.
        ValueError: only one of `cert` and `key`.
    """
    _check_pair(cert, key)
    return _channel_credentials(_load(cert=cert, key=key, ca=ca))


class ReloadingChannelCredentials:
    """Client credentials from files, read again when the files change.

    `current()` returns the same credentials object while the files are
    unchanged, and a new one once they changed and load (a new pair that
    does not load is logged and the old credentials stay). A channel keeps
    the credentials it was made with: `EngineClient` calls `current()` when
    it opens a new connection after a failed one.

    Args and Raises: as `channel_credentials`, plus `check_interval_s`: look
    at the files at most this often.
    """

    def __init__(
        self,
        *,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        check_interval_s: float = RELOAD_CHECK_INTERVAL_S,
    ) -> None:
        _check_pair(cert, key)
        self._watched = _WatchedFiles(
            cert=cert, key=key, ca=ca, check_interval_s=check_interval_s, role="client"
        )
        self._credentials = _channel_credentials(self._watched.material)

    def current(self) -> grpc.ChannelCredentials:
        """The credentials for a new connection."""
        material = self._watched.poll()
        if material is not None:
            self._credentials = _channel_credentials(material)
        return self._credentials


#: What a client connection may be secured with: credentials as they are, or
#: files re-read on reconnection. None (where accepted) means plaintext.
ChannelCredentialsSource = grpc.ChannelCredentials | ReloadingChannelCredentials


def current_channel_credentials(source: ChannelCredentialsSource) -> grpc.ChannelCredentials:
    """The credentials `source` gives a new connection now."""
    if isinstance(source, ReloadingChannelCredentials):
        return source.current()
    return source


__all__ = [
    "RELOAD_CHECK_INTERVAL_S",
    "ChannelCredentialsSource",
    "ReloadingChannelCredentials",
    "TlsFiles",
    "TlsFilesError",
    "channel_credentials",
    "current_channel_credentials",
    "server_credentials",
]
