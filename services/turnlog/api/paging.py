"""AIP-158 paging, the same for every list RPC: page sizes coerced, page tokens bound to their request.

- `page_size`: 0 means the RPC's default and a size above its maximum is
  coerced to the maximum (AIP-158: a client asking for more than the
  service gives is not wrong, it just gets less); a negative one never
  gets here (the validation table refuses it).
- `page_token`: a token is only valid with the same other fields as the
  request that returned it (`page_size` and `view` may change). Each list
  RPC keeps its own cursor (an opaque string); `seal` wraps it with a
  fingerprint of the request's other fields and `open` unwraps it, refusing
  a token whose fingerprint differs, or that is not one of ours, with
  INVALID_ARGUMENT (reason INVALID_REQUEST, field `page_token`), so every
  list RPC refuses alike. A handler calls `open(request)` before it reads
  and `seal(request, next_cursor)` on the way out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Collection

from google.protobuf import message

from turnlog.api.status import FieldViolationsError

#: Fields a request may change between pages (AIP-158); the rest bind the token.
FREE_FIELDS: frozenset[str] = frozenset({"page_size", "page_token", "view"})


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """The page size to use: `default` for 0, at most `maximum` (AIP-158 coercion)."""
    return min(requested, maximum) if requested > 0 else default


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


def seal(request: message.Message, cursor: str) -> str:
    """The next_page_token for `cursor` ("" stays "": the last page)."""
    if not cursor:
        return ""
    raw = json.dumps({"q": fingerprint(request), "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def open(request: message.Message) -> str:
    """The cursor in `request.page_token` ("" without one).

    Raises:
        FieldViolationsError: the token is not one of ours, or was returned
            for a request with other fields (INVALID_ARGUMENT, `page_token`).
    """
    token: str = getattr(request, "page_token")  # noqa: B009 (any list request)
    if not token:
        return ""
    try:
        value = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, UnicodeDecodeError, binascii.Error):
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("c"), str) or not value["c"]:
        raise FieldViolationsError([("page_token", "not a next_page_token of this service")])
    if value.get("q") != fingerprint(request):
        raise FieldViolationsError(
            [
                (
                    "page_token",
                    "was returned for a request with other fields; only page_size and view "
                    "may change between pages",
                )
            ]
        )
    cursor: str = value["c"]
    return cursor


__all__ = ["FREE_FIELDS", "fingerprint", "open", "page_size", "seal"]
