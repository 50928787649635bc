"""PII redaction: e-mail addresses, phone numbers and payment card numbers.

Redaction runs in two passes, each over maximal *runs* of the characters its
patterns can contain, so that a pass never looks across a character outside
its run class:

1. e-mail addresses, over runs of ``[A-Za-z0-9._%+-@]``, become ``[EMAIL]``;
2. card numbers (13 to 19 digits in groups split by single spaces or dashes,
   valid by the Luhn check) become ``[CARD]``, then phone numbers (NANP
   shapes such as ``(415) 555-2671`` or ``415.555.2671``, and international
   numbers written with a leading ``+``, 8 to 15 digits) become ``[PHONE]``,
   over runs of ``[0-9 +().-]``.

Because a pass only ever rewrites whole runs, the streaming scanner can
release everything up to the last character outside the run class and hold
back only the trailing run, the only text that could still become (part of)
a match. The streamed output is therefore exactly the whole-text redaction
for any split into chunks, and the hold-back is as short as the patterns
allow (usually one partial word or number).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from turnlog.guardrails.contracts import ScanStep, TextCheck

EMAIL_PLACEHOLDER = "[EMAIL]"
PHONE_PLACEHOLDER = "[PHONE]"
CARD_PLACEHOLDER = "[CARD]"

_EMAIL_RUN_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-@")
_EMAIL_RUN = re.compile(r"[A-Za-z0-9._%+\-@]+")
# Bounded repetitions keep the scan linear on long runs without an address.
_EMAIL = re.compile(
    r"[A-Za-z0-9._%+\-]{1,64}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}"
    r"[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)

_NUMBER_RUN_CHARS = frozenset(string.digits + " +().-")
_NUMBER_RUN = re.compile(r"[0-9 +().\-]+")
_DIGIT_GROUPS = re.compile(r"(?<![+\d])\d+(?:[ \-]\d+)*")  # "+49..." is a phone, not a card
_GROUP = re.compile(r"\d+")
_PHONE = re.compile(
    r"(?<![\d+])(?:"
    # North American: (415) 555-2671, 415-555-2671, +1 415 555 2671
    r"(?:\+?1[ .\-]?)?(?:\(\d{3}\)[ .\-]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}"
    r"|"
    # International with a leading +: +44 20 7946 0958, +4915112345678
    r"\+\d{1,3}(?:[ .\-]?\(\d{1,4}\)|[ .\-]\d{1,5})*(?:[ .\-]?\d{1,12})?"
    r")(?!\d)"
)
_MIN_CARD_DIGITS = 13
_MAX_CARD_DIGITS = 19
_MIN_PHONE_DIGITS = 8
_MAX_PHONE_DIGITS = 15


def luhn_valid(digits: str) -> bool:
    """Return whether a string of decimal digits passes the Luhn check."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


@dataclass(slots=True)
class RedactionCounts:
    """How many of each kind a redaction replaced."""

    emails: int = 0
    phones: int = 0
    cards: int = 0

    def describe(self) -> str:
        """Return e.g. "redacted 1 email, 2 phone numbers" or "no PII found"."""
        parts = []
        for count, singular, plural in (
            (self.emails, "email address", "email addresses"),
            (self.phones, "phone number", "phone numbers"),
            (self.cards, "card number", "card numbers"),
        ):
            if count:
                parts.append(f"{count} {singular if count == 1 else plural}")
        return "redacted " + ", ".join(parts) if parts else "no PII found"


def _redact_emails_in_run(run: str, counts: RedactionCounts) -> str:
    if "@" not in run:
        return run

    def replace(_: re.Match[str]) -> str:
        counts.emails += 1
        return EMAIL_PLACEHOLDER

    return _EMAIL.sub(replace, run)


def _redact_cards(digits_run: str, counts: RedactionCounts) -> str:
    """Redact Luhn-valid card numbers among digit groups (greedy, longest first)."""
    groups = [(m.start(), m.end(), m.group()) for m in _GROUP.finditer(digits_run)]
    out: list[str] = []
    cursor = 0
    i = 0
    while i < len(groups):
        found = -1
        digits = ""
        for j in range(i, len(groups)):
            digits += groups[j][2]
            if len(digits) > _MAX_CARD_DIGITS:
                break
            if len(digits) >= _MIN_CARD_DIGITS and luhn_valid(digits):
                found = j
        if found < 0:
            i += 1
            continue
        out.append(digits_run[cursor : groups[i][0]])
        out.append(CARD_PLACEHOLDER)
        counts.cards += 1
        cursor = groups[found][1]
        i = found + 1
    out.append(digits_run[cursor:])
    return "".join(out)


def _redact_numbers_in_run(run: str, counts: RedactionCounts) -> str:
    if sum(char.isdigit() for char in run) < _MIN_PHONE_DIGITS:
        return run  # shorter than any card or phone number
    run = _DIGIT_GROUPS.sub(lambda m: _redact_cards(m.group(), counts), run)

    def replace(match: re.Match[str]) -> str:
        digit_count = sum(char.isdigit() for char in match.group())
        if not _MIN_PHONE_DIGITS <= digit_count <= _MAX_PHONE_DIGITS:
            return match.group()
        counts.phones += 1
        return PHONE_PLACEHOLDER

    return _PHONE.sub(replace, run)


@dataclass(frozen=True, slots=True)
class _RunPass:
    run: re.Pattern[str]
    run_chars: frozenset[str]
    redact_run: Callable[[str, RedactionCounts], str]

    def apply(self, text: str, counts: RedactionCounts) -> str:
        return self.run.sub(lambda m: self.redact_run(m.group(), counts), text)


_PASSES = (
    _RunPass(_EMAIL_RUN, _EMAIL_RUN_CHARS, _redact_emails_in_run),
    _RunPass(_NUMBER_RUN, _NUMBER_RUN_CHARS, _redact_numbers_in_run),
)


def redact(text: str) -> tuple[str, RedactionCounts]:
    """Return `text` with e-mails, card numbers and phone numbers replaced, and counts."""
    counts = RedactionCounts()
    for run_pass in _PASSES:
        text = run_pass.apply(text, counts)
    return text, counts


@dataclass(slots=True)
class _PassStream:
    """One pass over a stream: holds back only the trailing run of its class."""

    run_pass: _RunPass
    counts: RedactionCounts
    held: str = ""

    def feed(self, chunk: str) -> str:
        cut = len(chunk)
        while cut > 0 and chunk[cut - 1] in self.run_pass.run_chars:
            cut -= 1
        if cut == 0:  # the whole chunk continues the trailing run
            self.held += chunk
            return ""
        # chunk[cut - 1] ends every run before it: those runs are complete.
        ready = self.held + chunk[:cut]
        self.held = chunk[cut:]
        return self.run_pass.apply(ready, self.counts)

    def finish(self) -> str:
        ready, self.held = self.held, ""
        return self.run_pass.apply(ready, self.counts)


@dataclass(slots=True)
class _RedactionScanner:
    counts: RedactionCounts = field(default_factory=RedactionCounts)
    passes: list[_PassStream] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.passes = [_PassStream(run_pass, self.counts) for run_pass in _PASSES]

    def feed(self, chunk: str) -> ScanStep:
        for stream in self.passes:
            chunk = stream.feed(chunk)
        return ScanStep(release=chunk)

    def finish(self) -> ScanStep:
        text = ""
        for stream in self.passes:
            text = stream.feed(text) + stream.finish()
        return ScanStep(release=text, reason=self.counts.describe())


@dataclass(frozen=True, slots=True)
class PiiRedactor:
    """Replaces e-mail addresses, phone numbers and card numbers with placeholders.

    Never blocks. As a request guardrail it redacts the user's text before the
    model sees it; as a response guardrail it redacts the model's output, and
    its scanner streams with the exactness described in the module docstring.
    """

    name: str = "pii_redaction"
    version: str = "1"

    def check(self, text: str) -> TextCheck:
        """Return the redacted text; the reason counts what was redacted."""
        redacted, counts = redact(text)
        return TextCheck(text=redacted, reason=counts.describe())

    def scanner(self) -> _RedactionScanner:
        """Return a fresh streaming redactor (see `TextScanner` for the contract)."""
        return _RedactionScanner()
