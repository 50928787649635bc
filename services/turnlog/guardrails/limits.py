"""Maximum length of a text, counted in Unicode code points."""

from __future__ import annotations

from dataclasses import dataclass

from turnlog.guardrails.contracts import ScanStep, TextCheck


@dataclass(slots=True)
class _LengthScanner:
    max_chars: int
    seen: int = 0

    def feed(self, chunk: str) -> ScanStep:
        self.seen += len(chunk)
        if self.seen > self.max_chars:
            return ScanStep(block_reason=_reason(self.max_chars))
        return ScanStep(release=chunk)

    def finish(self) -> ScanStep:
        return ScanStep(reason=f"{self.seen} of at most {self.max_chars} characters")


def _reason(max_chars: int) -> str:
    return f"the text is longer than {max_chars} characters"


@dataclass(frozen=True, slots=True)
class MaxLength:
    """Blocks a text longer than `max_chars` code points.

    Used as a conditional-execution guardrail it is the maximum input length;
    it streams too, as a cap on response length.
    """

    max_chars: int
    name: str = "max_input_length"
    version: str = "1"

    def __post_init__(self) -> None:
        if self.max_chars < 0:
            raise ValueError("max_chars must not be negative")

    def check(self, text: str) -> TextCheck:
        """Block when `len(text) > max_chars`."""
        if len(text) > self.max_chars:
            return TextCheck(text=text, block_reason=_reason(self.max_chars))
        return TextCheck(text=text, reason=f"{len(text)} of at most {self.max_chars} characters")

    def scanner(self) -> _LengthScanner:
        """Return a scanner that releases everything until the cap is passed."""
        return _LengthScanner(self.max_chars)
