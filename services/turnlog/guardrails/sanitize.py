"""The sanitize stages beyond the user's text: tool calls, tool outputs, request fields.

The user's message is not the only text that reaches the log or a tool
(docs/guardrails.md, "Paths"). The profile's sanitize guardrails (text
guardrails such as PII redaction) also apply to:

- **generated tool calls** (SANITIZE_RESPONSE): `ToolCallSanitizer` runs a
  response guardrail over the call's name and every JSON string, key and
  number of its arguments, and keeps the arguments valid JSON. The pipeline
  puts one before the profile's tool-call guardrails per response guardrail,
  so the tool, the log and every later guardrail only see the sanitized call;
- **texts that enter the conversation beside the user's message**
  (SANITIZE_REQUEST): a tool's result or error (server- or client-side) and a
  cancel reason, through `sanitize_text`, JSON-aware in the same way;
- **request fields the log records verbatim** (system prompt, labels, tool
  definitions, stop sequences, the structured-output regex): they are not
  rewritten but refused (`refuse_changed_fields`, `FieldRefusedError`) when a
  sanitize guardrail would change or block them.

Every change is a `GuardrailDecision` like the others (digests, MODIFY), so
the audit trail says what was changed and by which guardrail, never the text;
a block is one too. A check that lets its text pass unchanged records
nothing: tool calls and outputs come with every tool turn, and a clean one
is recorded exactly as before these checks existed, so recorded
conversations still regenerate with the same decisions (docs/history.md).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from turnlog import errors
from turnlog.domain.events import (
    GuardrailStage,
    SamplingParams,
    ToolCall,
    ToolDefinition,
    Verdict,
)
from turnlog.guardrails.contracts import TextCheck, TextGuardrail, ToolCallCheck
from turnlog.guardrails.records import Block, GuardrailDecision

# --- JSON-aware application of a text guardrail ------------------------------


@dataclass(frozen=True, slots=True)
class _Number:
    """A JSON number, kept as written (so an unchanged one re-serializes exactly)."""

    literal: str


class _JsonObject(list[tuple[str, Any]]):
    """A JSON object as its members in order (duplicate keys kept)."""


def _parse_json(text: str) -> Any:
    return json.loads(
        text,
        object_pairs_hook=_JsonObject,
        parse_int=_Number,
        parse_float=_Number,
        parse_constant=_Number,
    )


def _dump(node: Any) -> str:
    if isinstance(node, str):
        return json.dumps(node, ensure_ascii=False)
    if isinstance(node, _Number):
        return node.literal
    if isinstance(node, _JsonObject):
        return "{" + ", ".join(f"{_dump(key)}: {_dump(value)}" for key, value in node) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(_dump(item) for item in node) + "]"
    return json.dumps(node)  # true, false, null


class _JsonWalk:
    """Runs one guardrail over every string, key and number of a JSON document."""

    def __init__(self, guardrail: TextGuardrail) -> None:
        self.guardrail = guardrail
        self.checks: list[tuple[str, TextCheck]] = []
        self.block_reason: str | None = None

    @property
    def changed(self) -> bool:
        return any(check.text != before for before, check in self.checks)

    def text(self, value: str) -> str:
        if self.block_reason is not None:
            return value
        check = self.guardrail.check(value)
        self.checks.append((value, check))
        if check.block_reason is not None:
            self.block_reason = check.block_reason
            return value
        return check.text

    def node(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.text(node)
        if isinstance(node, _Number):
            # A card number written as a number becomes the placeholder string:
            # valid JSON still, and the digits are gone.
            out = self.text(node.literal)
            return node if out == node.literal else out
        if isinstance(node, _JsonObject):
            return _JsonObject((self.text(key), self.node(value)) for key, value in node)
        if isinstance(node, list):
            return [self.node(item) for item in node]
        return node


def join_reasons(reasons: Iterable[str], *, limit: int = 3) -> str:
    """The distinct non-empty reasons in order, at most `limit` of them named."""
    unique = list(dict.fromkeys(r for r in reasons if r))
    if len(unique) <= limit:
        return "; ".join(unique)
    return "; ".join(unique[:limit]) + f" (and {len(unique) - limit} more)"


def check_json_or_text(guardrail: TextGuardrail, text: str) -> TextCheck:
    """Run a text guardrail over a text that may be JSON, keeping JSON valid.

    A JSON text is checked value by value: every string and object key
    (decoded, so an escaped address such as ``bob\\u0040example.com`` is seen
    as the address it is) and every number (its literal; a changed number
    becomes a string). It is re-serialized only if something changed;
    otherwise the text is returned exactly as given. Anything that is not JSON
    (or nests too deeply to walk) is checked as one text.

    Returns:
        A `TextCheck` as the guardrail's own `check` would: the text to
        continue with, or a block; the reason joins the reasons of the
        values that changed (or of all values, when none did).
    """
    try:
        document = _parse_json(text)
    except (ValueError, RecursionError):
        return guardrail.check(text)
    walk = _JsonWalk(guardrail)
    try:
        out = walk.node(document)
        rendered = _dump(out) if walk.changed and walk.block_reason is None else text
    except RecursionError:
        return guardrail.check(text)
    if not walk.checks:  # nothing but structure, true, false or null
        return guardrail.check(text)
    if walk.block_reason is not None:
        return TextCheck(text=text, block_reason=walk.block_reason)
    changed = [check.reason for before, check in walk.checks if check.text != before]
    reason = join_reasons(changed if changed else (check.reason for _, check in walk.checks))
    return TextCheck(text=rendered, reason=reason)


# --- generated tool calls (SANITIZE_RESPONSE) ----------------------------------


def _about_call(call: ToolCall, reason: str) -> str:
    return f"tool call {call.call_id!r}: {reason}" if reason else f"tool call {call.call_id!r}"


@dataclass(frozen=True, slots=True)
class ToolCallSanitizer:
    """A response text guardrail applied to a generated tool call (a `ToolCallGuardrail`).

    Checks the call's name as a text and its arguments with
    `check_json_or_text`; the call it returns carries the sanitized name and
    arguments (still valid JSON when they were), which is what the tool is
    given and the log records. Its decisions carry the text guardrail's own
    name and version; the reason names the call.
    """

    guardrail: TextGuardrail

    @property
    def name(self) -> str:
        """The text guardrail's name."""
        return self.guardrail.name

    @property
    def version(self) -> str:
        """The text guardrail's version."""
        return self.guardrail.version

    def check_call(self, call: ToolCall, tools: Mapping[str, ToolDefinition]) -> ToolCallCheck:
        """Return the call with its name and arguments sanitized, or a block."""
        name = self.guardrail.check(call.name)
        if name.block_reason is not None:
            return ToolCallCheck(call=call, block_reason=_about_call(call, name.block_reason))
        arguments = check_json_or_text(self.guardrail, call.arguments_json)
        if arguments.block_reason is not None:
            return ToolCallCheck(call=call, block_reason=_about_call(call, arguments.block_reason))
        changed = [
            check.reason
            for before, check in ((call.name, name), (call.arguments_json, arguments))
            if check.text != before
        ]
        if not changed:
            return ToolCallCheck(call=call, reason=_about_call(call, arguments.reason))
        return ToolCallCheck(
            call=dataclasses.replace(call, name=name.text, arguments_json=arguments.text),
            reason=_about_call(call, join_reasons(changed)),
        )


# --- texts entering the conversation (SANITIZE_REQUEST) -------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TextOutcome:
    """The result of the sanitize guardrails over one text.

    Attributes:
        text: The text to record and pass on; "" when blocked (nothing of a
            blocked text may be recorded).
        decisions: One per guardrail that changed or blocked the text, in order.
        blocked: The block, if a guardrail blocked (the later ones did not run).
    """

    text: str
    decisions: tuple[GuardrailDecision, ...]
    blocked: Block | None = None


def sanitize_text(
    stage: GuardrailStage,
    guardrails: Sequence[TextGuardrail],
    text: str,
    *,
    subject: str,
) -> TextOutcome:
    """Run `guardrails` in order over `text` (JSON-aware), stopping at the first block.

    A decision is made for each guardrail that changed (MODIFY) or blocked
    the text, none for one that let it pass unchanged: these texts come with
    every tool call, and a clean one leaves the log as it was before they
    were checked (recorded conversations regenerate with the same decisions).

    Args:
        stage: The stage the decisions are recorded in.
        guardrails: The stage's text guardrails.
        text: The text as it arrived.
        subject: What the text is (e.g. "the result of tool call 'c1'"),
            prefixed to each decision's reason; it must not quote the text.
    """
    decisions: list[GuardrailDecision] = []
    for guardrail in guardrails:
        check = check_json_or_text(guardrail, text)
        blocked = check.block_reason is not None
        reason = check.block_reason or check.reason
        decision = GuardrailDecision.of(
            stage=stage,
            guardrail=guardrail.name,
            guardrail_version=guardrail.version,
            before=text,
            after=text if blocked else check.text,
            blocked=blocked,
            reason=f"{subject}: {reason}" if reason else subject,
        )
        if decision.verdict is not Verdict.ALLOW:
            decisions.append(decision)
        if blocked:
            return TextOutcome(
                text="", decisions=tuple(decisions), blocked=Block.from_decision(decision)
            )
        text = check.text
    return TextOutcome(text=text, decisions=tuple(decisions))


# --- request fields recorded verbatim ------------------------------------------


class FieldKind(enum.Enum):
    """How a request field is checked."""

    TEXT = enum.auto()
    """Checked as one text."""
    JSON = enum.auto()
    """Checked value by value (`check_json_or_text`)."""
    REGEX = enum.auto()
    """Checked as written and with its punctuation escapes removed
    (``alice@example\\.com`` is checked as ``alice@example.com`` too)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestField:
    """One request field the log records as given.

    Attributes:
        path: The field as the API names it (``system_prompt``,
            ``defaults.stop[0]``); never a value (a label is just ``labels``).
        text: The field's text.
        kind: How it is checked.
    """

    path: str
    text: str
    kind: FieldKind = FieldKind.TEXT


class FieldRefusedError(errors.InvalidArgumentError):
    """A request field the log records verbatim would be changed (or blocked) by a
    sanitize guardrail of the conversation's profile.

    Such fields (system prompt, labels, tool definitions, stop sequences, the
    structured-output regex) are refused rather than rewritten: a rewritten
    stop sequence or regex means something else, a rewritten label no longer
    finds its conversations, a rewritten instruction changes the behaviour
    silently. Metadata: `field` (the API path), `guardrail`, `guardrailProfile`.
    """

    reason = "FIELD_REFUSED_BY_GUARDRAIL"


_PUNCTUATION_ESCAPE = re.compile(r"\\([^0-9A-Za-z])")


def _forms(field: RequestField) -> tuple[str, ...]:
    if field.kind is FieldKind.REGEX:
        unescaped = _PUNCTUATION_ESCAPE.sub(r"\1", field.text)
        return (field.text,) if unescaped == field.text else (field.text, unescaped)
    return (field.text,)


def refuse_changed_fields(
    guardrails: Sequence[TextGuardrail], fields: Iterable[RequestField], *, profile: str
) -> None:
    """Raise `FieldRefusedError` for the first field a guardrail would change or block.

    Raises:
        FieldRefusedError: Naming the field and the guardrail, with the
            guardrail's reason (never the field's text).
    """
    for field in fields:
        if not field.text:
            continue
        for text in _forms(field):
            for guardrail in guardrails:
                check = (
                    check_json_or_text(guardrail, text)
                    if field.kind is FieldKind.JSON
                    else guardrail.check(text)
                )
                if check.block_reason is not None:
                    message = (
                        f"guardrail {guardrail.name!r} blocks {field.path} ({check.block_reason})"
                    )
                elif check.text != text:
                    message = (
                        f"guardrail {guardrail.name!r} would change {field.path} ({check.reason}); "
                        "this field is recorded as given, so it must pass unchanged"
                    )
                else:
                    continue
                raise FieldRefusedError(
                    message,
                    metadata={
                        "field": field.path,
                        "guardrail": guardrail.name,
                        "guardrailProfile": profile,
                    },
                )


def sampling_fields(sampling: SamplingParams, *, prefix: str) -> tuple[RequestField, ...]:
    """The stop sequences and structured-output regex of `sampling`, under `prefix`
    (``defaults`` for a conversation's, ``options`` for a turn's)."""
    fields = [
        RequestField(path=f"{prefix}.stop[{index}]", text=stop)
        for index, stop in enumerate(sampling.stop)
    ]
    if sampling.regex is not None:
        fields.append(
            RequestField(
                path=f"{prefix}.first_generation_regex", text=sampling.regex, kind=FieldKind.REGEX
            )
        )
    return tuple(fields)


def conversation_fields(
    *,
    system_prompt: str,
    labels: Iterable[tuple[str, str]],
    tools: Iterable[ToolDefinition],
    sampling: SamplingParams,
) -> tuple[RequestField, ...]:
    """The fields of a conversation's creation that the log records verbatim.

    Identifiers (request and conversation ids, model, profile and tool names)
    are keys, not text, and are not checked (docs/guardrails.md, "Paths").
    """
    fields = [RequestField(path="system_prompt", text=system_prompt)]
    for key, value in labels:
        fields += [RequestField(path="labels", text=key), RequestField(path="labels", text=value)]
    for index, tool in enumerate(tools):
        fields += [
            RequestField(path=f"tools[{index}].description", text=tool.description),
            RequestField(
                path=f"tools[{index}].parameters_json_schema",
                text=tool.parameters_json_schema,
                kind=FieldKind.JSON,
            ),
        ]
    return (*fields, *sampling_fields(sampling, prefix="defaults"))


__all__ = [
    "FieldKind",
    "FieldRefusedError",
    "RequestField",
    "TextOutcome",
    "ToolCallSanitizer",
    "check_json_or_text",
    "conversation_fields",
    "join_reasons",
    "refuse_changed_fields",
    "sampling_fields",
    "sanitize_text",
]
