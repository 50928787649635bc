"""Page tokens bound to their whole request (AIP-158), for any list RPC.

A token is only valid with the same other fields as the request that
returned it (`page_size` and `view` may change). A list RPC keeps its own
cursor (an opaque string); `token_for` wraps it with a fingerprint of the
request's other fields and `cursor_of` unwraps it, refusing a token whose
fingerprint differs, or that is not one of ours, with `PageTokenError`
(INVALID_ARGUMENT, reason INVALID_REQUEST, field `page_token`). Every list
RPC uses it (ListConversations, ReadEvents, ListTurns, ListMessages), so
they all refuse alike. A handler calls `cursor_of(request)` before it reads and
`token_for(request, next_cursor)` on the way out; sizes are coerced by
`conversation.paging.page_size`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Collection

from google.protobuf import message

from turnlog import errors

#: Fields a request may change between pages (AIP-158); the rest bind the token.
FREE_FIELDS: frozenset[str] = frozenset({"page_size", "page_token", "view"})


def fingerprint(request: message.Message, free: Collection[str] = FREE_FIELDS) -> str:
    """A digest of `request`'s fields other than `free` (deterministic serialization).

    Not a secret and not a signature: it only tells a token's own query from
    another one, so a short BLAKE2b digest does.
    """
    bound = type(request)()
    bound.CopyFrom(request)
    for name in free:
        if name in bound.DESCRIPTOR.fields_by_name:
            bound.ClearField(name)
    return hashlib.blake2b(bound.SerializeToString(deterministic=True), digest_size=12).hexdigest()


def token_for(request: message.Message, cursor: str) -> str:
    """The next_page_token for `cursor` ("" stays "": the last page)."""
    if not cursor:
        return ""
    raw = json.dumps({"q": fingerprint(request), "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor_of(request: message.Message) -> str:
    """The cursor in `request.page_token` ("" without one).

    Raises:
        PageTokenError: the token is not one of ours, or was returned for a
            request with other fields.
    """
    token: str = getattr(request, "page_token")  # noqa: B009 (any list request)
    if not token:
        return ""
    try:
        value = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, UnicodeDecodeError, binascii.Error):
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("c"), str) or not value["c"]:
        raise errors.PageTokenError("not a next_page_token of this service")
    if value.get("q") != fingerprint(request):
        raise errors.PageTokenError(
            "was returned for a request with other fields; only page_size and view "
            "may change between pages"
        )
    cursor: str = value["c"]
    return cursor


__all__ = ["FREE_FIELDS", "cursor_of", "fingerprint", "token_for"]
