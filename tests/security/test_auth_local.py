"""The local default: the data folder's signing key, and the tokens it signs."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from turnlog.auth.authenticator import Authenticator
from turnlog.auth.jwks import jwk_thumbprint
from turnlog.auth.local import LOCAL_AUDIENCE, LOCAL_ISSUER, LocalSigningKey
from turnlog.auth.principal import Scope
from turnlog.auth.settings import AuthSettings
from turnlog.errors import CredentialExpiredError, CredentialWrongAudienceError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_is_made_once_private_and_published(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    first = LocalSigningKey.load_or_create(data_dir)
    second = LocalSigningKey.load_or_create(data_dir)

    assert first.kid == second.kid
    folder = data_dir / "auth"
    assert _mode(folder) == 0o700
    assert _mode(folder / "signing-key.pem") == 0o600
    assert sorted(p.name for p in folder.iterdir()) == ["jwks.json", "signing-key.pem"]
    published = json.loads((folder / "jwks.json").read_text())
    assert published == {"keys": [first.public_jwk]}
    assert "d" not in first.public_jwk
    assert first.public_jwk["kid"] == jwk_thumbprint(first.public_jwk)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    LocalSigningKey.load_or_create(tmp_path)
    (tmp_path / "auth" / "signing-key.pem").chmod(0o640)

    with pytest.raises(PermissionError, match="other users"):
        LocalSigningKey.load_or_create(tmp_path)


def test_a_too_open_auth_folder_is_closed(tmp_path: Path) -> None:
    (tmp_path / "auth").mkdir(mode=0o755)
    (tmp_path / "auth").chmod(0o755)

    LocalSigningKey.load_or_create(tmp_path)

    assert _mode(tmp_path / "auth") == 0o700


def test_the_thumbprint_is_rfc_7638s() -> None:
    # The example of RFC 7638 section 3.1.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6"
        "tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-"
        "65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNL"
        "yrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJ"
        "zKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }

    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


async def test_minted_tokens_verify_with_the_local_settings(tmp_path: Path) -> None:
    authenticator = Authenticator(AuthSettings.local_default(tmp_path))
    assert authenticator.local_key is not None
    token = authenticator.local_key.mint_token(
        "acme", [Scope.READ, Scope.IMPORT], subject="ci", ttl_s=60
    )

    principal = await authenticator.authenticate([("authorization", f"Bearer {token}")], {})

    assert (principal.tenant, principal.subject, principal.issuer) == ("acme", "ci", LOCAL_ISSUER)
    assert principal.scopes == {Scope.READ, Scope.IMPORT}


async def test_sign_makes_tokens_the_local_settings_refuse(tmp_path: Path) -> None:
    authenticator = Authenticator(AuthSettings.local_default(tmp_path))
    key = authenticator.local_key
    assert key is not None
    base = {"iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "sub": "x", "tenant": "acme"}

    expired = key.sign({**base, "exp": 1_000})
    elsewhere = key.sign({**base, "aud": "billing", "exp": 4_000_000_000})

    with pytest.raises(CredentialExpiredError):
        await authenticator.authenticate([("authorization", f"Bearer {expired}")], {})
    with pytest.raises(CredentialWrongAudienceError):
        await authenticator.authenticate([("authorization", f"Bearer {elsewhere}")], {})
