"""API keys: made once, stored as hashes, verified, and revoked by editing the file."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tomllib
from pathlib import Path

import pytest
from tokens import FakeClock

from turnlog.auth.api_keys import ApiKeyEntry, ApiKeys, new_api_key, parse_api_keys_toml
from turnlog.auth.principal import Scope
from turnlog.errors import CredentialInvalidError, CredentialMalformedError

KEY_SHAPE = re.compile(r"tlk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


def _write(path: Path, *entries: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text("\n".join(entries))
    os.replace(temporary, path)


def test_a_new_key_has_the_documented_shape_and_its_entry_stores_only_a_hash() -> None:
    key, entry = new_api_key("acme", [Scope.READ, Scope.WRITE])

    assert KEY_SHAPE.fullmatch(key)
    table = tomllib.loads(entry)["api_key"][0]
    assert table == {
        "id": key[4:20],
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "tenant": "acme",
        "scopes": ["read", "write"],
    }
    assert key[21:] not in entry
    assert new_api_key("acme", [Scope.READ])[0] != new_api_key("acme", [Scope.READ])[0]


def test_a_configured_key_verifies_as_its_tenant_and_scopes(tmp_path: Path) -> None:
    key, entry = new_api_key("acme", [Scope.READ, Scope.HISTORY])
    _, other_entry = new_api_key("initech", [Scope.ADMIN])
    path = tmp_path / "api-keys.toml"
    _write(path, other_entry, entry)

    principal = ApiKeys.from_file(path).verify(key)

    assert principal.tenant == "acme"
    assert principal.scopes == {Scope.READ, Scope.HISTORY}
    assert principal.method == "api_key"
    assert principal.key_id == key[4:20]
    assert principal.subject == f"api-key:{key[4:20]}"
    assert principal.expires_at is None


def test_an_unknown_key_or_a_wrong_secret_is_invalid(tmp_path: Path) -> None:
    key, entry = new_api_key("acme", [Scope.READ])
    stranger, _ = new_api_key("acme", [Scope.READ])
    path = tmp_path / "api-keys.toml"
    _write(path, entry)
    keys = ApiKeys.from_file(path)
    # The same id, another secret of the same shape.
    forged = key[:21] + ("A" if key[21] != "A" else "B") + key[22:]

    for wrong in (stranger, forged):
        with pytest.raises(CredentialInvalidError) as raised:
            keys.verify(wrong)
        assert key[21:] not in str(raised.value)
        assert wrong[21:] not in str(raised.value)


@pytest.mark.parametrize(
    "text",
    ["tlk_", "tlk_abc_def", "tlk_0123456789abcdef_short", "tlk_0123456789ABCDEF_" + "a" * 43],
)
def test_text_that_is_not_an_api_key_is_malformed(text: str) -> None:
    with pytest.raises(CredentialMalformedError):
        ApiKeys().verify(text)


def test_removing_a_key_from_the_file_revokes_it(tmp_path: Path) -> None:
    clock = FakeClock()
    kept, kept_entry = new_api_key("acme", [Scope.READ])
    removed, removed_entry = new_api_key("acme", [Scope.WRITE])
    path = tmp_path / "api-keys.toml"
    _write(path, kept_entry, removed_entry)
    keys = ApiKeys.from_file(path, check_interval_s=1.0, clock=clock)
    principal = keys.verify(removed)

    _write(path, kept_entry)
    keys.still_valid(principal)  # the file is looked at once per second at most
    clock.advance(1.0)

    with pytest.raises(CredentialInvalidError, match="revoked"):
        keys.still_valid(principal)
    with pytest.raises(CredentialInvalidError):
        keys.verify(removed)
    assert keys.verify(kept).tenant == "acme"


def test_narrowing_a_keys_scopes_fails_still_valid(tmp_path: Path) -> None:
    clock = FakeClock()
    key, entry = new_api_key("acme", [Scope.READ, Scope.WRITE])
    path = tmp_path / "api-keys.toml"
    _write(path, entry)
    keys = ApiKeys.from_file(path, clock=clock)
    principal = keys.verify(key)

    _write(path, entry.replace('"read", "write"', '"read"'))
    clock.advance(1.0)

    with pytest.raises(CredentialInvalidError, match="scopes"):
        keys.still_valid(principal)
    assert keys.verify(key).scopes == {Scope.READ}


def test_a_broken_file_keeps_the_previous_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    key, entry = new_api_key("acme", [Scope.READ])
    path = tmp_path / "api-keys.toml"
    _write(path, entry)
    keys = ApiKeys.from_file(path, clock=clock)

    _write(path, entry, "[[api_key]]\nid = ")
    clock.advance(1.0)
    with caplog.at_level(logging.ERROR, logger="turnlog.auth.api_keys"):
        assert keys.verify(key).tenant == "acme"
    assert "not reloaded" in caplog.text
    assert key not in caplog.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[api_key]]\nid = "0123456789abcdef"\n', "missing fields"),
        ("[[api_key]]\nid = 1\nsha256 = 2\ntenant = 3\nscopes = 4\n", "strings"),
        ("[keys]\n", "unknown top-level"),
        ("not toml", "not valid TOML"),
    ],
)
def test_an_invalid_keys_file_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_api_keys_toml(text, origin="test")


def test_a_misspelt_scope_or_a_repeated_id_is_refused() -> None:
    _, entry = new_api_key("acme", [Scope.READ])
    with pytest.raises(ValueError, match="unknown scope 'raed'"):
        parse_api_keys_toml(entry.replace('"read"', '"raed"'), origin="test")
    with pytest.raises(ValueError, match="twice"):
        parse_api_keys_toml(entry + entry, origin="test")


def test_keys_can_be_given_in_code() -> None:
    key, entry = new_api_key("acme", [Scope.IMPORT])
    (configured,) = parse_api_keys_toml(entry, origin="test").values()

    keys = ApiKeys([configured])

    assert keys.verify(key).scopes == {Scope.IMPORT}
    with pytest.raises(ValueError, match="hex"):
        ApiKeyEntry(key_id="x", sha256="0" * 64, tenant="acme", scopes=frozenset())
