"""Page tokens and page sizes of the list RPCs (AIP-158), one scheme for all of them.

A page token is opaque to clients: URL-safe base64 (unpadded) of a small
JSON object. It holds where the next page starts and the *scope* of the
request that made it (the fields other than page_size and view), so that a
token used with other fields is refused (`INVALID_ARGUMENT` on page_token)
instead of silently paging through something else. `ReadEvents`
(`turnlog.history.service`) and `ListTurns`/`ListMessages` (here) use it.

The lists here page over a folded conversation: its messages and turns only
ever grow at the end, so a position (an index, counted from the oldest) stays
valid while the conversation grows, and paging in either direction returns
every item once, with no gap or repeat, even while new ones arrive.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from turnlog import errors

T = TypeVar("T")

#: A JSON value a page token's scope may hold.
Scope = Mapping[str, object]


def make_token(payload: Mapping[str, object]) -> str:
    """The opaque page token of `payload` (a JSON object)."""
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(token: str) -> dict[str, object]:
    """The payload of a token made by `make_token`.

    Raises:
        InvalidArgumentError: not one of our tokens (metadata `field`: page_token).
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _malformed() from e
    if not isinstance(value, dict):
        raise _malformed()
    return value


def _malformed() -> errors.PageTokenError:
    return errors.PageTokenError("malformed page token")


def other_query() -> errors.PageTokenError:
    """The refusal of a token made for a request with other fields."""
    return errors.PageTokenError("the page token was made for another query")


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """AIP-158's page size: 0 is `default`, above `maximum` is `maximum`.

    A negative size never gets here (the validation table refuses it).
    """
    return default if requested <= 0 else min(requested, maximum)


@dataclass(frozen=True, slots=True, kw_only=True)
class Page(Generic[T]):
    """One page of a list: its items, the next page's token ("" on the last) and the total."""

    items: tuple[T, ...]
    next_page_token: str
    total_size: int


def page_of(
    items: Sequence[T],
    *,
    size: int,
    token: str,
    scope: Scope,
    newest_first: bool = False,
) -> Page[T]:
    """One page of `items` (oldest first as given; `newest_first` reverses the order).

    The token records the index (counted from the oldest item) where the
    next page starts and `scope`; only that slice of `items` is copied.

    Raises:
        InvalidArgumentError: a malformed token, or one made for another scope.
    """
    total = len(items)
    # `start` is where this page begins: an index for oldest first, the index
    # one past the first item for newest first (so 0 means "nothing left").
    start = total if newest_first else 0
    if token:
        saved = read_token(token)
        if saved.get("s") != dict(scope) or saved.get("n") != newest_first:
            raise other_query()
        at = saved.get("i")
        if type(at) is not int or not 0 <= at <= total:
            raise _malformed()
        start = at
    if newest_first:
        end = max(start - size, 0)
        chunk = tuple(reversed(items[end:start]))
        more, next_start = end > 0, end
    else:
        end = min(start + size, total)
        chunk = tuple(items[start:end])
        more, next_start = end < total, end
    next_token = make_token({"s": dict(scope), "n": newest_first, "i": next_start}) if more else ""
    return Page(items=chunk, next_page_token=next_token, total_size=total)


__all__ = ["Page", "make_token", "other_query", "page_of", "page_size", "read_token"]
