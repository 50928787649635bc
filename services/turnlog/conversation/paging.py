"""Paging for the list RPCs (AIP-158): page sizes, and pages over a folded conversation.

- `page_size`: 0 is the RPC's default, above its maximum is the maximum.
- `page_of`: one page of a conversation's messages or turns. Those lists only
  ever grow at the end, so a position (an index, counted from the oldest)
  stays valid while the conversation grows, and paging in either direction
  returns every item once, with no gap or repeat, even while new ones
  arrive. The position travels as the page's *cursor* (the index as text).
- `make_token`/`read_token`: an opaque cursor of several values (ReadEvents'
  position in the log, `turnlog.history.service`).

A cursor is never a client's page token by itself: `turnlog.api.page_tokens`
binds it to the whole request that made it, so every list RPC refuses a
token reused with other fields alike.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from turnlog import errors

T = TypeVar("T")


def make_token(payload: Mapping[str, object]) -> str:
    """The opaque cursor of `payload` (a JSON object)."""
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


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """AIP-158's page size: 0 is `default`, above `maximum` is `maximum`.

    A negative size never gets here (the validation table refuses it).
    """
    return default if requested <= 0 else min(requested, maximum)


@dataclass(frozen=True, slots=True, kw_only=True)
class Page(Generic[T]):
    """One page of a list: its items, the next page's cursor ("" on the last) and the total."""

    items: tuple[T, ...]
    next_cursor: str
    total_size: int


def page_of(
    items: Sequence[T],
    *,
    size: int,
    cursor: str = "",
    newest_first: bool = False,
) -> Page[T]:
    """One page of `items` (oldest first as given; `newest_first` reverses the order).

    `cursor` is "" for the first page, else a previous page's `next_cursor`:
    the index (counted from the oldest item) where the page starts; only
    that slice of `items` is copied.

    Raises:
        PageTokenError: a cursor that is not such an index.
    """
    total = len(items)
    # `start` is where this page begins: an index for oldest first, the index
    # one past the first item for newest first (so 0 means "nothing left").
    start = total if newest_first else 0
    if cursor:
        if not cursor.isdigit() or int(cursor) > total:
            raise _malformed()
        start = int(cursor)
    if newest_first:
        end = max(start - size, 0)
        chunk = tuple(reversed(items[end:start]))
        more, next_start = end > 0, end
    else:
        end = min(start + size, total)
        chunk = tuple(items[start:end])
        more, next_start = end < total, end
    return Page(items=chunk, next_cursor=str(next_start) if more else "", total_size=total)


__all__ = ["Page", "make_token", "page_of", "page_size", "read_token"]
