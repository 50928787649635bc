"""Where JWT signing keys come from: a JWKS (RFC 7517) in a file, at a URL, or given in code.

A source hands `JwtVerifier` a parsed `JwkSet` in two ways:

- `keys()`: the key set as cached. This is the hot path of every call and
  does no I/O while the cache is fresh: a file is looked at (one `stat`) at
  most once per `check_interval_s`; a URL is fetched again once the copy is
  older than `max_age_s`.
- `keys_after_miss()`: a token named a key id the cached set lacks (the
  identity provider may have rotated its keys). A URL is fetched again at
  once, but at most once per `refetch_cooldown_s`, so tokens with made-up
  key ids cannot make this service hammer the identity provider; concurrent
  misses share one fetch.

A key set that fails to load (unreadable file, unreachable URL, not a JWKS,
no usable key) never replaces a good one: the previous set stays in use and
the failure is logged. Only a source that never loaded raises
`JwksUnavailableError`.

Only public, asymmetric signature keys are used. Keys are skipped (and the
skip logged with the key id, never key material) when they have no `kid`,
are symmetric (`oct`), carry private material, are marked for encryption
(`use` other than `sig`), or name an algorithm this package does not verify.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from turnlog.loopback import is_loopback_host

logger = logging.getLogger(__name__)

#: Every algorithm a JWKS key may be used with here, and the key type (and
#: curve) it needs: a token's `alg` must fit the key it names, so a public
#: key can never be misused as, say, an HMAC secret. No symmetric algorithm
#: and never "none".
ASYMMETRIC_ALGORITHMS: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
}

#: The most a JWKS document may weigh; real ones are a few kilobytes.
MAX_JWKS_BYTES = 1 << 20


def check_jwks_url(url: str) -> None:
    """Refuse a JWKS URL that an attacker on the network could answer.

    Raises:
        ValueError: not https, unless plain http to a loopback host (a local
            identity provider, tests).
    """
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return
    raise ValueError(
        "a JWKS URL must be https (plain http only to localhost or a loopback address)"
    )


# RFC 7638 section 3.2: the members of each key type that a thumbprint covers.
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding.

    Raises:
        ValueError: the key type is not RSA, EC or OKP, or a member is missing.
    """
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        raise ValueError("a thumbprint needs an RSA, EC or OKP key with all its public members")
    canonical = json.dumps({m: jwk[m] for m in members}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class JwksUnavailableError(Exception):
    """A key source has no key set: its first load failed (the cause is logged)."""


class JwkSet:
    """A parsed JWKS: for each key id, a verification key per algorithm it may serve.

    A key that declares its `alg` serves only that algorithm; one that does
    not serves every algorithm its key type fits (an RSA key: RS* and PS*).
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, Mapping[str, PyJWK]]) -> None:
        self._keys = {kid: dict(by_alg) for kid, by_alg in keys.items()}

    @classmethod
    def from_document(cls, document: object, *, origin: str) -> JwkSet:
        """Parse a JWKS document (`{"keys": [...]}`), skipping keys that cannot be used.

        Args:
            document: the decoded JSON.
            origin: where it came from, for log lines.

        Raises:
            ValueError: it is not a JWKS, or not one of its keys is usable.
        """
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError(f"{origin}: not a JWKS (a JSON object with a 'keys' list)")
        keys: dict[str, dict[str, PyJWK]] = {}
        for index, jwk in enumerate(document["keys"]):
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            if not isinstance(kid, str) or not kid:
                logger.warning("%s: key #%d has no 'kid'; skipped", origin, index)
                continue
            if kid in keys:
                logger.warning("%s: key id %r appears twice; the first is used", origin, kid)
                continue
            by_alg = _verification_keys(jwk, kid=kid, origin=origin)
            if by_alg:
                keys[kid] = by_alg
        if not keys:
            raise ValueError(f"{origin}: the JWKS has no usable signature key")
        return cls(keys)

    @classmethod
    def from_json(cls, text: str | bytes, *, origin: str) -> JwkSet:
        """Parse a JWKS from its JSON text; see `from_document`.

        Raises:
            ValueError: not JSON, not a JWKS, or no usable key.
        """
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{origin}: not JSON") from e
        return cls.from_document(document, origin=origin)

    def key(self, kid: str, algorithm: str) -> PyJWK | None:
        """The key `kid` for verifying `algorithm`, or None when there is none."""
        by_alg = self._keys.get(kid)
        return None if by_alg is None else by_alg.get(algorithm)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of the usable keys."""
        return frozenset(self._keys)


def _verification_keys(jwk: dict[str, Any], *, kid: str, origin: str) -> dict[str, PyJWK]:
    """The PyJWK of `jwk` for each algorithm it may verify; empty when it is unusable."""
    kty, crv, use, alg = jwk.get("kty"), jwk.get("crv"), jwk.get("use"), jwk.get("alg")
    if "d" in jwk or "k" in jwk:
        logger.error("%s: key %r holds private or symmetric key material; skipped", origin, kid)
        return {}
    if use is not None and use != "sig":
        logger.info("%s: key %r is not a signature key (use=%r); skipped", origin, kid, use)
        return {}
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        logger.info("%s: key %r is not for verifying; skipped", origin, kid)
        return {}
    candidates = [alg] if alg is not None else list(ASYMMETRIC_ALGORITHMS)
    by_alg: dict[str, PyJWK] = {}
    for name in candidates:
        fits = ASYMMETRIC_ALGORITHMS.get(name) if isinstance(name, str) else None
        if fits is None or fits[0] != kty or (fits[1] is not None and fits[1] != crv):
            continue
        try:
            by_alg[name] = PyJWK(jwk, algorithm=name)
        except PyJWTError:
            # PyJWT's message may quote the JWK; say only which key.
            logger.warning("%s: key %r is not a valid %s key; skipped", origin, kid, kty)
            return {}
    if not by_alg:
        logger.warning(
            "%s: key %r (kty=%r) fits no supported signature algorithm; skipped", origin, kid, kty
        )
    return by_alg


class JwksSource(Protocol):
    """Where a `JwtVerifier` gets its keys; see the module docstring for the contract."""

    async def keys(self) -> JwkSet:
        """The key set as cached, refreshed once the cache is stale.

        Raises:
            JwksUnavailableError: the source has never loaded a key set.
        """
        ...

    async def keys_after_miss(self) -> JwkSet:
        """A fresher key set, after a token named a key id `keys()` lacks (rate-limited).

        Raises:
            JwksUnavailableError: the source has never loaded a key set.
        """
        ...

    async def aclose(self) -> None:
        """Release what the source holds (an HTTP client)."""
        ...


class StaticJwks:
    """A key set fixed in code (the local signing key, tests)."""

    def __init__(self, keys: JwkSet) -> None:
        self._keys = keys

    async def keys(self) -> JwkSet:
        return self._keys

    async def keys_after_miss(self) -> JwkSet:
        return self._keys

    async def aclose(self) -> None:
        return None


class JwksFile:
    """A JWKS in a local file, read again when it changes.

    Whether it changed (modification time, size, inode) is looked at no more
    than once per `check_interval_s`, so replacing the file takes effect
    within that time. Replace it atomically (write a new file, then rename it
    over the old one): a half-written file fails to parse and is ignored
    until the next check, while the previous keys stay in use.
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Read the file now.

        Raises:
            OSError: it cannot be read.
            ValueError: it is not a JWKS with a usable key.
        """
        self._path = path
        self._check_interval_s = check_interval_s
        self._clock = clock
        stamp = _stamp(os.stat(path))
        self._keys = JwkSet.from_json(path.read_bytes(), origin=str(path))
        self._stamp = stamp
        self._checked_at = clock()

    async def keys(self) -> JwkSet:
        now = self._clock()
        if now - self._checked_at >= self._check_interval_s:
            self._checked_at = now
            self._reload_if_changed()
        return self._keys

    async def keys_after_miss(self) -> JwkSet:
        # The same throttle: a miss costs no more than a hit.
        return await self.keys()

    async def aclose(self) -> None:
        return None

    def _reload_if_changed(self) -> None:
        try:
            stamp = _stamp(os.stat(self._path))
            if stamp == self._stamp:
                return
            keys = JwkSet.from_json(self._path.read_bytes(), origin=str(self._path))
        except (OSError, ValueError) as e:
            logger.warning(
                "JWKS file %s not reloaded, keeping the previous keys: %s", self._path, e
            )
            return
        self._keys, self._stamp = keys, stamp
        logger.info("JWKS file %s reloaded: key ids %s", self._path, sorted(keys.key_ids))


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class JwksUrl:
    """A JWKS fetched over HTTP(S) with httpx, cached for `max_age_s`.

    The first `keys()` fetches; so does the first call once the copy is older
    than `max_age_s`, and a key-id miss. No fetch starts within
    `refetch_cooldown_s` of the previous one, whatever its cause or outcome:
    until then a stale or failed copy stays in use (a source that never
    loaded raises `JwksUnavailableError` at once). Callers that want a fetch
    while one is under way wait for that one, and a caller that is cancelled
    does not cancel it for the others.
    """

    def __init__(
        self,
        url: str,
        *,
        max_age_s: float = 300.0,
        refetch_cooldown_s: float = 30.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        """Configure; nothing is fetched until the first `keys()`.

        Args:
            url: an https URL, or http on a loopback host.
            max_age_s: how long a fetched key set is used without fetching again.
            refetch_cooldown_s: the least time between the starts of two
                fetches (after the copy aged, a key-id miss, or a failure).
            timeout_s: the limit on one fetch.
            clock: monotonic seconds (tests pass a fake one).
            client: an httpx client to use (and not close); by default one is
                made on the first fetch and closed by `aclose`.

        Raises:
            ValueError: the URL is not one `check_jwks_url` accepts.
        """
        check_jwks_url(url)
        self._url = url
        parts = urlsplit(url)
        # Logged without credentials, query or fragment, which may hold secrets.
        host = parts.netloc.rpartition("@")[2]
        self._display_url = urlunsplit((parts.scheme, host, parts.path, "", ""))
        self._max_age_s = max_age_s
        self._refetch_cooldown_s = refetch_cooldown_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._client = client
        self._owns_client = client is None
        self._keys: JwkSet | None = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._in_flight: asyncio.Future[None] | None = None

    async def keys(self) -> JwkSet:
        if self._keys is not None and self._clock() - self._fetched_at < self._max_age_s:
            return self._keys
        await self._fetch()
        return self._current()

    async def keys_after_miss(self) -> JwkSet:
        await self._fetch()
        return self._current()

    async def aclose(self) -> None:
        if self._in_flight is not None:
            self._in_flight.cancel()
            self._in_flight = None
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    def _current(self) -> JwkSet:
        if self._keys is None:
            raise JwksUnavailableError(f"no JWKS could be fetched from {self._display_url}")
        return self._keys

    async def _fetch(self) -> None:
        """Join the fetch under way, or start one unless the cooldown forbids it.

        Failures are logged by `_download`, never raised.
        """
        if self._in_flight is None:
            now = self._clock()
            if now - self._attempted_at < self._refetch_cooldown_s:
                return
            self._attempted_at = now
            self._in_flight = asyncio.ensure_future(self._refresh(now))
        await asyncio.shield(self._in_flight)

    async def _refresh(self, started_at: float) -> None:
        try:
            keys = await self._download()
            if keys is not None:
                if self._keys is None or keys.key_ids != self._keys.key_ids:
                    logger.info("JWKS from %s: key ids %s", self._display_url, sorted(keys.key_ids))
                # The copy's age counts from the request, the conservative end.
                self._keys, self._fetched_at = keys, started_at
        finally:
            # Before the waiters resume, so none of them sees a finished fetch as under way.
            self._in_flight = None

    async def _download(self) -> JwkSet | None:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        try:
            async with self._client.stream("GET", self._url, timeout=self._timeout_s) as response:
                if response.status_code != httpx.codes.OK:
                    raise ValueError(f"HTTP status {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            return JwkSet.from_json(bytes(body), origin=self._display_url)
        except Exception as e:
            # Whatever went wrong, verification goes on with the keys it has.
            state = "keeping the previous keys" if self._keys is not None else "no keys yet"
            logger.warning(
                "JWKS fetch from %s failed (%s): %s", self._display_url, state, _describe(e)
            )
            return None


def _describe(error: Exception) -> str:
    # Our ValueErrors say what was wrong with the response; other messages
    # (httpx's) can quote the full URL, and their type names the failure.
    return str(error) if type(error) is ValueError else type(error).__name__
