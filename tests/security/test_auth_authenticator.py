"""Authenticator: which credential a call carries, which verifier it goes to, re-checks; settings."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import pytest
from tokens import AUDIENCE, ISSUER, FakeClock, SigningKey, jwks_document, mint

from turnlog.auth.api_keys import new_api_key
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.local import LOCAL_ISSUER
from turnlog.auth.mtls import MtlsIdentity
from turnlog.auth.principal import Principal, Scope
from turnlog.auth.settings import AuthSettings, AuthSettingsError, JwtSettings
from turnlog.errors import (
    CredentialExpiredError,
    CredentialInvalidError,
    CredentialMalformedError,
    CredentialMissingError,
    CredentialWrongIssuerError,
)

IDP_KEY = SigningKey.ed25519()
REPORTS = MtlsIdentity(name="reports", tenant="initech", scopes=frozenset({Scope.HISTORY}))
CERTIFICATE = {"transport_security_type": [b"ssl"], "x509_common_name": [b"reports"]}


class Setup:
    """An authenticator accepting every method: local key, an IdP's JWKS file, API keys, mTLS."""

    def __init__(self, folder: Path) -> None:
        self.clock = FakeClock()
        self.jwks_file = folder / "jwks.json"
        self.jwks_file.write_text(json.dumps(jwks_document(IDP_KEY)))
        self.api_key, entry = new_api_key("acme", [Scope.WRITE])
        self.keys_file = folder / "api-keys.toml"
        self.keys_file.write_text(entry)
        self.settings = AuthSettings(
            local=True,
            data_dir=folder / "data",
            jwt=JwtSettings(jwks=str(self.jwks_file), issuer=ISSUER, audience=AUDIENCE),
            api_keys_file=self.keys_file,
            mtls=(REPORTS,),
        )
        self.authenticator = Authenticator(self.settings, clock=self.clock)
        assert self.authenticator.local_key is not None
        self.local_token = self.authenticator.local_key.mint_token(
            "default", [Scope.READ], subject="me", ttl_s=600
        )


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


async def test_each_credential_reaches_its_verifier(setup: Setup) -> None:
    authenticate = setup.authenticator.authenticate
    key = setup.api_key

    local = await authenticate([("authorization", f"Bearer {setup.local_token}")], {})
    idp = await authenticate([("authorization", f"Bearer {mint(IDP_KEY)}")], {})
    bearer_key = await authenticate([("authorization", f"Bearer {key}")], {})
    header_key = await authenticate([("x-api-key", key)], {})
    certificate = await authenticate([("user-agent", "grpc-python")], CERTIFICATE)

    assert (local.method, local.issuer, local.tenant) == ("jwt", LOCAL_ISSUER, "default")
    assert (idp.method, idp.issuer, idp.tenant) == ("jwt", ISSUER, "acme")
    assert (bearer_key.method, bearer_key.tenant) == ("api_key", "acme")
    assert header_key == bearer_key
    assert (certificate.method, certificate.tenant) == ("mtls", "initech")


async def test_a_metadata_credential_wins_over_the_client_certificate(setup: Setup) -> None:
    principal = await setup.authenticator.authenticate([("x-api-key", setup.api_key)], CERTIFICATE)

    assert principal.method == "api_key"


async def test_no_credential_is_missing(setup: Setup) -> None:
    with pytest.raises(CredentialMissingError):
        await setup.authenticator.authenticate([("user-agent", "x")], {})


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer ")],
        [("authorization", "token-without-scheme")],
        [("x-api-key", "not-a-turnlog-key")],
        [("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")],
        [("authorization", b"Bearer \xff\xfe")],
    ],
    ids=["basic", "no-token", "empty-token", "no-scheme", "foreign-key", "two", "not-ascii"],
)
async def test_unusable_metadata_credentials_are_malformed(
    setup: Setup, metadata: list[tuple[str, str | bytes]]
) -> None:
    with pytest.raises(CredentialMalformedError):
        await setup.authenticator.authenticate(metadata, CERTIFICATE)


async def test_a_bearer_token_and_an_api_key_together_are_malformed(setup: Setup) -> None:
    metadata = [("authorization", f"Bearer {setup.local_token}"), ("x-api-key", setup.api_key)]

    with pytest.raises(CredentialMalformedError, match="more than one"):
        await setup.authenticator.authenticate(metadata, {})


async def test_bytes_values_and_any_case_scheme_are_read(setup: Setup) -> None:
    metadata = [("authorization", f"bearer {setup.local_token}".encode())]

    assert (await setup.authenticator.authenticate(metadata, {})).issuer == LOCAL_ISSUER


async def test_a_token_of_an_untrusted_issuer_is_refused_by_the_dispatch(setup: Setup) -> None:
    token = mint(IDP_KEY, iss="https://evil.test/")

    with pytest.raises(CredentialWrongIssuerError):
        await setup.authenticator.authenticate([("authorization", f"Bearer {token}")], {})


async def test_methods_that_are_off_refuse_their_credentials(tmp_path: Path) -> None:
    authenticator = Authenticator(AuthSettings.local_default(tmp_path))
    api_key, _ = new_api_key("acme", [Scope.READ])

    with pytest.raises(CredentialInvalidError, match="API keys"):
        await authenticator.authenticate([("x-api-key", api_key)], {})
    with pytest.raises(CredentialMissingError):
        await authenticator.authenticate([], CERTIFICATE)
    nothing = Authenticator(AuthSettings())
    with pytest.raises(CredentialInvalidError, match="bearer tokens"):
        await nothing.authenticate([("authorization", f"Bearer {mint(IDP_KEY)}")], {})


async def test_recheck_follows_each_methods_revocation(setup: Setup) -> None:
    authenticate = setup.authenticator.authenticate
    idp = await authenticate([("authorization", f"Bearer {mint(IDP_KEY)}")], {})
    key = await authenticate([("x-api-key", setup.api_key)], {})
    certificate = await authenticate([], CERTIFICATE)
    for principal in (idp, key, certificate):
        await setup.authenticator.recheck(principal)

    replacement = setup.jwks_file.with_suffix(".new")
    replacement.write_text(json.dumps(jwks_document(SigningKey.ed25519())))
    os.replace(replacement, setup.jwks_file)
    setup.keys_file.write_text("")
    setup.clock.advance(1.0)

    with pytest.raises(CredentialInvalidError, match="removed"):
        await setup.authenticator.recheck(idp)
    with pytest.raises(CredentialInvalidError, match="revoked"):
        await setup.authenticator.recheck(key)
    await setup.authenticator.recheck(certificate)  # still configured


async def test_recheck_refuses_principals_no_verifier_here_made(setup: Setup) -> None:
    stranger = Principal(
        tenant="acme",
        subject="x",
        scopes=frozenset(),
        expires_at=None,
        method="jwt",
        key_id="k",
        issuer="https://gone.test/",
    )
    expired = dataclasses.replace(Principal.insecure(), expires_at=1.0)

    with pytest.raises(CredentialInvalidError, match="no longer trusted"):
        await setup.authenticator.recheck(stranger)
    with pytest.raises(CredentialExpiredError):
        await setup.authenticator.recheck(expired)
    await setup.authenticator.recheck(Principal.insecure())


def test_principal_scopes_admin_implies_all() -> None:
    reader = dataclasses.replace(Principal.insecure(), scopes=frozenset({Scope.READ}))

    assert reader.has(Scope.READ)
    assert not reader.has(Scope.WRITE)
    assert all(Principal.insecure().has(scope) for scope in Scope)


def test_settings_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "turnlog.toml"
    path.write_text(
        textwrap.dedent(
            """
            [auth]
            local = true
            api_keys_file = "keys/api-keys.toml"

            [auth.jwt]
            jwks = "https://idp.example.com/.well-known/jwks.json"
            issuer = "https://idp.example.com/"
            audience = "turnlog-prod"
            algorithms = ["RS256", "ES256"]
            leeway_s = 10
            tenant_claim = "org"

            [[auth.mtls]]
            name = "billing.svc.example.com"
            tenant = "acme"
            scopes = ["read", "write"]
            """
        )
    )

    settings = AuthSettings.from_toml_file(path, data_dir=tmp_path / "data")

    assert settings == AuthSettings(
        local=True,
        data_dir=tmp_path / "data",
        api_keys_file=tmp_path / "keys" / "api-keys.toml",
        jwt=JwtSettings(
            jwks="https://idp.example.com/.well-known/jwks.json",
            issuer="https://idp.example.com/",
            audience="turnlog-prod",
            algorithms=("RS256", "ES256"),
            leeway_s=10.0,
            tenant_claim="org",
        ),
        mtls=(
            MtlsIdentity(
                name="billing.svc.example.com",
                tenant="acme",
                scopes=frozenset({Scope.READ, Scope.WRITE}),
            ),
        ),
    )
    assert settings.enabled


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[auth]\nlocall = true\n", "unknown keys"),
        ("[auth]\nlocal = 1\n", "wrong type"),
        ('[auth.jwt]\njwks = "j.json"\nissuer = "i"\nalgorithms = ["HS256"]\n', "never 'none'"),
        ('[auth.jwt]\njwks = "j.json"\nissuer = "i"\nalgorithms = ["none"]\n', "never 'none'"),
        ('[auth.jwt]\njwks = "j.json"\nissuer = "i"\nleeway_s = 300\n', "leeway"),
        ('[auth.jwt]\njwks = "http://idp.example.com/j"\nissuer = "i"\n', "https"),
        ('[auth.jwt]\njwks = "j.json"\n', "issuer is required"),
        ('[auth.jwt]\njwks = "j.json"\nissuer = "i"\naudiance = "x"\n', "unknown keys"),
        ('[[auth.mtls]]\nname = "n"\ntenant = "t"\nscopes = ["raed"]\n', "unknown scope"),
        ("[other]\n", "no \\[auth\\] table"),
    ],
)
def test_invalid_settings_say_what_is_wrong(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "turnlog.toml"
    path.write_text(table)

    with pytest.raises(AuthSettingsError, match=message):
        AuthSettings.from_toml_file(path, data_dir=tmp_path)


def test_the_local_issuer_cannot_be_configured_for_an_identity_provider(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_document(IDP_KEY)))
    settings = AuthSettings(
        local=True, data_dir=tmp_path, jwt=JwtSettings(jwks=str(jwks), issuer=LOCAL_ISSUER)
    )

    with pytest.raises(AuthSettingsError, match="local issuer"):
        Authenticator(settings)


def test_nothing_is_accepted_by_default() -> None:
    assert not AuthSettings().enabled
    with pytest.raises(AuthSettingsError, match="data folder"):
        AuthSettings(local=True)
