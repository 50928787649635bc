"""Streamed output is checked exactly as the whole text would be, for any chunking."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from turnlog.guardrails import BlockedTerms, PiiRedactor, TextGuardrail
from turnlog.guardrails.contracts import StreamingTextGuardrail

EMAILS = st.sampled_from(
    ["a@b.co", "jane.doe+tag@mail.example.org", "x_y%z@sub-domain.example.com", "bob@example.io"]
)
PHONES = st.sampled_from(
    ["(415) 555-2671", "415-555-2671", "415.555.2671", "+1 415 555 2671", "+44 20 7946 0958"]
)
CARDS = st.sampled_from(
    ["4111 1111 1111 1111", "4111-1111-1111-1111", "5500000000000004", "378282246310005"]
)
FILLER = st.text(
    alphabet=st.sampled_from(list("abc XYZ019.,-+()@_%\n\té")), min_size=0, max_size=12
)
TEXTS = st.lists(st.one_of(FILLER, EMAILS, PHONES, CARDS), max_size=12).map("".join)


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def _stream(guardrail: StreamingTextGuardrail, chunks: list[str]) -> tuple[str, str | None]:
    scanner = guardrail.scanner()
    out: list[str] = []
    for chunk in chunks:
        step = scanner.feed(chunk)
        if step.block_reason is not None:
            return "".join(out), step.block_reason
        out.append(step.release)
    end = scanner.finish()
    if end.block_reason is not None:
        return "".join(out), end.block_reason
    out.append(end.release)
    return "".join(out), None


@settings(max_examples=400, deadline=None)
@given(TEXTS, st.lists(st.integers(min_value=0, max_value=300), max_size=40))
def test_streaming_redaction_equals_whole_text_redaction(text: str, cuts: list[int]) -> None:
    guardrail = PiiRedactor()
    streamed, blocked = _stream(guardrail, _chunks(text, cuts))
    assert blocked is None
    assert streamed == guardrail.check(text).text


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_streaming_redaction_one_character_at_a_time(text: str) -> None:
    guardrail = PiiRedactor()
    streamed, _ = _stream(guardrail, list(text))
    assert streamed == guardrail.check(text).text


def test_redactor_holds_back_only_the_trailing_run() -> None:
    # Spaces can be part of a phone number, so a trailing space is held too.
    scanner = PiiRedactor().scanner()
    assert scanner.feed("Hello, mail jane").release == "Hello, mail"
    assert scanner.feed(".doe@exa").release == ""
    assert scanner.feed("mple.com and (415) 555-").release == " [EMAIL] and"
    assert scanner.feed("2671.\n").release == " [PHONE].\n"
    assert scanner.finish().reason == "redacted 1 email address, 1 phone number"


def test_redaction_never_releases_a_prefix_of_the_secret() -> None:
    scanner = PiiRedactor().scanner()
    released = "".join(scanner.feed(c).release for c in "card 4111 1111 1111 1111 ok")
    released += scanner.finish().release
    assert released == "card [CARD] ok"


WORDS = st.sampled_from(["zork", "ZORK", "Zorkmid", "secret", "plan", "secret plan", "a", "xzork"])
TERM_TEXTS = st.lists(
    st.one_of(WORDS, st.text(alphabet=" .,!\nqé_1", max_size=3)), max_size=10
).map("".join)


@settings(max_examples=400, deadline=None)
@given(TERM_TEXTS, st.lists(st.integers(min_value=0, max_value=80), max_size=20))
def test_streaming_blocked_terms_agree_with_whole_text(text: str, cuts: list[int]) -> None:
    guardrail = BlockedTerms(("zork", "secret plan"))
    streamed, blocked = _stream(guardrail, _chunks(text, cuts))
    whole = guardrail.check(text)
    assert (blocked is not None) == (whole.block_reason is not None)
    if blocked is None:
        assert streamed == text
    else:
        # Nothing from the start of the first match on was released.
        match = guardrail._compiled.whole.search(text)
        assert match is not None
        assert len(streamed) <= match.start()
        assert text.startswith(streamed)


def test_blocked_term_scanner_holds_only_a_possible_term_start() -> None:
    scanner = BlockedTerms(("zork",)).scanner()
    assert scanner.feed("I like zo").release == "I like "
    assert scanner.feed("rkmid and zo").release == "zorkmid and "
    assert scanner.feed("rk").release == ""  # a whole term, boundary not yet seen
    assert scanner.feed("!").block_reason == "the text contains the blocked term 'zork'"


def test_text_guardrails_satisfy_the_protocols() -> None:
    for guardrail in (PiiRedactor(), BlockedTerms(("x",))):
        assert isinstance(guardrail, StreamingTextGuardrail)
        assert isinstance(guardrail, TextGuardrail)
