"""The local default: a signing key in the data folder, and tokens it signs.

`turnlog serve` on a loopback address needs no identity provider: it keeps
an Ed25519 key in `<data_dir>/auth/` and accepts the tokens that key signs
(issuer `turnlog-local`, audience `turnlog`); `turnlog token` mints them.

    <data_dir>/auth/            mode 0700
        signing-key.pem         the private key (PKCS#8 PEM), mode 0600
        jwks.json               its public JWKS, for anyone verifying elsewhere

The key is made once: a process creating it writes a private temporary file
and links it into place only if no key exists, so two processes starting
together end up with the same key. A key file that others can read is
refused (as ssh refuses one): treat that key as leaked, delete it, and a
fresh one is made.

The key id (`kid`) is the key's RFC 7638 JWK thumbprint, so it names the
key material itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from turnlog.auth.jwks import JwkSet, jwk_thumbprint
from turnlog.auth.principal import DEFAULT_TENANT, Scope, format_scopes, is_valid_name

#: The `iss` of locally signed tokens.
LOCAL_ISSUER = "turnlog-local"
#: The `aud` of locally signed tokens (and the default audience of the service).
LOCAL_AUDIENCE = "turnlog"
#: The JWS algorithm of the local key (Ed25519).
LOCAL_ALGORITHM = "EdDSA"
#: The folder under the data folder, and the files in it.
AUTH_FOLDER = "auth"
KEY_FILE = "signing-key.pem"
JWKS_FILE = "jwks.json"


class LocalSigningKey:
    """The data folder's Ed25519 key: signs tokens, and publishes its JWKS."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        """Wrap a key; `load_or_create` is how the service gets its own."""
        self._private_key = private_key
        public_jwk: dict[str, Any] = OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        self.kid = jwk_thumbprint(public_jwk)
        #: The public key as a JWK, with its `kid`, `alg` and `use`.
        self.public_jwk: dict[str, Any] = {
            **public_jwk,
            "kid": self.kid,
            "alg": LOCAL_ALGORITHM,
            "use": "sig",
        }

    @classmethod
    def load_or_create(cls, data_dir: Path) -> LocalSigningKey:
        """The key of `data_dir`, made (with its folder) on first use.

        Also (re)writes `jwks.json` next to it when that is missing or stale.

        Raises:
            PermissionError: the key file is readable or writable by others.
            ValueError: the key file holds no Ed25519 private key.
            OSError: the folder or files cannot be made or read.
        """
        folder = data_dir / AUTH_FOLDER
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(folder.stat().st_mode) & 0o077:
            folder.chmod(0o700)
        key_path = folder / KEY_FILE
        if not key_path.exists():
            _create_key_file(key_path)
        key = cls(_read_key_file(key_path))
        key._publish(folder / JWKS_FILE)
        return key

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document (`{"keys": [...]}`)."""
        return {"keys": [dict(self.public_jwk)]}

    def jwk_set(self) -> JwkSet:
        """The public key, parsed for a verifier (`jwks.StaticJwks(key.jwk_set())`)."""
        return JwkSet.from_document(self.jwks(), origin="the local signing key")

    def sign(self, claims: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None) -> str:
        """A JWT with exactly `claims`, signed by this key (its `kid` in the header).

        For tests that need tokens a verifier must refuse (expired, another
        audience, no tenant); `mint_token` makes the tokens the service accepts.
        """
        return jwt.encode(
            dict(claims),
            self._private_key,
            algorithm=LOCAL_ALGORITHM,
            headers={"kid": self.kid, **(headers or {})},
        )

    def mint_token(
        self,
        tenant: str = DEFAULT_TENANT,
        scopes: Iterable[Scope] = (Scope.READ, Scope.WRITE),
        *,
        subject: str,
        ttl_s: float,
        now: float | None = None,
    ) -> str:
        """A token for `tenant` with `scopes`, valid for `ttl_s` seconds from `now`.

        Raises:
            ValueError: the tenant or subject is not a valid name, or `ttl_s` is not positive.
        """
        if not is_valid_name(tenant) or not is_valid_name(subject):
            raise ValueError("tenant and subject must be 1 to 256 printable characters, no spaces")
        if not ttl_s > 0:
            raise ValueError("a token's lifetime must be positive")
        issued_at = int(time.time() if now is None else now)
        return self.sign(
            {
                "iss": LOCAL_ISSUER,
                "aud": LOCAL_AUDIENCE,
                "sub": subject,
                "tenant": tenant,
                "scope": format_scopes(scopes),
                "iat": issued_at,
                "exp": issued_at + max(1, int(ttl_s)),
                "jti": secrets.token_urlsafe(16),
            }
        )

    def _publish(self, path: Path) -> None:
        text = json.dumps(self.jwks(), indent=2, sort_keys=True) + "\n"
        with contextlib.suppress(FileNotFoundError):
            if path.read_text(encoding="utf-8") == text:
                return
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        try:
            temporary.write_text(text, encoding="utf-8")
            temporary.chmod(0o644)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def _create_key_file(path: Path) -> None:
    """Write a new key to `path` unless one appears there first (another process)."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        # link() never replaces an existing file, unlike rename().
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_key_file(path: Path) -> Ed25519PrivateKey:
    descriptor = os.open(path, os.O_RDONLY)
    with os.fdopen(descriptor, "rb") as file:
        if stat.S_IMODE(os.fstat(file.fileno()).st_mode) & 0o077:
            raise PermissionError(
                f"{path} is accessible by other users; delete it to make a new key"
            )
        pem = file.read()
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key
