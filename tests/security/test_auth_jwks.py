"""JWKS sources: a URL served by a real loopback HTTP server, a file, and parsing.

Fetches are counted where they happen, at the server. Time is a fake clock
the tests move, so cache ages and cooldowns need no sleeping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from jwt.algorithms import OKPAlgorithm
from tokens import AUDIENCE, ISSUER, FakeClock, SigningKey, jwks_document, mint

from turnlog.auth.jwks import JwkSet, JwksFile, JwksUrl, check_jwks_url
from turnlog.auth.jwt_verifier import JwtVerifier
from turnlog.errors import CredentialInvalidError

KEY = SigningKey.ed25519()
NEW_KEY = SigningKey.ed25519()
MAX_AGE_S = 300.0
COOLDOWN_S = 30.0


class JwksServer:
    """A loopback HTTP server answering GET /jwks.json with `document`, counting requests."""

    def __init__(self) -> None:
        self.document: Any = jwks_document(KEY)
        self.status = 200
        self.fetches = 0
        #: Responses wait until this is set (tests clear it to hold a fetch open).
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.fetches += 1
                server.release.wait(timeout=30)
                with server._lock:
                    body = json.dumps(server.document).encode()
                    status = server.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/jwks.json"
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[JwksServer]:
    with JwksServer() as running:
        yield running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def source(server: JwksServer, clock: FakeClock) -> Any:
    jwks = JwksUrl(server.url, max_age_s=MAX_AGE_S, refetch_cooldown_s=COOLDOWN_S, clock=clock)
    yield jwks
    await jwks.aclose()


def verifier_of(source: Any) -> JwtVerifier:
    return JwtVerifier(source, issuer=ISSUER, audience=AUDIENCE, algorithms=["EdDSA"])


async def test_a_fetched_jwks_is_cached_until_its_max_age(
    server: JwksServer, source: JwksUrl, clock: FakeClock
) -> None:
    verifier = verifier_of(source)
    await verifier.verify(mint(KEY, sub="one"))
    await verifier.verify(mint(KEY, sub="two"))
    clock.advance(MAX_AGE_S - 1)
    await verifier.verify(mint(KEY, sub="three"))
    assert server.fetches == 1

    clock.advance(2)
    await verifier.verify(mint(KEY, sub="four"))
    assert server.fetches == 2


async def test_concurrent_first_calls_share_one_fetch(server: JwksServer, source: JwksUrl) -> None:
    verifier = verifier_of(source)

    principals = await asyncio.gather(*(verifier.verify(mint(KEY, sub=f"s{i}")) for i in range(20)))

    assert len(principals) == 20
    assert server.fetches == 1


async def test_a_cancelled_caller_does_not_cancel_the_fetch_it_shares(
    server: JwksServer, source: JwksUrl
) -> None:
    verifier = verifier_of(source)
    server.release.clear()
    first = asyncio.ensure_future(verifier.verify(mint(KEY, sub="first")))
    for _ in range(1000):  # at most 10 s for the request to reach the server
        if server.fetches:
            break
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(verifier.verify(mint(KEY, sub="second")))
    await asyncio.sleep(0)  # the second joins the fetch under way

    first.cancel()
    server.release.set()

    assert (await second).subject == "second"
    assert first.cancelled()
    assert server.fetches == 1


async def test_an_unknown_kid_fetches_again_once(
    server: JwksServer, source: JwksUrl, clock: FakeClock
) -> None:
    verifier = verifier_of(source)
    await verifier.verify(mint(KEY))
    server.document = jwks_document(KEY, NEW_KEY)  # the provider rotates
    clock.advance(COOLDOWN_S)

    principal = await verifier.verify(mint(NEW_KEY))

    assert principal.key_id == NEW_KEY.kid
    assert server.fetches == 2


async def test_an_unknown_kid_within_the_cooldown_does_not_fetch(
    server: JwksServer, source: JwksUrl, clock: FakeClock
) -> None:
    verifier = verifier_of(source)
    await verifier.verify(mint(KEY))
    server.document = jwks_document(KEY, NEW_KEY)
    clock.advance(COOLDOWN_S / 2)

    with pytest.raises(CredentialInvalidError, match="unknown"):
        await verifier.verify(mint(NEW_KEY))
    assert server.fetches == 1


async def test_a_burst_of_made_up_kids_causes_at_most_one_fetch(
    server: JwksServer, source: JwksUrl, clock: FakeClock
) -> None:
    verifier = verifier_of(source)
    await verifier.verify(mint(KEY))
    clock.advance(COOLDOWN_S)

    burst = [verifier.verify(mint(SigningKey.ed25519(kid=f"garbage-{i}"))) for i in range(20)]
    results = await asyncio.gather(*burst, return_exceptions=True)
    later = [verifier.verify(mint(SigningKey.ed25519(kid=f"later-{i}"))) for i in range(5)]
    results += await asyncio.gather(*later, return_exceptions=True)

    assert all(isinstance(r, CredentialInvalidError) for r in results), results
    assert server.fetches == 2  # the first verify's, and one for the whole burst


async def test_a_removed_key_fails_still_valid_once_the_jwks_is_fetched_again(
    server: JwksServer, source: JwksUrl, clock: FakeClock
) -> None:
    verifier = verifier_of(source)
    token = mint(KEY)
    principal = await verifier.verify(token)
    server.document = jwks_document(NEW_KEY)  # KEY is withdrawn

    await verifier.still_valid(principal)  # the cached set still has it
    assert server.fetches == 1

    clock.advance(MAX_AGE_S)
    with pytest.raises(CredentialInvalidError, match="removed"):
        await verifier.still_valid(principal)
    assert server.fetches == 2
    # The token itself no longer verifies either, though it verified before.
    with pytest.raises(CredentialInvalidError):
        await verifier.verify(token)


async def test_a_failed_fetch_keeps_the_previous_keys_and_waits_out_the_cooldown(
    server: JwksServer, source: JwksUrl, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = verifier_of(source)
    await verifier.verify(mint(KEY))
    server.status = 500
    clock.advance(MAX_AGE_S)

    with caplog.at_level(logging.WARNING, logger="turnlog.auth.jwks"):
        await verifier.verify(mint(KEY, sub="during-outage"))
        await verifier.verify(mint(KEY, sub="still-during-outage"))

    assert server.fetches == 2
    assert "HTTP status 500" in caplog.text
    server.status = 200
    clock.advance(COOLDOWN_S)
    await verifier.verify(mint(KEY, sub="after"))
    assert server.fetches == 3


async def test_an_identity_provider_down_at_start_is_asked_once_per_cooldown(
    server: JwksServer, source: JwksUrl, clock: FakeClock
) -> None:
    verifier = verifier_of(source)
    server.status = 503

    for subject in ("one", "two", "three"):
        with pytest.raises(CredentialInvalidError, match="unavailable"):
            await verifier.verify(mint(KEY, sub=subject))
    assert server.fetches == 1

    server.status = 200
    clock.advance(COOLDOWN_S)
    assert await verifier.verify(mint(KEY))
    assert server.fetches == 2


async def test_an_identity_provider_never_reached_refuses_tokens(clock: FakeClock) -> None:
    with JwksServer() as stopped:
        url = stopped.url
    source = JwksUrl(url, clock=clock)
    try:
        with pytest.raises(CredentialInvalidError, match="unavailable"):
            await verifier_of(source).verify(mint(KEY))
    finally:
        await source.aclose()


async def test_a_jwks_that_is_not_one_is_not_taken(
    server: JwksServer, source: JwksUrl, clock: FakeClock
) -> None:
    verifier = verifier_of(source)
    await verifier.verify(mint(KEY))
    server.document = {"keys": []}
    clock.advance(MAX_AGE_S)

    assert await verifier.verify(mint(KEY, sub="again"))
    assert server.fetches == 2


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://idp.example.com/jwks.json", True),
        ("http://127.0.0.1:8080/jwks.json", True),
        ("http://localhost/jwks.json", True),
        ("http://[::1]/jwks.json", True),
        ("http://idp.example.com/jwks.json", False),
        ("ftp://idp.example.com/jwks.json", False),
        ("https:///jwks.json", False),
    ],
)
def test_jwks_urls_must_be_https_unless_on_loopback(url: str, accepted: bool) -> None:
    if accepted:
        check_jwks_url(url)
    else:
        with pytest.raises(ValueError, match="https"):
            check_jwks_url(url)


def test_unusable_keys_are_skipped_and_a_set_of_none_is_refused() -> None:
    good = KEY.public_jwk()
    unusable = [
        {k: v for k, v in good.items() if k != "kid"},
        {**good, "kid": "enc", "use": "enc"},
        {**OKPAlgorithm.to_jwk(KEY.private_key, as_dict=True), "kid": "private"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {**good, "kid": "wrong-alg", "alg": "HS256"},
        {**good, "kid": "wrong-curve", "crv": "X25519"},
        "not an object",
    ]

    keys = JwkSet.from_document({"keys": [*unusable, good]}, origin="test")

    assert keys.key_ids == {KEY.kid}
    with pytest.raises(ValueError, match="no usable"):
        JwkSet.from_document({"keys": unusable}, origin="test")
    with pytest.raises(ValueError, match="not a JWKS"):
        JwkSet.from_document([good], origin="test")


def _write_jwks(path: Path, *keys: SigningKey) -> None:
    # Atomically, as docs/security.md asks.
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(jwks_document(*keys)))
    os.replace(temporary, path)


async def test_a_jwks_file_is_read_again_when_it_changes(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "jwks.json"
    _write_jwks(path, KEY)
    verifier = verifier_of(JwksFile(path, check_interval_s=1.0, clock=clock))
    principal = await verifier.verify(mint(KEY))

    _write_jwks(path, NEW_KEY)
    # Not looked at again within the check interval.
    await verifier.still_valid(principal)
    with pytest.raises(CredentialInvalidError, match="unknown"):
        await verifier.verify(mint(NEW_KEY))

    clock.advance(1.0)
    assert (await verifier.verify(mint(NEW_KEY))).key_id == NEW_KEY.kid
    with pytest.raises(CredentialInvalidError, match="removed"):
        await verifier.still_valid(principal)


async def test_a_broken_jwks_file_keeps_the_previous_keys(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwks.json"
    _write_jwks(path, KEY)
    verifier = verifier_of(JwksFile(path, check_interval_s=1.0, clock=clock))

    path.write_text('{"keys": [')
    clock.advance(1.0)
    with caplog.at_level(logging.WARNING, logger="turnlog.auth.jwks"):
        assert await verifier.verify(mint(KEY))
    assert "not reloaded" in caplog.text

    _write_jwks(path, NEW_KEY)
    clock.advance(1.0)
    assert await verifier.verify(mint(NEW_KEY))


def test_a_missing_or_invalid_jwks_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        JwksFile(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a JWKS"):
        JwksFile(tmp_path / "bad.json")
