"""A request intercept that normalises the user's text.

Unicode NFKC folds compatibility characters (full-width letters, ligatures)
and invisible format characters (zero-width spaces and joiners, the byte order
mark) are removed, so later guardrails such as blocked terms cannot be
dodged by writing a term in look-alike or interleaved characters.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from dataclasses import dataclass

from turnlog.guardrails.contracts import InterceptResult, RequestSubject

_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))


def normalize_text(text: str) -> str:
    """Return `text` in NFKC with zero-width and soft-hyphen characters removed."""
    return unicodedata.normalize("NFKC", text.translate(_INVISIBLE))


@dataclass(frozen=True, slots=True)
class NormalizeText:
    """Rewrites the user text to `normalize_text(user_text)`; never blocks."""

    name: str = "normalize_text"
    version: str = "1"

    async def intercept(self, request: RequestSubject) -> InterceptResult:
        """Return the request with its user text normalised."""
        normalized = normalize_text(request.user_text)
        if normalized == request.user_text:
            return InterceptResult(request=request, reason="already normalised")
        return InterceptResult(
            request=dataclasses.replace(request, user_text=normalized),
            reason="normalised to NFKC without invisible characters",
        )
