"""JwtVerifier: every way a bearer JWT can fail, and what a good one becomes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from jwt.warnings import InsecureKeyLengthWarning
from tokens import (
    AUDIENCE,
    ISSUER,
    SUBJECT,
    TENANT,
    SigningKey,
    claims,
    hmac_with_public_key,
    jwks_document,
    mint,
    sign,
    unsigned,
)

from turnlog.auth.jwks import JwkSet, StaticJwks
from turnlog.auth.jwt_verifier import JwtVerifier
from turnlog.auth.principal import Principal, Scope
from turnlog.errors import (
    CredentialExpiredError,
    CredentialInvalidError,
    CredentialMalformedError,
    CredentialWrongAudienceError,
    CredentialWrongIssuerError,
    UnauthenticatedError,
)

KEY = SigningKey.ed25519()
RSA_KEY = SigningKey.rsa(publish_alg=False)
EC_KEY = SigningKey.ec()
OTHER_KEY = SigningKey.ed25519()


def verifier(
    *keys: SigningKey,
    algorithms: tuple[str, ...] = ("EdDSA", "RS256", "PS256", "ES256"),
    clock: Callable[[], float] = time.time,
    **options: object,
) -> JwtVerifier:
    document = jwks_document(*(keys or (KEY, RSA_KEY, EC_KEY)))
    source = StaticJwks(JwkSet.from_document(document, origin="test"))
    return JwtVerifier(
        source,
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=algorithms,
        leeway_s=30,
        clock=clock,
        **options,  # type: ignore[arg-type]
    )


async def test_a_valid_token_becomes_its_principal() -> None:
    token = mint(KEY, exp=2_000_000_000, scope="read history")

    principal = await verifier().verify(token)

    assert principal == Principal(
        tenant=TENANT,
        subject=SUBJECT,
        scopes=frozenset({Scope.READ, Scope.HISTORY}),
        expires_at=2_000_000_000.0,
        method="jwt",
        key_id=KEY.kid,
        issuer=ISSUER,
    )


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [(RSA_KEY, "RS256"), (RSA_KEY, "PS256"), (EC_KEY, "ES256"), (KEY, "EdDSA")],
)
async def test_each_key_type_verifies_with_the_algorithms_it_fits(
    key: SigningKey, algorithm: str
) -> None:
    token = sign(claims(), key, algorithm=algorithm)

    assert (await verifier().verify(token)).key_id == key.kid


async def test_scopes_come_from_scp_lists_and_unknown_names_are_ignored() -> None:
    token = mint(KEY, scope="write frobnicate", scp=["admin", "other", 7])

    principal = await verifier().verify(token)

    assert principal.scopes == {Scope.WRITE, Scope.ADMIN}


async def test_a_custom_tenant_claim() -> None:
    token = mint(KEY, tenant=None, org="initech")

    assert (await verifier(tenant_claim="org").verify(token)).tenant == "initech"
    with pytest.raises(CredentialInvalidError, match="tenant"):
        await verifier().verify(token)


@pytest.mark.parametrize(
    "token",
    ["", "not-a-jwt", "a.b.c", "a.b", "eyJhbGciOiJFZERTQSJ9.e30", "x.y.z" * 4_000],
    ids=["empty", "word", "garbage-segments", "two-segments", "no-signature", "huge"],
)
async def test_what_is_not_a_jwt_is_malformed(token: str) -> None:
    with pytest.raises(CredentialMalformedError):
        await verifier().verify(token)


async def test_a_signature_by_another_key_does_not_verify() -> None:
    token = mint(OTHER_KEY, kid=KEY.kid)

    with pytest.raises(CredentialInvalidError, match="signature"):
        await verifier().verify(token)


async def test_a_changed_payload_does_not_verify() -> None:
    header, _, signature = mint(KEY, tenant="acme").split(".")
    _, payload, _ = mint(KEY, tenant="other").split(".")

    with pytest.raises(CredentialInvalidError, match="signature"):
        await verifier().verify(f"{header}.{payload}.{signature}")


async def test_an_expired_token_is_refused_outside_the_leeway_only() -> None:
    now = time.time()
    # The leeway is 30 seconds.
    assert await verifier().verify(mint(KEY, iat=int(now) - 600, exp=int(now) - 10))
    with pytest.raises(CredentialExpiredError, match="expired"):
        await verifier().verify(mint(KEY, iat=int(now) - 600, exp=int(now) - 60))


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_a_token_from_the_future_is_not_valid_yet(claim: str) -> None:
    future: dict[str, Any] = {claim: int(time.time()) + 120}
    token = mint(KEY, **future)

    with pytest.raises(CredentialExpiredError, match="not valid yet"):
        await verifier().verify(token)


@pytest.mark.parametrize("value", ["soon", True, [1]])
async def test_a_time_claim_that_is_not_a_number_is_malformed(value: object) -> None:
    with pytest.raises(CredentialMalformedError, match="exp"):
        await verifier().verify(mint(KEY, exp=value))


@pytest.mark.parametrize("issuer", ["https://evil.test/", "https://idp.test", None])
async def test_a_token_from_another_issuer_is_refused(issuer: str | None) -> None:
    with pytest.raises(CredentialWrongIssuerError):
        await verifier().verify(mint(KEY, iss=issuer))


@pytest.mark.parametrize("audience", ["billing", ["billing", "search"], None])
async def test_a_token_for_another_audience_is_refused(audience: object) -> None:
    with pytest.raises(CredentialWrongAudienceError):
        await verifier().verify(mint(KEY, aud=audience))


async def test_an_audience_list_that_names_turnlog_is_accepted() -> None:
    assert await verifier().verify(mint(KEY, aud=["billing", AUDIENCE]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tenant": None}, "tenant"),
        ({"tenant": ""}, "tenant"),
        ({"tenant": "two words"}, "tenant"),
        ({"tenant": 42}, "tenant"),
        ({"sub": None}, "sub"),
        ({"exp": None}, "exp"),
    ],
    ids=["no-tenant", "empty-tenant", "spaced-tenant", "numeric-tenant", "no-sub", "no-exp"],
)
async def test_a_token_without_a_required_claim_is_invalid(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(CredentialInvalidError, match=message):
        await verifier().verify(mint(KEY, **overrides))


async def test_alg_none_is_refused() -> None:
    with pytest.raises(CredentialInvalidError, match="algorithm"):
        await verifier().verify(unsigned(claims(), kid=KEY.kid))


async def test_hs256_keyed_with_the_public_key_is_refused() -> None:
    token = hmac_with_public_key(claims(), RSA_KEY)

    with pytest.raises(CredentialInvalidError, match="algorithm"):
        await verifier().verify(token)


async def test_an_allowed_algorithm_that_does_not_fit_the_named_key_is_refused() -> None:
    # Signed by an RSA key, but naming the Ed25519 key: RS256 is allowed, but
    # not with that key.
    token = sign(claims(), RSA_KEY, kid=KEY.kid)

    with pytest.raises(CredentialInvalidError, match="does not fit"):
        await verifier().verify(token)


async def test_an_algorithm_left_out_of_the_configuration_is_refused() -> None:
    token = sign(claims(), RSA_KEY, algorithm="PS256")

    with pytest.raises(CredentialInvalidError, match="algorithm"):
        await verifier(algorithms=("RS256",)).verify(token)


async def test_a_key_published_for_one_algorithm_serves_only_that_one() -> None:
    key = SigningKey.rsa(algorithm="RS256")  # its JWK says alg RS256
    token = sign(claims(), key, algorithm="PS256")

    with pytest.raises(CredentialInvalidError, match="does not fit"):
        await verifier(key).verify(token)


async def test_an_rsa_key_shorter_than_2048_bits_is_refused() -> None:
    weak = SigningKey.rsa(bits=1024)
    with pytest.warns(InsecureKeyLengthWarning):  # PyJWT signs, but warns
        token = mint(weak)

    with pytest.raises(CredentialInvalidError):
        await verifier(weak).verify(token)


async def test_an_unknown_or_missing_key_id_is_refused() -> None:
    with pytest.raises(CredentialInvalidError, match="unknown"):
        await verifier().verify(mint(OTHER_KEY))
    with pytest.raises(CredentialInvalidError, match="kid"):
        await verifier().verify(mint(KEY, kid=None))


@pytest.mark.parametrize(
    "algorithms",
    [("none",), ("HS256",), ("EdDSA", "HS512"), ()],
    ids=["none", "hs256", "mixed", "empty"],
)
def test_a_verifier_refuses_algorithms_that_are_not_asymmetric(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="algorithms"):
        verifier(algorithms=algorithms)


@pytest.mark.parametrize("leeway_s", [-1, 61, 3600])
def test_the_leeway_is_bounded(leeway_s: float) -> None:
    source = StaticJwks(JwkSet.from_document(jwks_document(KEY), origin="test"))
    with pytest.raises(ValueError, match="leeway"):
        JwtVerifier(
            source, issuer=ISSUER, audience=AUDIENCE, algorithms=["EdDSA"], leeway_s=leeway_s
        )


async def test_error_messages_never_quote_the_token() -> None:
    tokens = [
        mint(OTHER_KEY, kid=KEY.kid),
        mint(KEY, exp=1),
        mint(KEY, iss="https://evil.test/"),
        mint(KEY, aud="billing"),
        mint(KEY, tenant=None),
        unsigned(claims(), kid=KEY.kid),
        "not-a-jwt-but-secret-text",
    ]
    for token in tokens:
        with pytest.raises(UnauthenticatedError) as raised:
            await verifier().verify(token)
        text = str(raised.value) + repr(raised.value.metadata)
        assert all(part not in text for part in token.split(".") if len(part) > 8)
        # No PyJWT exception (whose text may quote key material) in the traceback.
        assert raised.value.__cause__ is None
        assert raised.value.__context__ is None or raised.value.__suppress_context__


async def test_still_valid_ends_at_exp_plus_the_leeway() -> None:
    now = time.time()
    clock = [now]
    subject = verifier(clock=lambda: clock[0])
    principal = await subject.verify(mint(KEY, exp=int(now) + 100))

    clock[0] = now + 125  # within the 30 s leeway
    await subject.still_valid(principal)
    clock[0] = now + 131
    with pytest.raises(CredentialExpiredError):
        await subject.still_valid(principal)


async def test_a_remembered_token_is_refused_once_it_expires() -> None:
    now = time.time()
    clock = [now]
    subject = verifier(clock=lambda: clock[0])
    token = mint(KEY, exp=int(now) + 100)
    assert await subject.verify(token)

    clock[0] = now + 200
    with pytest.raises(CredentialExpiredError):
        await subject.verify(token)


async def test_still_valid_refuses_a_principal_of_another_verifier() -> None:
    with pytest.raises(ValueError, match="not verified by this"):
        await verifier().still_valid(Principal.insecure())
