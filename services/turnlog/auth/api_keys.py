"""Static API keys: long random secrets, of which the service stores only a hash.

A key reads `tlk_<id>_<secret>`: `tlk_` marks it as a turnlog key (and lets
secret scanners find leaked ones), the id is 16 hex digits and public (it
names the key in configuration and logs), the secret is 32 random bytes in
unpadded URL-safe base64 (43 characters). Because the secret is 256 bits of
randomness, one SHA-256 of the whole key is the right thing to store: there
is nothing to brute-force, so a slow password hash would only cost CPU on
every call. Hashes are compared in constant time.

The keys file is TOML, one `[[api_key]]` table per key:

    [[api_key]]
    id = "3f9a1c0b7d2e4a61"
    sha256 = "<64 hex digits: SHA-256 of the whole key text>"
    tenant = "acme"
    scopes = ["read", "write"]

`turnlog api-key new` prints a key once together with its table. The file
is looked at again (one `stat`) at most once per `check_interval_s`, and read
again when it changed: removing a table revokes that key, and `still_valid`
then ends the streams that it opened. Replace the file atomically (write a
new one, rename it over the old): a file that fails to parse is ignored,
with an error logged, and the previous keys stay in use until a valid one
appears.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from turnlog.auth.principal import (
    Principal,
    Scope,
    format_scopes,
    is_valid_name,
    parse_scope_names,
)
from turnlog.errors import CredentialInvalidError, CredentialMalformedError

logger = logging.getLogger(__name__)

#: What every turnlog API key starts with.
API_KEY_PREFIX = "tlk_"
_KEY = re.compile(r"tlk_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = frozenset({"id", "sha256", "tenant", "scopes"})


def looks_like_api_key(text: str) -> bool:
    """Whether a bearer credential is meant as an API key (it has the `tlk_` prefix)."""
    return text.startswith(API_KEY_PREFIX)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyEntry:
    """One configured key: what the keys file holds, never the key itself.

    Attributes:
        key_id: the key's public id (the 16 hex digits after `tlk_`).
        sha256: SHA-256 of the whole key text, lowercase hex.
        tenant: the tenant the key acts for.
        scopes: what it may do.
    """

    key_id: str
    sha256: str
    tenant: str
    scopes: frozenset[Scope]

    def __post_init__(self) -> None:
        if not _KEY_ID.fullmatch(self.key_id):
            raise ValueError("an API key id is 16 lowercase hex digits")
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(f"API key {self.key_id}: sha256 must be 64 lowercase hex digits")
        if not is_valid_name(self.tenant):
            raise ValueError(f"API key {self.key_id}: the tenant is not a valid name")

    def to_toml(self) -> str:
        """The entry as a `[[api_key]]` table to paste into the keys file."""
        scopes = ", ".join(f'"{scope}"' for scope in format_scopes(self.scopes).split())
        return (
            "[[api_key]]\n"
            f'id = "{self.key_id}"\n'
            f'sha256 = "{self.sha256}"\n'
            f"tenant = {_toml_string(self.tenant)}\n"
            f"scopes = [{scopes}]\n"
        )


def _toml_string(text: str) -> str:
    # A TOML basic string; tenants are printable ASCII, so only these two need escaping.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hash_api_key(key_text: str) -> str:
    """The SHA-256 (hex) that configuration stores for `key_text`."""
    return hashlib.sha256(key_text.encode("ascii")).hexdigest()


def new_api_key(tenant: str, scopes: Iterable[Scope]) -> tuple[str, str]:
    """A fresh random key and the `[[api_key]]` table that configures it.

    Returns:
        (key_text, toml_entry): show the key to its owner once; put the entry
        in the keys file. The key cannot be recovered from the entry.

    Raises:
        ValueError: the tenant is not a valid name.
    """
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    key_text = f"{API_KEY_PREFIX}{key_id}_{secret}"
    entry = ApiKeyEntry(
        key_id=key_id, sha256=hash_api_key(key_text), tenant=tenant, scopes=frozenset(scopes)
    )
    return key_text, entry.to_toml()


def parse_api_keys_toml(text: str, *, origin: str) -> dict[str, ApiKeyEntry]:
    """The entries of a keys file, by key id.

    Raises:
        ValueError: not TOML, an unknown field, a bad value, or an id twice.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{origin}: not valid TOML ({e})") from e
    unknown_tables = sorted(set(document) - {"api_key"})
    if unknown_tables:
        raise ValueError(f"{origin}: unknown top-level keys {unknown_tables} (expected api_key)")
    tables = document.get("api_key", [])
    if not isinstance(tables, list):
        raise ValueError(f"{origin}: api_key must be an array of tables ([[api_key]])")
    entries: dict[str, ApiKeyEntry] = {}
    for index, table in enumerate(tables):
        where = f"{origin}: api_key #{index + 1}"
        if not isinstance(table, dict):
            raise ValueError(f"{where}: not a table")
        unknown = sorted(set(table) - _ENTRY_FIELDS)
        missing = sorted(_ENTRY_FIELDS - set(table))
        if unknown or missing:
            raise ValueError(f"{where}: unknown fields {unknown}, missing fields {missing}")
        key_id, sha256, tenant, scopes = (table[f] for f in ("id", "sha256", "tenant", "scopes"))
        if not all(isinstance(v, str) for v in (key_id, sha256, tenant)) or not (
            isinstance(scopes, list) and all(isinstance(s, str) for s in scopes)
        ):
            raise ValueError(f"{where}: id, sha256 and tenant are strings, scopes a list of them")
        try:
            entry = ApiKeyEntry(
                key_id=key_id, sha256=sha256, tenant=tenant, scopes=parse_scope_names(scopes)
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if key_id in entries:
            raise ValueError(f"{where}: id {key_id} appears twice")
        entries[key_id] = entry
    return entries


class ApiKeys:
    """The configured API keys: verifies keys and re-checks principals they made."""

    def __init__(
        self,
        entries: Iterable[ApiKeyEntry] = (),
        *,
        path: Path | None = None,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """A key set; use `from_file` for one read from (and following) a keys file.

        Args:
            entries: the keys, when given in code.
            path: the keys file to follow (its entries replace `entries` on a change).
            check_interval_s: the least time between two looks at the file.
            clock: monotonic seconds (tests pass a fake one).
        """
        self._entries: Mapping[str, ApiKeyEntry] = {e.key_id: e for e in entries}
        self._path = path
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = clock()

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> ApiKeys:
        """The keys of a TOML keys file, read now and again whenever it changes.

        Raises:
            OSError: the file cannot be read.
            ValueError: it is not a valid keys file.
        """
        keys = cls(path=path, check_interval_s=check_interval_s, clock=clock)
        stamp = _stamp(os.stat(path))
        keys._entries = parse_api_keys_toml(path.read_text(encoding="utf-8"), origin=str(path))
        keys._stamp = stamp
        return keys

    def verify(self, key_text: str) -> Principal:
        """The principal an API key proves.

        Raises:
            CredentialMalformedError: the text is not shaped like a turnlog API key.
            CredentialInvalidError: no configured key has this id and secret.
        """
        match = _KEY.fullmatch(key_text)
        if match is None:
            raise CredentialMalformedError(
                "the API key is not a turnlog API key (tlk_<id>_<secret>)"
            )
        entry = self._current().get(match["id"])
        # One message for an unknown id and a wrong secret.
        if entry is None or not hmac.compare_digest(hash_api_key(key_text), entry.sha256):
            raise CredentialInvalidError("the API key is not valid")
        return Principal(
            tenant=entry.tenant,
            subject=f"api-key:{entry.key_id}",
            scopes=entry.scopes,
            expires_at=None,
            method="api_key",
            key_id=entry.key_id,
        )

    def still_valid(self, principal: Principal) -> None:
        """Check that a principal `verify` made may still act (for long streams).

        The key must still be configured, for the same tenant, with at least
        the scopes it had.

        Raises:
            CredentialInvalidError: the key was removed or narrowed.
            ValueError: the principal did not come from an API key.
        """
        if principal.method != "api_key" or principal.key_id is None:
            raise ValueError("the principal was not verified by an API key")
        entry = self._current().get(principal.key_id)
        if entry is None:
            raise CredentialInvalidError("the API key has been revoked")
        if entry.tenant != principal.tenant or not principal.scopes <= entry.scopes:
            raise CredentialInvalidError("the API key's tenant or scopes have changed")

    def _current(self) -> Mapping[str, ApiKeyEntry]:
        if self._path is not None:
            now = self._clock()
            if now - self._checked_at >= self._check_interval_s:
                self._checked_at = now
                self._reload_if_changed(self._path)
        return self._entries

    def _reload_if_changed(self, path: Path) -> None:
        try:
            stamp = _stamp(os.stat(path))
            if stamp == self._stamp:
                return
            entries = parse_api_keys_toml(path.read_text(encoding="utf-8"), origin=str(path))
        except (OSError, ValueError) as e:
            logger.error("API keys file not reloaded, keeping the previous keys: %s", e)
            return
        self._entries, self._stamp = entries, stamp
        logger.info("API keys file %s reloaded: %d keys", path, len(entries))


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
