"""`turnlog token` and `turnlog api-key new`, run in process through `turnlog.cli.main`."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from turnlog.auth.api_keys import ApiKeys
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.principal import Scope
from turnlog.auth.settings import AuthSettings
from turnlog.cli import main


async def test_turnlog_token_mints_a_token_the_local_settings_accept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TURNLOG_DATA_DIR", str(tmp_path))

    code = main(
        ["token", "--tenant", "acme", "--scopes", "read,history", "--ttl", "2h", "--subject", "ops"]
    )

    assert code == 0
    token = capsys.readouterr().out.strip()
    authenticator = Authenticator(AuthSettings.local_default(tmp_path))
    principal = await authenticator.authenticate([("authorization", f"Bearer {token}")], {})
    assert (principal.tenant, principal.subject) == ("acme", "ops")
    assert principal.scopes == {Scope.READ, Scope.HISTORY}
    assert principal.expires_at is not None
    lifetime = principal.expires_at - json.loads(_payload(token))["iat"]
    assert lifetime == 7200


def _payload(token: str) -> bytes:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.mark.parametrize(
    "argv",
    [
        ["token", "--tenant", "acme", "--scopes", "read,raed"],
        ["token", "--tenant", "acme", "--scopes", "read", "--ttl", "-5m"],
        ["token", "--tenant", "two words", "--scopes", "read"],
        ["token", "--scopes", "read"],
        ["api-key", "new", "--tenant", "acme", "--scopes", "superuser"],
    ],
    ids=["typo-scope", "negative-ttl", "bad-tenant", "no-tenant", "api-key-bad-scope"],
)
def test_cli_usage_errors_exit_2(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TURNLOG_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert not (tmp_path / "auth").exists()


def test_turnlog_api_key_new_prints_a_key_and_its_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["api-key", "new", "--tenant", "acme", "--scopes", "write"]) == 0

    out = capsys.readouterr().out
    key = next(line for line in out.splitlines() if line.startswith("tlk_"))
    entry = out[out.index("# Add this table") :]
    assert key[21:] not in entry  # the secret
    path = tmp_path / "api-keys.toml"
    path.write_text(entry)

    principal = ApiKeys.from_file(path).verify(key)
    assert principal.tenant == "acme"
    assert principal.scopes == {Scope.WRITE}
