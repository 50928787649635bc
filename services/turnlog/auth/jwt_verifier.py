"""Bearer JWTs (RFC 7519) verified against a JWKS, turned into a `Principal`.

What a token must have to verify:

- a signature by a key of the JWKS, named by the header's `kid`, with an
  algorithm from the configured list that fits that key's type (so a public
  key is never taken as an HMAC secret, and `none` never passes);
- `exp` (required), and `nbf` and `iat` when present, within `leeway_s` of
  now (at most 60 seconds);
- `iss` equal to the configured issuer and `aud` naming the configured
  audience;
- a `sub` and a tenant claim (`tenant` unless configured otherwise), both
  short printable strings.

Scopes come from `scope`/`scp` (see `principal.scopes_from_claims`).
Failures raise the `Credential*Error` classes of `turnlog.errors` with fixed
messages: nothing from the token, and nothing from PyJWT's own messages
(which may quote key material), reaches a client or a log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import jwt
from jwt.exceptions import (
    DecodeError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)

from turnlog.auth.jwks import ASYMMETRIC_ALGORITHMS, JwksSource, JwksUnavailableError
from turnlog.auth.principal import Principal, is_valid_name, scopes_from_claims
from turnlog.errors import (
    CredentialExpiredError,
    CredentialInvalidError,
    CredentialMalformedError,
    CredentialWrongAudienceError,
    CredentialWrongIssuerError,
)

#: The most clock skew a verifier tolerates between this host and the issuer.
MAX_LEEWAY_S = 60.0
#: Tokens longer than this are refused before any parsing.
MAX_TOKEN_CHARS = 16 * 1024
#: How many verified tokens a verifier remembers (a client reuses its token
#: for every call; a signature check costs far more than a dictionary lookup).
MAX_CACHED_TOKENS = 1024


class JwtVerifier:
    """Verifies JWTs of one issuer against that issuer's key source."""

    def __init__(
        self,
        jwks: JwksSource,
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str],
        leeway_s: float = 30.0,
        tenant_claim: str = "tenant",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure a verifier.

        Args:
            jwks: where the signing keys come from.
            issuer: the exact `iss` tokens must carry.
            audience: a value tokens' `aud` must name.
            algorithms: the signature algorithms accepted, from
                `jwks.ASYMMETRIC_ALGORITHMS` (never `none` or HMAC).
            leeway_s: tolerated clock skew, 0 to 60 seconds.
            tenant_claim: the claim that names the tenant.
            clock: Unix seconds, for `exp`, `nbf` and `iat`.

        Raises:
            ValueError: an algorithm is not accepted here, none is given, or
                the leeway is out of bounds.
        """
        refused = sorted(set(algorithms) - set(ASYMMETRIC_ALGORITHMS))
        if refused or not algorithms:
            allowed = ", ".join(ASYMMETRIC_ALGORITHMS)
            raise ValueError(
                f"JWT algorithms must be a non-empty choice of {allowed}; refused: {refused}"
            )
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"JWT leeway must be 0 to {MAX_LEEWAY_S:g} seconds, not {leeway_s}")
        if not issuer or not audience or not tenant_claim:
            raise ValueError("a JWT verifier needs an issuer, an audience and a tenant claim")
        self._jwks = jwks
        self.issuer = issuer
        self._audience = audience
        self._algorithms = frozenset(algorithms)
        self._leeway_s = float(leeway_s)
        self._tenant_claim = tenant_claim
        self._clock = clock
        self._verified: dict[str, Principal] = {}

    async def verify(self, token: str) -> Principal:
        """The principal `token` proves.

        A token that verified before is answered from a small cache of
        verified tokens, after the checks that can change with time: its
        expiry, and its signing key still being in the key set. Everything
        else a token's verification depends on is fixed by its bytes.

        Raises:
            CredentialMalformedError: it is not a JWT.
            CredentialInvalidError: bad signature, an algorithm not allowed or
                not fitting the key, an unknown key id (after a refetch), no
                `exp`, `sub` or tenant claim.
            CredentialExpiredError: expired, or not yet valid.
            CredentialWrongIssuerError: `iss` is missing or another issuer.
            CredentialWrongAudienceError: `aud` is missing or names another audience.
        """
        cached = self._verified.get(token)
        if cached is not None:
            if await self._still_good(cached):
                return cached
            self._verified.pop(token, None)
        principal = await self._verify(token)
        if len(self._verified) >= MAX_CACHED_TOKENS:
            self._verified.pop(next(iter(self._verified)))  # the oldest
        self._verified[token] = principal
        return principal

    def remembers(self, token: str) -> bool:
        """Whether `token` verified here before (and is still in the cache); costs no crypto."""
        return token in self._verified

    async def _still_good(self, principal: Principal) -> bool:
        try:
            await self.still_valid(principal)
        except (CredentialExpiredError, CredentialInvalidError):
            return False
        return True

    async def _verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise CredentialMalformedError("the bearer token is not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise CredentialMalformedError("the bearer token is not a JWT") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise CredentialInvalidError("the token's signature algorithm is not accepted")
        if not isinstance(kid, str) or not kid:
            raise CredentialInvalidError("the token names no signing key (kid)")
        try:
            keys = await self._jwks.keys()
            if kid not in keys:
                keys = await self._jwks.keys_after_miss()
        except JwksUnavailableError:
            # Logged by the source; the caller learns only that it cannot verify.
            raise CredentialInvalidError("the signing keys are unavailable") from None
        if kid not in keys:
            raise CredentialInvalidError("the token's signing key is unknown")
        key = keys.key(kid, algorithm)
        if key is None:
            raise CredentialInvalidError("the token's algorithm does not fit its signing key")
        claims = self._decode(token, key)
        expires_at = self._check_times(claims)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not is_valid_name(subject):
            raise CredentialInvalidError("the token's subject (sub) is missing or not a valid name")
        tenant = claims.get(self._tenant_claim)
        if not isinstance(tenant, str) or not is_valid_name(tenant):
            raise CredentialInvalidError(
                f"the token's tenant claim ({self._tenant_claim}) is missing or not a valid name"
            )
        return Principal(
            tenant=tenant,
            subject=subject,
            scopes=scopes_from_claims(claims),
            expires_at=expires_at,
            method="jwt",
            key_id=kid,
            issuer=self.issuer,
        )

    def _decode(self, token: str, key: jwt.PyJWK) -> dict[str, object]:
        """The token's claims once its signature, `iss` and `aud` verify."""
        try:
            claims: dict[str, object] = jwt.decode(
                token,
                key,
                # The one algorithm the key was loaded for, checked against
                # the configured list above; PyJWT refuses any other.
                algorithms=[key.algorithm_name],
                audience=self._audience,
                issuer=self.issuer,
                options={
                    "require": ["exp", "iss", "aud", "sub"],
                    "enforce_minimum_key_length": True,
                    # `_check_times` checks exp, nbf and iat right after, on
                    # this verifier's clock, the one `still_valid` and the
                    # cache use too (PyJWT reads its own).
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except InvalidSignatureError:
            raise CredentialInvalidError("the token's signature does not verify") from None
        except InvalidIssuerError:
            raise CredentialWrongIssuerError(
                "the token is from an issuer not trusted here"
            ) from None
        except InvalidAudienceError:
            raise CredentialWrongAudienceError("the token is meant for another audience") from None
        except MissingRequiredClaimError as e:
            raise _missing_claim(e.claim) from None
        except DecodeError:
            raise CredentialMalformedError("the token's claims cannot be read") from None
        except PyJWTError:
            # Disallowed algorithm, key too short, malformed sub/jti, ...
            raise CredentialInvalidError("the token does not verify") from None
        return claims

    def _check_times(self, claims: Mapping[str, object]) -> float:
        """The token's `exp`, once `exp`, `nbf` and `iat` hold within the leeway.

        Raises:
            CredentialMalformedError: one of them is not a number.
            CredentialExpiredError: expired, or not valid yet.
        """
        now = self._clock()
        times: dict[str, float] = {}
        for claim in ("exp", "nbf", "iat"):
            value = claims.get(claim)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CredentialMalformedError(f"the token's '{claim}' claim is not a number")
            times[claim] = float(value)
        expires_at = times["exp"]  # required by `_decode`
        if expires_at <= now - self._leeway_s:
            raise CredentialExpiredError("the token has expired")
        if max(times.get("nbf", now), times.get("iat", now)) > now + self._leeway_s:
            raise CredentialExpiredError("the token is not valid yet")
        return expires_at

    async def still_valid(self, principal: Principal) -> None:
        """Check that a principal this verifier made may still act (for long streams).

        Uses the key source as cached (fetching only once its copy is stale),
        so calling this often costs no I/O.

        Raises:
            CredentialExpiredError: the token's `exp` (plus the leeway) has passed.
            CredentialInvalidError: its signing key is no longer in the JWKS.
            ValueError: the principal is not one of this verifier's.
        """
        if principal.method != "jwt" or principal.issuer != self.issuer:
            raise ValueError("the principal was not verified by this JWT verifier")
        if principal.expires_at is not None and principal.expires_at <= (
            self._clock() - self._leeway_s
        ):
            raise CredentialExpiredError("the token has expired")
        try:
            keys = await self._jwks.keys()
        except JwksUnavailableError:
            raise CredentialInvalidError("the signing keys are unavailable") from None
        if principal.key_id not in keys:
            raise CredentialInvalidError("the token's signing key has been removed")


def _missing_claim(claim: str) -> Exception:
    if claim == "iss":
        return CredentialWrongIssuerError("the token names no issuer (iss)")
    if claim == "aud":
        return CredentialWrongAudienceError("the token names no audience (aud)")
    return CredentialInvalidError(f"the token has no '{claim}' claim")
