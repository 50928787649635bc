"""What `turnlog serve` accepts as a caller, and how its port is secured: decided once at start.

- Authentication comes from the `[auth]` table of the config file when one
  is given. With none, on a loopback address, the data folder's local
  signing key is used and a ready token is printed (as Jupyter prints its
  token); on any other address the service refuses to start, unless told
  `--insecure`, which turns authentication off and says so loudly.
- The public port is TLS when a certificate is given (mTLS with a client CA),
  plain text otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from turnlog.api.authentication import Authenticates, InsecureAuthenticator
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.principal import DEFAULT_TENANT, Scope
from turnlog.auth.settings import AuthSettings
from turnlog.config import Settings
from turnlog.loopback import is_loopback_address
from turnlog.tls import TlsFiles, server_credentials

log = logging.getLogger(__name__)

#: The scopes of the token `turnlog serve` prints (everything but `admin`).
LOCAL_TOKEN_SCOPES = (Scope.READ, Scope.WRITE, Scope.HISTORY, Scope.IMPORT)
#: How long the printed token is valid; `turnlog token` mints more.
LOCAL_TOKEN_TTL_S = 24 * 3600.0


class SecurityConfigError(ValueError):
    """The settings would serve insecurely, or contradict each other; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class PublicSecurity:
    """The authenticator and port credentials `turnlog serve` uses.

    Attributes:
        authenticator: verifies every call's credential.
        port_credentials: TLS credentials of the public port; None: plain text.
        local_token: a token to print for the local default tenant, or None.
    """

    authenticator: Authenticates
    port_credentials: grpc.ServerCredentials | None
    local_token: str | None


def public_security(settings: Settings, address: str) -> PublicSecurity:
    """Decides authentication and TLS for serving on `address`.

    Raises:
        SecurityConfigError: no authentication on a non-loopback address
            (without `insecure`), or TLS settings that do not fit together.
        OSError, ValueError: a configured file cannot be read.
    """
    port_credentials = None
    if settings.tls_cert is not None or settings.tls_key is not None:
        if settings.tls_cert is None or settings.tls_key is None:
            raise SecurityConfigError("TLS needs both a certificate and its key")
        port_credentials = server_credentials(
            TlsFiles(cert=settings.tls_cert, key=settings.tls_key, ca=settings.tls_client_ca),
            require_client_cert=settings.tls_client_ca is not None,
        )
    elif settings.tls_client_ca is not None:
        raise SecurityConfigError("a client CA (mTLS) needs the port's own certificate and key")
    if settings.insecure:
        log.warning(
            "AUTHENTICATION IS OFF (--insecure): every caller on %s acts as tenant %r "
            "with every scope but admin",
            address,
            DEFAULT_TENANT,
        )
        return PublicSecurity(InsecureAuthenticator(), port_credentials, None)
    if settings.config_file is not None:
        auth = AuthSettings.from_toml_file(settings.config_file, data_dir=settings.data_dir)
    elif is_loopback_address(address):
        auth = AuthSettings.local_default(settings.data_dir)
    else:
        raise SecurityConfigError(
            f"refusing to serve {address} without authentication: configure [auth] in a "
            "config file (--config, docs/security.md), or pass --insecure"
        )
    if not auth.enabled:
        raise SecurityConfigError("the [auth] table turns no credential on")
    if auth.mtls and settings.tls_client_ca is None:
        raise SecurityConfigError("[auth] mtls identities need --tls-client-ca")
    if port_credentials is None and not is_loopback_address(address):
        log.warning("serving %s in plain text: credentials cross the network unencrypted", address)
    authenticator = Authenticator(auth)
    token = None
    if authenticator.local_key is not None:
        token = authenticator.local_key.mint_token(
            DEFAULT_TENANT, LOCAL_TOKEN_SCOPES, subject="local", ttl_s=LOCAL_TOKEN_TTL_S
        )
    return PublicSecurity(authenticator, port_credentials, token)


__all__ = ["PublicSecurity", "SecurityConfigError", "public_security"]
