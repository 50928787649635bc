"""Blocked terms: case-insensitive, word-boundary aware.

A term matches where it is not preceded and not followed by a word character
(``\\w``, Unicode-aware), ignoring case: the term "secret" matches "Secret!" and
"top SECRET", not "secretary". The streaming scanner holds back only the
trailing characters that could still be the start of a term (or a whole term
whose end is not yet confirmed by the next character), so a blocked term is
never released to a client, and it blocks exactly when the whole text would.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from turnlog.guardrails.contracts import ScanStep, TextCheck


def _prefix_pattern(term: str) -> str:
    """Return a pattern matching any non-empty prefix of `term`."""
    pattern = ""
    for char in reversed(term):
        pattern = re.escape(char) + (f"(?:{pattern})?" if pattern else "")
    return pattern


@dataclass(frozen=True, slots=True)
class _CompiledTerms:
    terms: tuple[str, ...]
    whole: re.Pattern[str]
    prefix_at_end: re.Pattern[str]

    @classmethod
    def of(cls, terms: Iterable[str]) -> _CompiledTerms:
        cleaned = tuple(sorted({t.strip() for t in terms if t.strip()}, key=lambda t: (-len(t), t)))
        if not cleaned:
            never = re.compile(r"(?!)")
            return cls((), never, never)
        whole = "|".join(re.escape(t) for t in cleaned)
        prefixes = "|".join(_prefix_pattern(t) for t in cleaned)
        return cls(
            cleaned,
            re.compile(rf"(?<!\w)(?:{whole})(?!\w)", re.IGNORECASE),
            re.compile(rf"(?<!\w)(?:{prefixes})\Z", re.IGNORECASE),
        )


def _reason(match: re.Match[str]) -> str:
    return f"the text contains the blocked term {match.group().lower()!r}"


@dataclass(slots=True)
class _TermScanner:
    compiled: _CompiledTerms
    context: str = ""  # the last released character, for the look-behind
    held: str = ""

    def feed(self, chunk: str) -> ScanStep:
        self.held += chunk
        window = self.context + self.held
        start = len(self.context)
        for match in self.compiled.whole.finditer(window, start):
            if match.end() < len(window):  # the next character confirms the boundary
                return ScanStep(block_reason=_reason(match))
        partial = self.compiled.prefix_at_end.search(window, start)
        cut = len(self.held) if partial is None else partial.start() - start
        released, self.held = self.held[:cut], self.held[cut:]
        if released:
            self.context = released[-1]
        return ScanStep(release=released)

    def finish(self) -> ScanStep:
        match = self.compiled.whole.search(self.context + self.held, len(self.context))
        if match is not None:
            return ScanStep(block_reason=_reason(match))
        released, self.held = self.held, ""
        return ScanStep(release=released, reason="no blocked term found")


@dataclass(frozen=True, slots=True)
class BlockedTerms:
    """Blocks a text that contains any of the configured terms.

    Args:
        terms: The terms; blank entries are ignored, duplicates merged. With no
            terms the guardrail allows everything.
    """

    terms: tuple[str, ...] = ()
    name: str = "blocked_terms"
    version: str = "1"
    _compiled: _CompiledTerms = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", _CompiledTerms.of(self.terms))

    def check(self, text: str) -> TextCheck:
        """Block when `text` contains a term; the reason names the term, not the text."""
        match = self._compiled.whole.search(text)
        if match is not None:
            return TextCheck(text=text, block_reason=_reason(match))
        return TextCheck(text=text, reason="no blocked term found")

    def scanner(self) -> _TermScanner:
        """Return a fresh streaming detector (see `TextScanner` for the contract)."""
        return _TermScanner(self._compiled)
