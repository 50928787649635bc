"""The sanitize stages beyond the user's text: tool calls, tool outputs, request fields (pure)."""

from __future__ import annotations

import json

import pytest

from turnlog.domain.events import GuardrailStage, SamplingParams, ToolCall, ToolDefinition, Verdict
from turnlog.guardrails import (
    BlockedTerms,
    FieldKind,
    FieldRefusedError,
    GuardrailPipeline,
    PiiRedactor,
    RequestField,
    ResponseContext,
    RetractText,
    StopResponse,
    ToolAllowList,
    ToolArgumentsSchema,
    ToolCallSanitizer,
    ToolCallSubject,
    check_json_or_text,
    conversation_fields,
    sampling_fields,
    text_digest,
    tool_call_text,
)

EMAIL = "bob.stone@example.org"
CARD = "4111 1111 1111 1111"
PHONE = "(415) 555-2671"
LOOKUP = ToolDefinition(name="lookup", parameters_json_schema=json.dumps({"type": "object"}))


# --- JSON-aware application ------------------------------------------------------


def test_json_is_sanitized_value_by_value_and_stays_valid() -> None:
    text = json.dumps(
        {
            "to": EMAIL,
            EMAIL: "as a key",
            "nested": [{"phone": PHONE}, f"card {CARD}"],
            "card": int(CARD.replace(" ", "")),
            "price": 1.50,
            "flags": [True, False, None],
        }
    )
    check = check_json_or_text(PiiRedactor(), text)
    assert json.loads(check.text) == {
        "to": "[EMAIL]",
        "[EMAIL]": "as a key",
        "nested": [{"phone": "[PHONE]"}, "card [CARD]"],
        "card": "[CARD]",  # a number that was a card number is the placeholder string
        "price": 1.5,
        "flags": [True, False, None],
    }
    assert check.block_reason is None
    assert "redacted" in check.reason
    assert EMAIL not in check.reason


def test_numbers_are_kept_as_written_and_unchanged_json_is_returned_byte_for_byte() -> None:
    unchanged = '{"a":1.50,  "b" : [1e5, -0, 12345678901234567890], "c": "plain"}'
    assert check_json_or_text(PiiRedactor(), unchanged).text == unchanged
    changed = check_json_or_text(PiiRedactor(), '{"a": 1.50, "b": 1e5, "to": "x@y.io"}')
    assert changed.text == '{"a": 1.50, "b": 1e5, "to": "[EMAIL]"}'


def test_an_escaped_address_is_seen_as_the_address_it_is() -> None:
    # Whole-text redaction would miss it: no "@" in the text.
    text = '{"to": "bob.stone\\u0040example.org"}'
    assert PiiRedactor().check(text).text == text
    assert json.loads(check_json_or_text(PiiRedactor(), text).text) == {"to": "[EMAIL]"}


def test_text_that_is_not_json_or_nests_too_deeply_is_checked_whole() -> None:
    assert check_json_or_text(PiiRedactor(), f"write to {EMAIL}").text == "write to [EMAIL]"
    deep = "[" * 100_000 + f'"{EMAIL}"' + "]" * 100_000
    assert EMAIL not in check_json_or_text(PiiRedactor(), deep).text


def test_a_block_inside_json_blocks_the_whole_text() -> None:
    check = check_json_or_text(BlockedTerms(("kaboom",)), '{"a": "fine", "b": ["say kaboom"]}')
    assert check.block_reason is not None
    assert check.text == '{"a": "fine", "b": ["say kaboom"]}'


# --- generated tool calls ---------------------------------------------------------


def test_tool_calls_are_sanitized_before_the_tool_call_guardrails() -> None:
    pipeline = GuardrailPipeline(
        sanitize_response=[PiiRedactor()], tool_calls=[ToolAllowList(), ToolArgumentsSchema()]
    )
    call = ToolCall(call_id="c1", name="lookup", arguments_json=json.dumps({"to": EMAIL}))
    outcome = pipeline.check_tool_calls(ToolCallSubject(calls=(call,), tool_definitions=(LOOKUP,)))
    assert outcome.blocked is None
    [sanitized] = outcome.tool_calls
    assert (sanitized.call_id, sanitized.name) == ("c1", "lookup")
    assert json.loads(sanitized.arguments_json) == {"to": "[EMAIL]"}
    redaction, allow, schema = outcome.decisions
    assert (redaction.guardrail, redaction.verdict) == ("pii_redaction", Verdict.MODIFY)
    assert redaction.stage is GuardrailStage.SANITIZE_RESPONSE
    assert redaction.before_digest == text_digest(tool_call_text(call))
    assert redaction.after_digest == text_digest(tool_call_text(sanitized))
    assert redaction.reason == "tool call 'c1': redacted 1 email address"
    assert (allow.verdict, schema.verdict) == (Verdict.ALLOW, Verdict.ALLOW)


def test_a_clean_call_passes_unchanged_and_records_only_the_tool_call_guardrails() -> None:
    call = ToolCall(call_id="c1", name="lookup", arguments_json='{"q":  "weather"}')
    check = ToolCallSanitizer(PiiRedactor()).check_call(call, {})
    assert check.call is call
    assert check.block_reason is None
    pipeline = GuardrailPipeline(sanitize_response=[PiiRedactor()], tool_calls=[ToolAllowList()])
    outcome = pipeline.check_tool_calls(ToolCallSubject(calls=(call,), tool_definitions=(LOOKUP,)))
    assert outcome.tool_calls == (call,)
    assert [d.guardrail for d in outcome.decisions] == ["tool_allow_list"]


def test_no_later_guardrail_quotes_personal_data_in_a_call_name() -> None:
    pipeline = GuardrailPipeline(sanitize_response=[PiiRedactor()], tool_calls=[ToolAllowList()])
    call = ToolCall(call_id="c1", name=EMAIL, arguments_json="{}")
    outcome = pipeline.check_tool_calls(ToolCallSubject(calls=(call,), tool_definitions=(LOOKUP,)))
    assert outcome.blocked is not None
    assert "[EMAIL]" in outcome.blocked.reason
    assert all(EMAIL not in d.reason for d in outcome.decisions)


def test_a_blocked_term_in_the_arguments_blocks_the_streamed_response() -> None:
    pipeline = GuardrailPipeline(
        sanitize_response=[PiiRedactor(), BlockedTerms(("kaboom",))], tool_calls=[ToolAllowList()]
    )
    stream = pipeline.response_stream(ResponseContext(tool_definitions=(LOOKUP,)))
    assert stream.feed("Calling the tool: ")  # streamed, so retracted on the block
    call = ToolCall(call_id="c1", name="lookup", arguments_json='{"q": "kaboom"}')
    outcome = stream.finish((call,))
    assert outcome.blocked is not None
    assert outcome.blocked.guardrail == "blocked_terms"
    assert outcome.tool_calls == ()
    assert [type(a) for a in outcome.actions] == [RetractText, StopResponse]
    # Text decisions (2), then the call's: the term blocked it (redaction
    # let it pass unchanged, which records nothing).
    assert [(d.guardrail, d.verdict) for d in outcome.decisions] == [
        ("pii_redaction", Verdict.ALLOW),
        ("blocked_terms", Verdict.ALLOW),
        ("blocked_terms", Verdict.BLOCK),
    ]


def test_a_profile_without_response_sanitizers_adds_no_tool_call_decision() -> None:
    pipeline = GuardrailPipeline(tool_calls=[ToolAllowList()])
    call = ToolCall(call_id="c1", name="lookup", arguments_json=json.dumps({"to": EMAIL}))
    outcome = pipeline.check_tool_calls(ToolCallSubject(calls=(call,), tool_definitions=(LOOKUP,)))
    assert outcome.tool_calls == (call,)
    assert [d.guardrail for d in outcome.decisions] == ["tool_allow_list"]


# --- texts entering the conversation (tool outputs, cancel reasons) -----------------


def test_a_clean_tool_result_passes_as_it_is_and_records_nothing() -> None:
    pipeline = GuardrailPipeline(sanitize_request=[PiiRedactor()])
    result = '{"result":  42}'
    outcome = pipeline.sanitize_input(result, subject="the result of tool call 'c1'")
    assert (outcome.text, outcome.decisions, outcome.blocked) == (result, (), None)


def test_a_tool_result_is_sanitized_with_a_decision_for_the_change() -> None:
    pipeline = GuardrailPipeline(sanitize_request=[PiiRedactor()])
    result = json.dumps({"owner": EMAIL, "phone": PHONE})
    outcome = pipeline.sanitize_input(result, subject="the result of tool call 'c1'")
    assert json.loads(outcome.text) == {"owner": "[EMAIL]", "phone": "[PHONE]"}
    [decision] = outcome.decisions
    assert decision.stage is GuardrailStage.SANITIZE_REQUEST
    assert decision.verdict is Verdict.MODIFY
    assert decision.before_digest == text_digest(result)
    assert decision.after_digest == text_digest(outcome.text)
    assert decision.reason.startswith("the result of tool call 'c1': redacted ")


def test_a_blocked_input_leaves_no_text_to_record() -> None:
    pipeline = GuardrailPipeline(sanitize_request=[PiiRedactor(), BlockedTerms(("kaboom",))])
    outcome = pipeline.sanitize_input(f"kaboom {EMAIL}", subject="the cancel reason")
    assert outcome.text == ""
    assert outcome.blocked is not None
    assert outcome.blocked.stage is GuardrailStage.SANITIZE_REQUEST
    assert [d.verdict for d in outcome.decisions] == [Verdict.MODIFY, Verdict.BLOCK]


# --- request fields: refused, never rewritten ------------------------------------------


def test_fields_a_sanitizer_would_change_are_refused_naming_field_and_guardrail() -> None:
    pipeline = GuardrailPipeline(profile="p", sanitize_request=[PiiRedactor()])
    with pytest.raises(FieldRefusedError) as refused:
        pipeline.check_fields(
            conversation_fields(
                system_prompt="Be brief.",
                labels=(("team", "a"),),
                tools=(),
                sampling=SamplingParams(stop=("END", f"call {PHONE}")),
            )
        )
    assert refused.value.metadata == {
        "field": "defaults.stop[1]",
        "guardrail": "pii_redaction",
        "guardrailProfile": "p",
    }
    assert PHONE not in refused.value.message


@pytest.mark.parametrize(
    "regex",
    [
        f".*{EMAIL}.*",
        r"bob\.stone@example\.org",
        r"\(415\) 555\-2671",
    ],
)
def test_a_regex_is_refused_as_written_and_with_its_escapes_removed(regex: str) -> None:
    pipeline = GuardrailPipeline(sanitize_request=[PiiRedactor()])
    with pytest.raises(FieldRefusedError):
        pipeline.check_fields(sampling_fields(SamplingParams(regex=regex), prefix="options"))


def test_regex_classes_are_not_personal_data() -> None:
    pipeline = GuardrailPipeline(sanitize_request=[PiiRedactor()])
    regex = r"\d{3}-\d{3}-\d{4}|[\w.]+@[\w.]+\.[a-z]{2,}"
    pipeline.check_fields(sampling_fields(SamplingParams(regex=regex), prefix="options"))


def test_a_blocking_sanitizer_refuses_and_a_profile_without_one_accepts() -> None:
    fields = (RequestField(path="system_prompt", text="say kaboom"),)
    with pytest.raises(FieldRefusedError, match="blocks system_prompt"):
        GuardrailPipeline(sanitize_request=[BlockedTerms(("kaboom",))]).check_fields(fields)
    GuardrailPipeline().check_fields(
        (*fields, RequestField(path="labels", text=EMAIL, kind=FieldKind.TEXT))
    )
