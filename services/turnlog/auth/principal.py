"""Who is calling: the `Principal` every verified credential becomes, and its `Scope`s.

A principal is the only thing the rest of the service learns about a caller:
which tenant it acts for, who it is within that tenant, what it may do, and
until when. It is built only by the verifiers in this package, after a
credential has verified; nothing in a request can set or change it.

Scope names on the wire follow OAuth: a JWT carries them as one
space-separated `scope` string (RFC 8693 section 4.2) or as an `scp` list (as
some identity providers do). Names this service does not know are ignored,
so an identity provider may put other services' scopes in the same token.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from turnlog.domain import events as ev

#: The tenant that the local default (`turnlog serve` on loopback) and
#: `--insecure` serve: the domain's (conversations recorded before tenancy).
DEFAULT_TENANT: Final = ev.DEFAULT_TENANT

#: How a principal was verified.
AuthMethod = Literal["jwt", "api_key", "mtls", "insecure"]

# A tenant or subject goes into event metadata, the hash chain, an indexed
# column and logs: printable, no whitespace, bounded. Wide enough for the
# identifiers identity providers use (UUIDs, URLs, e-mail addresses).
_NAME = re.compile(r"[!-~]{1,256}")


class Scope(enum.StrEnum):
    """What a principal may do. `ADMIN` implies every other scope."""

    READ = "read"
    WRITE = "write"
    HISTORY = "history"
    IMPORT = "import"
    ADMIN = "admin"


def is_valid_name(text: str) -> bool:
    """Whether `text` may be a tenant or subject: 1 to 256 printable ASCII characters, no spaces."""
    return _NAME.fullmatch(text) is not None


def scopes_from_names(names: Iterable[str]) -> frozenset[Scope]:
    """The known scopes among `names`; unknown names are ignored, not errors."""
    known = {scope.value: scope for scope in Scope}
    return frozenset(known[name] for name in names if name in known)


def parse_scope_names(names: Iterable[str]) -> frozenset[Scope]:
    """The scopes `names` list, for configuration and the command line, where a typo must show.

    Raises:
        ValueError: a name is not a scope (the message lists the valid ones).
    """
    names = list(names)
    unknown = sorted(set(names) - {scope.value for scope in Scope})
    if unknown:
        valid = ", ".join(scope.value for scope in Scope)
        raise ValueError(f"unknown scope {', '.join(map(repr, unknown))} (valid: {valid})")
    return frozenset(Scope(name) for name in names)


def scopes_from_claims(claims: Mapping[str, object]) -> frozenset[Scope]:
    """The scopes a JWT grants: its `scope` string and its `scp` list (or string), together.

    Values of other types grant nothing.
    """
    names: list[str] = []
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            names.extend(value.split())
        elif isinstance(value, list):
            names.extend(item for item in value if isinstance(item, str))
    return scopes_from_names(names)


def format_scopes(scopes: Iterable[Scope]) -> str:
    """`scopes` as a JWT `scope` claim: space-separated, in a stable order."""
    return " ".join(sorted(Scope(scope).value for scope in scopes))


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """A verified caller.

    Attributes:
        tenant: the tenant the caller acts for; the only source of the tenant
            anywhere in the service.
        subject: who the caller is within its credential's issuer (a JWT's
            `sub`, `api-key:<id>`, a certificate's name).
        scopes: what the caller may do; see `has`.
        expires_at: when the credential stops being valid, in Unix seconds;
            None for credentials that do not expire by themselves (API keys).
        method: how the credential was verified.
        key_id: what revoking the credential removes: a JWT's signing key id
            (`kid`), an API key's id, the configured certificate name. None
            when nothing can revoke it (`insecure`).
        issuer: a JWT's `iss`, so a re-check asks the verifier that trusted
            it; None for the other methods.
    """

    tenant: str
    subject: str
    scopes: frozenset[Scope]
    expires_at: float | None
    method: AuthMethod
    key_id: str | None
    issuer: str | None = None

    def has(self, scope: Scope) -> bool:
        """Whether the principal may do what `scope` allows (`ADMIN` allows everything)."""
        return scope in self.scopes or Scope.ADMIN in self.scopes

    @classmethod
    def insecure(cls, tenant: str = DEFAULT_TENANT) -> Principal:
        """The principal of every call when authentication is off (`turnlog serve --insecure`)."""
        return cls(
            tenant=tenant,
            subject="insecure",
            scopes=frozenset({Scope.ADMIN}),
            expires_at=None,
            method="insecure",
            key_id=None,
        )
