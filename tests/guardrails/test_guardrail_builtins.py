"""Each built-in guardrail allows, modifies and blocks as it promises."""

from __future__ import annotations

import json

import pytest

from turnlog.domain.events import ToolCall, ToolDefinition
from turnlog.guardrails import (
    BlockedTerms,
    MaxLength,
    NormalizeText,
    PiiRedactor,
    RequestSubject,
    ToolAllowList,
    ToolArgumentsSchema,
)
from turnlog.guardrails.pii import luhn_valid

VISA = "4111 1111 1111 1111"  # a Luhn-valid test number
NOT_LUHN = "4111 1111 1111 1112"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe+x@mail.example.org today", "write to [EMAIL] today"),
        ("call (415) 555-2671.", "call [PHONE]."),
        ("call 415.555.2671 or +44 20 7946 0958", "call [PHONE] or [PHONE]"),
        ("ring +4915112345678!", "ring [PHONE]!"),
        (f"card {VISA}, thanks", "card [CARD], thanks"),
        ("card 4111-1111-1111-1111 exp 12/25", "card [CARD] exp 12/25"),
        ("4111111111111111 12", "[CARD] 12"),
    ],
)
def test_pii_redactor_modifies(text: str, expected: str) -> None:
    check = PiiRedactor().check(text)
    assert check.text == expected
    assert check.block_reason is None
    assert check.reason.startswith("redacted ")


@pytest.mark.parametrize(
    "text",
    [
        "no personal data here, meet at 10:30 on 2024-01-15",
        f"a number that fails Luhn: {NOT_LUHN}",
        "order 12345678 shipped in 2019 2020",
        "an @ sign alone, and user@localhost",
    ],
)
def test_pii_redactor_allows(text: str) -> None:
    check = PiiRedactor().check(text)
    assert check.text == text
    assert check.reason == "no PII found"


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


def test_blocked_terms_block_case_insensitively_on_word_boundaries() -> None:
    guardrail = BlockedTerms(("secret plan", "zork"))
    assert guardrail.check("our SECRET Plan is out").block_reason is not None
    assert guardrail.check("Zork!").block_reason is not None
    assert guardrail.check("zork").block_reason is not None


@pytest.mark.parametrize("text", ["zorkmid", "the secret planet", "xzork", "nothing"])
def test_blocked_terms_allow_inside_words(text: str) -> None:
    check = BlockedTerms(("secret plan", "zork")).check(text)
    assert check.block_reason is None
    assert check.text == text


def test_blocked_terms_reason_names_the_term_not_the_text() -> None:
    check = BlockedTerms(("zork",)).check("my password is hunter2, ZORK")
    assert check.block_reason == "the text contains the blocked term 'zork'"


def test_no_blocked_terms_allows_everything() -> None:
    assert BlockedTerms(()).check("anything").block_reason is None
    assert BlockedTerms(("  ",)).scanner().feed("anything").release == "anything"


def test_max_length_allows_up_to_the_limit_and_blocks_beyond() -> None:
    guardrail = MaxLength(5)
    assert guardrail.check("héllo").block_reason is None
    assert guardrail.check("hello!").block_reason == "the text is longer than 5 characters"


async def test_normalize_text_rewrites_and_allows() -> None:
    request = RequestSubject(user_text="\uff5a\uff4f\uff52\uff4b z\u200bork")  # full-width "zork"
    result = await NormalizeText().intercept(request)
    assert result.request.user_text == "zork zork"
    same = await NormalizeText().intercept(RequestSubject(user_text="plain"))
    assert same.request == RequestSubject(user_text="plain")


WEATHER = ToolDefinition(
    name="get_weather",
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
            "additionalProperties": False,
        }
    ),
)
TOOLS = {WEATHER.name: WEATHER, "shell": ToolDefinition(name="shell")}


def _call(name: str = "get_weather", arguments: str = '{"city": "Oslo"}') -> ToolCall:
    return ToolCall(call_id="c1", name=name, arguments_json=arguments)


def test_tool_allow_list() -> None:
    assert ToolAllowList().check_call(_call(), TOOLS).block_reason is None
    assert ToolAllowList().check_call(_call("rm_rf"), TOOLS).block_reason is not None
    listed = ToolAllowList.of(["get_weather"])
    assert listed.check_call(_call(), TOOLS).block_reason is None
    assert listed.check_call(_call("shell", "{}"), TOOLS).block_reason == (
        "tool 'shell' is not on the allow-list"
    )


@pytest.mark.parametrize(
    "arguments",
    ['{"city": "Oslo"}', '{"city": "Oslo", "days": 3}'],
)
def test_tool_arguments_schema_allows_valid_arguments(arguments: str) -> None:
    check = ToolArgumentsSchema().check_call(_call(arguments=arguments), TOOLS)
    assert check.block_reason is None
    assert check.call == _call(arguments=arguments)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ('{"days": 2}', "keyword 'required'"),
        ('{"city": "Oslo", "days": 0}', "at $.days (keyword 'minimum')"),
        ('{"city": 7}', "at $.city (keyword 'type')"),
        ('{"city": "Oslo", "x": 1}', "keyword 'additionalProperties'"),
        ('{"city": ', "not valid JSON"),
    ],
)
def test_tool_arguments_schema_blocks_invalid_arguments(arguments: str, fragment: str) -> None:
    check = ToolArgumentsSchema().check_call(_call(arguments=arguments), TOOLS)
    assert check.block_reason is not None
    assert fragment in check.block_reason
    assert "Oslo" not in check.block_reason  # values are never quoted


def test_tool_arguments_schema_blocks_unknown_tool_and_bad_schema() -> None:
    assert ToolArgumentsSchema().check_call(_call("nope"), TOOLS).block_reason is not None
    bad = {"t": ToolDefinition(name="t", parameters_json_schema='{"type": 12}')}
    check = ToolArgumentsSchema().check_call(_call("t", "{}"), bad)
    assert check.block_reason == "the parameter schema of tool 't' is not a valid JSON schema"
