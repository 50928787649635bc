"""CLI commands for credentials: `turnlog token` and `turnlog api-key new`.

    turnlog token --tenant T --scopes read,write [--ttl 24h] [--subject NAME]
        prints a JWT signed by the local key of TURNLOG_DATA_DIR (made on
        first use), which `turnlog serve` accepts with its local default.

    turnlog api-key new --tenant T --scopes read,write
        prints a new API key once, and the `[[api_key]]` table to add to the
        API keys file (which stores only the key's hash).

Results go to stdout; usage errors and failures are one line on stderr with
exit code 2. Modules are imported inside the commands, so `turnlog --help`
stays fast.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from typing import Any

#: `--ttl` values: a number of seconds, or with a unit s, m, h or d.
_DURATION = re.compile(r"(?P<amount>\d+(?:\.\d+)?)(?P<unit>[smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """argparse type of `--ttl`: `90`, `90s`, `30m`, `24h`, `7d` as seconds.

    Raises:
        argparse.ArgumentTypeError: not a positive duration.
    """
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match["amount"]) * _UNIT_S[match["unit"]] if match else 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive duration like 90s, 30m, 24h, 7d"
        )
    return seconds


def _scopes(text: str) -> Any:
    """argparse type of `--scopes`: comma-separated scope names, each one known."""
    from turnlog.auth.principal import parse_scope_names

    try:
        return parse_scope_names(name.strip() for name in text.split(",") if name.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _name(text: str) -> str:
    """argparse type of `--tenant` and `--subject`."""
    from turnlog.auth.principal import is_valid_name

    if not is_valid_name(text):
        raise argparse.ArgumentTypeError("a name is 1 to 256 printable characters, no spaces")
    return text


def add_auth_commands(subparsers: Any) -> None:
    """Register `token` and `api-key` on an argparse subparsers object.

    Each registered parser sets `func(args) -> int` as its default.
    """
    token = subparsers.add_parser(
        "token",
        help="print a token signed by the local key (for turnlog serve's local default)",
        description="Print a JWT signed by the local signing key in TURNLOG_DATA_DIR "
        "(default ~/.local/share/turnlog; the key is made on first use). turnlog serve on "
        "a loopback address accepts it. Send it as 'authorization: Bearer <token>'.",
    )
    token.add_argument("--tenant", required=True, type=_name, help="the tenant to act for")
    token.add_argument(
        "--scopes",
        required=True,
        type=_scopes,
        help="comma-separated: read, write, history, import, admin",
    )
    token.add_argument(
        "--ttl",
        type=parse_duration,
        default=parse_duration("24h"),
        help="lifetime: seconds, or with a unit s, m, h, d (default 24h)",
    )
    token.add_argument(
        "--subject", type=_name, help="who the token names (default: your user name)"
    )
    token.set_defaults(func=_token)

    api_key = subparsers.add_parser(
        "api-key", help="manage API keys", description="Manage API keys (docs/security.md)."
    )
    api_key_commands = api_key.add_subparsers(dest="api_key_command", required=True)
    new = api_key_commands.add_parser(
        "new",
        help="print a new API key and its entry for the API keys file",
        description="Print a new random API key, once, and the [[api_key]] table to add to "
        "the API keys file. The file stores only the key's SHA-256; the key cannot be "
        "shown again.",
    )
    new.add_argument("--tenant", required=True, type=_name, help="the tenant the key acts for")
    new.add_argument(
        "--scopes",
        required=True,
        type=_scopes,
        help="comma-separated: read, write, history, import, admin",
    )
    new.set_defaults(func=_api_key_new)


def _token(args: argparse.Namespace) -> int:
    from turnlog.auth.local import LocalSigningKey
    from turnlog.config import Settings

    try:
        key = LocalSigningKey.load_or_create(Settings.from_env().data_dir)
    except (OSError, ValueError) as e:
        print(f"turnlog token: cannot use the local signing key: {e}", file=sys.stderr)
        return 2
    subject = args.subject or _user_name()
    print(key.mint_token(args.tenant, args.scopes, subject=subject, ttl_s=args.ttl))
    return 0


def _user_name() -> str:
    from turnlog.auth.principal import is_valid_name

    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return "local"
    return name if is_valid_name(name) else "local"


def _api_key_new(args: argparse.Namespace) -> int:
    from turnlog.auth.api_keys import new_api_key

    key_text, entry = new_api_key(args.tenant, args.scopes)
    print("# The API key (shown only now; send it as 'x-api-key: <key>'):")
    print(key_text)
    print()
    print("# Add this table to the API keys file:")
    print(entry, end="")
    return 0
