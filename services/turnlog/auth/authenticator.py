"""One place that turns a call's credential into a verified `Principal`: `Authenticator`.

The gRPC interceptor hands it the call's metadata and auth context; it finds
the one credential the call carries and asks the verifier for that kind:

1. `authorization: Bearer <credential>`: an API key when it starts with
   `tlk_`, otherwise a JWT (dispatched by its `iss` when both the local key
   and an identity provider are trusted);
2. `x-api-key: tlk_...`;
3. otherwise a verified client certificate in the auth context (mTLS);
4. otherwise `CredentialMissingError`.

A call with more than one credential in metadata is refused as malformed
rather than one being picked. `recheck` asks the same verifier again
whether a principal may still act (expiry, revocation), for streams that
outlive a credential.

Building an Authenticator reads its files (and makes the local key when
`local` is on); verifying then costs no I/O beyond the throttled file
checks and the JWKS refetches that `jwks.py` describes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import jwt
from jwt.exceptions import PyJWTError

from turnlog.auth.api_keys import ApiKeys, looks_like_api_key
from turnlog.auth.jwks import JwksFile, JwksSource, JwksUnavailableError, JwksUrl, StaticJwks
from turnlog.auth.jwt_verifier import MAX_TOKEN_CHARS, JwtVerifier
from turnlog.auth.local import LOCAL_ALGORITHM, LOCAL_AUDIENCE, LOCAL_ISSUER, LocalSigningKey
from turnlog.auth.mtls import MtlsIdentities
from turnlog.auth.principal import Principal
from turnlog.auth.settings import AuthSettings, AuthSettingsError, JwtSettings
from turnlog.errors import (
    CredentialExpiredError,
    CredentialInvalidError,
    CredentialMalformedError,
    CredentialMissingError,
    CredentialWrongIssuerError,
)

#: The metadata keys that carry credentials (gRPC metadata keys are lowercase).
AUTHORIZATION = "authorization"
API_KEY_HEADER = "x-api-key"
_BEARER = "bearer"


class Authenticator:
    """Verifies calls' credentials against `AuthSettings`."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Build the verifiers `settings` turn on.

        Args:
            settings: which credentials to accept.
            clock: monotonic seconds, for caches and file checks.
            wall_clock: Unix seconds, for expiry in `recheck`.

        Raises:
            AuthSettingsError: the settings contradict each other (the local
                issuer configured for an identity provider too).
            OSError, ValueError: a configured file cannot be read or parsed,
                or the local key cannot be made or read.
        """
        self._wall_clock = wall_clock
        self._sources: list[JwksSource] = []
        self._verifiers: dict[str, JwtVerifier] = {}
        #: The data folder's signing key, when `settings.local` is on.
        self.local_key: LocalSigningKey | None = None
        if settings.local:
            if settings.data_dir is None:  # AuthSettings refuses this; mypy cannot know
                raise AuthSettingsError("auth.local needs the data folder that holds the key")
            self.local_key = LocalSigningKey.load_or_create(settings.data_dir)
            self._add_verifier(
                StaticJwks(self.local_key.jwk_set()),
                issuer=LOCAL_ISSUER,
                audience=LOCAL_AUDIENCE,
                algorithms=(LOCAL_ALGORITHM,),
                leeway_s=30.0,
                tenant_claim="tenant",
            )
        if settings.jwt is not None:
            if settings.jwt.issuer in self._verifiers:
                raise AuthSettingsError(f"auth.jwt.issuer: {LOCAL_ISSUER!r} is the local issuer")
            self._add_verifier(
                _jwks_source(settings.jwt, clock),
                issuer=settings.jwt.issuer,
                audience=settings.jwt.audience,
                algorithms=settings.jwt.algorithms,
                leeway_s=settings.jwt.leeway_s,
                tenant_claim=settings.jwt.tenant_claim,
            )
        self._api_keys = (
            None
            if settings.api_keys_file is None
            else ApiKeys.from_file(settings.api_keys_file, clock=clock)
        )
        self._mtls = MtlsIdentities(settings.mtls, clock=wall_clock) if settings.mtls else None

    def _add_verifier(
        self,
        source: JwksSource,
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str],
        leeway_s: float,
        tenant_claim: str,
    ) -> None:
        self._sources.append(source)
        self._verifiers[issuer] = JwtVerifier(
            source,
            issuer=issuer,
            audience=audience,
            algorithms=algorithms,
            leeway_s=leeway_s,
            tenant_claim=tenant_claim,
            clock=self._wall_clock,
        )

    async def authenticate(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Principal:
        """The principal the call's credential proves.

        Args:
            metadata: the call's invocation metadata, (key, value) pairs
                (`HandlerCallDetails.invocation_metadata`).
            auth_context: the call's `ServicerContext.auth_context()`.

        Raises:
            CredentialMissingError: no credential at all.
            CredentialMalformedError: a credential that cannot be parsed, or several.
            CredentialInvalidError, CredentialExpiredError,
            CredentialWrongIssuerError, CredentialWrongAudienceError: see
                `JwtVerifier.verify`, `ApiKeys.verify`, `MtlsIdentities.verify`.
        """
        credential = _metadata_credential(metadata)
        if credential is not None:
            if looks_like_api_key(credential):
                if self._api_keys is None:
                    raise CredentialInvalidError("API keys are not accepted here")
                return self._api_keys.verify(credential)
            return await self._verifier_for(credential).verify(credential)
        if self._mtls is not None:
            principal = self._mtls.verify(auth_context)
            if principal is not None:
                return principal
        raise CredentialMissingError(
            "the call carries no credential (authorization: Bearer ..., x-api-key, "
            "or a client certificate)"
        )

    async def recheck(self, principal: Principal) -> None:
        """Check that a principal `authenticate` made may still act.

        Costs no I/O beyond the caches' own refreshes, so a stream may call it
        on every message or on a timer.

        Raises:
            CredentialExpiredError: the credential's lifetime is over.
            CredentialInvalidError: it was revoked (signing key removed from
                the JWKS, API key removed from its file, certificate name
                unmapped), or its method is no longer accepted.
        """
        match principal.method:
            case "jwt":
                verifier = self._verifiers.get(principal.issuer or "")
                if verifier is None:
                    raise CredentialInvalidError("the token's issuer is no longer trusted")
                await verifier.still_valid(principal)
            case "api_key":
                if self._api_keys is None:
                    raise CredentialInvalidError("API keys are not accepted here")
                self._api_keys.still_valid(principal)
            case "mtls":
                if self._mtls is None:
                    raise CredentialInvalidError("client certificates are not accepted here")
                self._mtls.still_valid(principal)
            case "insecure":
                if principal.expires_at is not None and principal.expires_at <= self._wall_clock():
                    raise CredentialExpiredError("the credential has expired")

    async def warm_up(self) -> None:
        """Load remote key sets now, so the first call does not wait for a fetch.

        A source that cannot be reached is logged and tried again on use.
        """
        for source in self._sources:
            with contextlib.suppress(JwksUnavailableError):
                await source.keys()

    async def aclose(self) -> None:
        """Close the HTTP clients of remote key sets."""
        for source in self._sources:
            await source.aclose()

    def _verifier_for(self, token: str) -> JwtVerifier:
        if not self._verifiers:
            raise CredentialInvalidError("bearer tokens are not accepted here")
        if len(self._verifiers) == 1:
            return next(iter(self._verifiers.values()))
        for verifier in self._verifiers.values():
            if verifier.remembers(token):
                return verifier
        # Several issuers are trusted: the (not yet verified) `iss` picks the
        # verifier, which then checks everything, `iss` included.
        if len(token) > MAX_TOKEN_CHARS:
            raise CredentialMalformedError("the bearer token is not a JWT")
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except PyJWTError:
            raise CredentialMalformedError("the bearer token is not a JWT") from None
        issuer = claims.get("iss")
        chosen = self._verifiers.get(issuer) if isinstance(issuer, str) else None
        if chosen is None:
            raise CredentialWrongIssuerError("the token is from an issuer not trusted here")
        return chosen


def _jwks_source(settings: JwtSettings, clock: Callable[[], float]) -> JwksSource:
    if settings.jwks_is_url:
        return JwksUrl(
            settings.jwks,
            max_age_s=settings.jwks_max_age_s,
            refetch_cooldown_s=settings.jwks_refetch_cooldown_s,
            clock=clock,
        )
    return JwksFile(
        Path(settings.jwks), check_interval_s=settings.jwks_check_interval_s, clock=clock
    )


def _metadata_credential(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The one credential in the metadata (bearer token or API key), or None.

    Raises:
        CredentialMalformedError: several credentials, an authorization scheme
            other than Bearer, or a value that is not ASCII text.
    """
    found: list[str] = []
    for key, value in metadata:
        name = key.lower()
        if name not in (AUTHORIZATION, API_KEY_HEADER):
            continue
        try:
            text = value.decode("ascii") if isinstance(value, bytes) else value
            text.encode("ascii")
        except UnicodeError:
            raise CredentialMalformedError(f"the {name} header is not ASCII text") from None
        if name == AUTHORIZATION:
            scheme, _, text = text.strip().partition(" ")
            if scheme.lower() != _BEARER:
                raise CredentialMalformedError("the authorization header must be 'Bearer <token>'")
        elif not looks_like_api_key(text.strip()):
            raise CredentialMalformedError("the x-api-key header must hold a turnlog API key")
        found.append(text.strip())
    if len(found) > 1:
        raise CredentialMalformedError("the call carries more than one credential")
    if found and not found[0]:
        raise CredentialMalformedError("the authorization header holds an empty token")
    return found[0] if found else None
