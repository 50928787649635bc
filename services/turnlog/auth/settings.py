"""Which credentials the service accepts, and their parameters: `AuthSettings`.

Built in code (tests, `turnlog serve`'s local default) or read from the
`[auth]` table of a TOML file, whose format docs/security.md describes:

    [auth]
    local = true                      # tokens signed by the data folder's key
    api_keys_file = "api-keys.toml"   # relative to this file's folder

    [auth.jwt]
    jwks = "https://idp.example.com/.well-known/jwks.json"   # or a file path
    issuer = "https://idp.example.com/"
    audience = "turnlog"
    algorithms = ["RS256"]

    [[auth.mtls]]
    name = "billing.svc.example.com"
    tenant = "acme"
    scopes = ["read", "write"]

Unknown keys are errors, so a misspelt setting cannot silently leave a
check out. Settings only describe; `Authenticator` opens files and URLs.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turnlog.auth.jwks import ASYMMETRIC_ALGORITHMS, check_jwks_url
from turnlog.auth.jwt_verifier import MAX_LEEWAY_S
from turnlog.auth.local import LOCAL_AUDIENCE
from turnlog.auth.mtls import MtlsIdentity
from turnlog.auth.principal import parse_scope_names


class AuthSettingsError(ValueError):
    """The auth configuration is invalid; the message says where and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtSettings:
    """Bearer JWTs from one identity provider.

    Attributes:
        jwks: the provider's JWKS: an https URL (http only to a loopback
            host) or a file path.
        issuer: the exact `iss` its tokens carry.
        audience: a value their `aud` must name.
        algorithms: the signature algorithms accepted (asymmetric only).
        leeway_s: tolerated clock skew, at most 60 seconds.
        tenant_claim: the claim naming the tenant.
        jwks_max_age_s: how long a fetched JWKS is used before fetching again.
        jwks_refetch_cooldown_s: the least time between fetches caused by
            unknown key ids (or after a failed fetch).
        jwks_check_interval_s: how often a JWKS file is looked at for changes.
    """

    jwks: str
    issuer: str
    audience: str = LOCAL_AUDIENCE
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: float = 30.0
    tenant_claim: str = "tenant"
    jwks_max_age_s: float = 300.0
    jwks_refetch_cooldown_s: float = 30.0
    jwks_check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.jwks or not self.issuer or not self.audience or not self.tenant_claim:
            raise AuthSettingsError(
                "auth.jwt: jwks, issuer, audience and tenant_claim are required"
            )
        refused = sorted(set(self.algorithms) - set(ASYMMETRIC_ALGORITHMS))
        if refused or not self.algorithms:
            raise AuthSettingsError(
                f"auth.jwt.algorithms: choose from {', '.join(ASYMMETRIC_ALGORITHMS)} "
                f"(never 'none' or HMAC); refused: {refused}"
            )
        if not 0 <= self.leeway_s <= MAX_LEEWAY_S:
            raise AuthSettingsError(f"auth.jwt.leeway_s: 0 to {MAX_LEEWAY_S:g} seconds")
        if min(self.jwks_max_age_s, self.jwks_refetch_cooldown_s, self.jwks_check_interval_s) < 0:
            raise AuthSettingsError("auth.jwt: JWKS intervals cannot be negative")
        if self.jwks_is_url:
            try:
                check_jwks_url(self.jwks)
            except ValueError as e:
                raise AuthSettingsError(f"auth.jwt.jwks: {e}") from None

    @property
    def jwks_is_url(self) -> bool:
        """Whether `jwks` is a URL (else a file path)."""
        return self.jwks.startswith(("https://", "http://"))


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """Which credentials are accepted. Everything is off by default: deny by default.

    Attributes:
        local: accept tokens signed by the data folder's key (`auth/local.py`).
        data_dir: the data folder holding that key; required with `local`.
        jwt: bearer JWTs from an identity provider, if any.
        api_keys_file: the TOML file of API keys (`auth/api_keys.py`), if any.
        mtls: client certificate names and what they map to.
    """

    local: bool = False
    data_dir: Path | None = None
    jwt: JwtSettings | None = None
    api_keys_file: Path | None = None
    mtls: tuple[MtlsIdentity, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.local and self.data_dir is None:
            raise AuthSettingsError("auth.local needs the data folder that holds the key")

    @property
    def enabled(self) -> bool:
        """Whether any credential is accepted (if not, every call is refused)."""
        return (
            self.local or self.jwt is not None or self.api_keys_file is not None or bool(self.mtls)
        )

    @classmethod
    def local_default(cls, data_dir: Path) -> AuthSettings:
        """The settings of `turnlog serve` on loopback: tokens of `data_dir`'s local key."""
        return cls(local=True, data_dir=data_dir)

    @classmethod
    def from_toml_file(cls, path: Path, *, data_dir: Path | None = None) -> AuthSettings:
        """The `[auth]` table of a TOML file; relative paths are taken from the file's folder.

        Raises:
            OSError: the file cannot be read.
            AuthSettingsError: it is not TOML, has no `[auth]` table, or the
                table is invalid.
        """
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise AuthSettingsError(f"{path}: not valid TOML ({e})") from None
        table = document.get("auth")
        if not isinstance(table, dict):
            raise AuthSettingsError(f"{path}: no [auth] table")
        try:
            return cls.from_mapping(table, base_dir=path.parent, data_dir=data_dir)
        except AuthSettingsError as e:
            raise AuthSettingsError(f"{path}: {e}") from None

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, Any], *, base_dir: Path, data_dir: Path | None = None
    ) -> AuthSettings:
        """Settings from an already-parsed `[auth]` table.

        Raises:
            AuthSettingsError: an unknown key, a wrong type, or an invalid value.
        """
        _only(table, {"local", "api_keys_file", "jwt", "mtls"}, "auth")
        local = _typed(table, "local", bool, "auth", default=False)
        api_keys_file = _typed(table, "api_keys_file", str, "auth", default=None)
        jwt_table = _typed(table, "jwt", dict, "auth", default=None)
        mtls_tables = _typed(table, "mtls", list, "auth", default=[])
        return cls(
            local=local,
            data_dir=data_dir,
            jwt=None if jwt_table is None else _jwt_settings(jwt_table, base_dir),
            api_keys_file=None if api_keys_file is None else base_dir / api_keys_file,
            mtls=tuple(_mtls_identity(t, i) for i, t in enumerate(mtls_tables, start=1)),
        )


def _jwt_settings(table: Mapping[str, Any], base_dir: Path) -> JwtSettings:
    where = "auth.jwt"
    _only(table, set(JwtSettings.__dataclass_fields__), where)
    jwks = _typed(table, "jwks", str, where)
    if not jwks.startswith(("https://", "http://")):
        jwks = str(base_dir / jwks)
    options: dict[str, Any] = {}
    for name in ("audience", "tenant_claim"):
        if name in table:
            options[name] = _typed(table, name, str, where)
    for name in ("leeway_s", "jwks_max_age_s", "jwks_refetch_cooldown_s", "jwks_check_interval_s"):
        if name in table:
            options[name] = float(_typed(table, name, int | float, where))
    if "algorithms" in table:
        algorithms = _typed(table, "algorithms", list, where)
        if not all(isinstance(a, str) for a in algorithms):
            raise AuthSettingsError(f"{where}.algorithms: a list of algorithm names")
        options["algorithms"] = tuple(algorithms)
    return JwtSettings(jwks=jwks, issuer=_typed(table, "issuer", str, where), **options)


def _mtls_identity(table: object, index: int) -> MtlsIdentity:
    where = f"auth.mtls #{index}"
    if not isinstance(table, dict):
        raise AuthSettingsError(f"{where}: not a table ([[auth.mtls]])")
    _only(table, {"name", "tenant", "scopes"}, where)
    scopes = _typed(table, "scopes", list, where)
    if not all(isinstance(s, str) for s in scopes):
        raise AuthSettingsError(f"{where}.scopes: a list of scope names")
    try:
        return MtlsIdentity(
            name=_typed(table, "name", str, where),
            tenant=_typed(table, "tenant", str, where),
            scopes=parse_scope_names(scopes),
        )
    except ValueError as e:
        raise AuthSettingsError(f"{where}: {e}") from None


_MISSING: Any = object()


def _typed(
    table: Mapping[str, Any], key: str, kind: Any, where: str, default: Any = _MISSING
) -> Any:
    if key not in table:
        if default is _MISSING:
            raise AuthSettingsError(f"{where}.{key} is required")
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise AuthSettingsError(f"{where}.{key} has the wrong type")
    return value


def _only(table: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise AuthSettingsError(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")
