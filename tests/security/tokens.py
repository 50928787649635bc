"""Test keys and tokens: any issuer, audience, lifetime, algorithm or signing key.

For test matrices of authentication (the gRPC interceptor's included):

    key = SigningKey.ed25519()                      # or .rsa(), .ec()
    source = StaticJwks(JwkSet.from_document(jwks_document(key), origin="test"))
    verifier = JwtVerifier(source, issuer=ISSUER, audience=AUDIENCE, algorithms=["EdDSA"])
    token = mint(key)                               # accepted
    token = mint(key, exp=time.time() - 3600)       # expired
    token = mint(key, iss="https://other.test/")    # wrong issuer
    token = mint(key, tenant=None)                  # no tenant claim (None removes a claim)
    token = mint(other_key, kid=key.kid)            # bad signature

For the local default, `AuthSettings.local_default(tmp_path)` builds the
settings, and `LocalSigningKey.mint_token` (accepted tokens) and
`LocalSigningKey.sign(claims)` (any claims) sign with the data folder's key
(`Authenticator(settings).local_key`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from turnlog.auth.jwks import jwk_thumbprint

ISSUER = "https://idp.test/"
AUDIENCE = "turnlog"
TENANT = "acme"
SUBJECT = "alice"

#: Marks "leave this to the default" where None means "remove".
_DEFAULT: Any = object()


@dataclass(frozen=True)
class SigningKey:
    """A private key, its JWS algorithm and its key id (the RFC 7638 thumbprint by default)."""

    private_key: Any
    algorithm: str
    kid: str = field(default="")
    #: Whether the published JWK names its `alg` (False: the verifier infers it).
    publish_alg: bool = True

    def __post_init__(self) -> None:
        if not self.kid:
            object.__setattr__(self, "kid", jwk_thumbprint(self._bare_public_jwk()))

    @classmethod
    def ed25519(cls, kid: str = "") -> SigningKey:
        return cls(ed25519.Ed25519PrivateKey.generate(), "EdDSA", kid)

    @classmethod
    def rsa(
        cls, kid: str = "", *, bits: int = 2048, algorithm: str = "RS256", publish_alg: bool = True
    ) -> SigningKey:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return cls(private_key, algorithm, kid, publish_alg)

    @classmethod
    def ec(cls, kid: str = "") -> SigningKey:
        return cls(ec.generate_private_key(ec.SECP256R1()), "ES256", kid)

    def _bare_public_jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            return OKPAlgorithm.to_jwk(public, as_dict=True)
        if isinstance(public, rsa.RSAPublicKey):
            return RSAAlgorithm.to_jwk(public, as_dict=True)
        return ECAlgorithm.to_jwk(public, as_dict=True)

    def public_jwk(self) -> dict[str, Any]:
        """The public key as published in a JWKS."""
        jwk = {**self._bare_public_jwk(), "kid": self.kid, "use": "sig"}
        if self.publish_alg:
            jwk["alg"] = self.algorithm
        return jwk

    def public_pem(self) -> bytes:
        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def jwks_document(*keys: SigningKey) -> dict[str, Any]:
    """A JWKS publishing `keys`."""
    return {"keys": [key.public_jwk() for key in keys]}


def claims(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Claims that a verifier for ISSUER and AUDIENCE accepts, with `overrides`.

    An override of None removes that claim. Defaults: tenant TENANT, sub
    SUBJECT, scope "read write", iat now, exp in five minutes.
    """
    now = time.time() if now is None else now
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "tenant": TENANT,
        "scope": "read write",
        "iat": int(now),
        "exp": int(now) + 300,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(
    payload: Mapping[str, Any],
    key: SigningKey,
    *,
    algorithm: str | None = None,
    kid: str | None = _DEFAULT,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """`payload` signed by `key` (its algorithm and kid unless given; kid=None leaves it out)."""
    header: dict[str, Any] = dict(headers or {})
    if kid is _DEFAULT:
        header["kid"] = key.kid
    elif kid is not None:
        header["kid"] = kid
    return jwt.encode(
        dict(payload), key.private_key, algorithm=algorithm or key.algorithm, headers=header
    )


def mint(key: SigningKey, *, kid: str | None = _DEFAULT, **overrides: Any) -> str:
    """A token signed by `key` with `claims(**overrides)`."""
    return sign(claims(**overrides), key, kid=kid)


def unsigned(payload: Mapping[str, Any], *, kid: str) -> str:
    """An `alg: none` token (no signature)."""
    return _compact({"alg": "none", "typ": "JWT", "kid": kid}, payload, b"")


def hmac_with_public_key(payload: Mapping[str, Any], key: SigningKey) -> str:
    """The algorithm-confusion attack: HS256 keyed with the public key's PEM text."""
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = _signing_input(header, payload)
    signature = hmac.new(key.public_pem(), signing_input, hashlib.sha256).digest()
    return signing_input.decode("ascii") + "." + _b64(signature)


def _compact(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes) -> str:
    return _signing_input(header, payload).decode("ascii") + "." + _b64(signature)


def _signing_input(header: Mapping[str, Any], payload: Mapping[str, Any]) -> bytes:
    encoded = (_b64(json.dumps(part).encode("utf-8")) for part in (header, payload))
    return ".".join(encoded).encode("ascii")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class FakeClock:
    """A clock that moves only when told to (`advance`)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
