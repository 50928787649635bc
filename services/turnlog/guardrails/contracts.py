"""The protocols guardrails implement, one per kind, and what they return.

A guardrail is any object with a stable `name`, a `version` and the method
of its kind. Guardrails are pure: no clock, randomness or I/O inside a
decision (request intercepts are the one async kind, for the I/O of adding
context; anything they need is passed in). Which stage a guardrail runs in is
the profile's choice (`turnlog.guardrails.registry`); the kinds are:

- `RequestIntercept`: rewrites the whole request (stage REQUEST_INTERCEPT).
- `TextGuardrail`: checks one text and may pass it, change it or block it
  (SANITIZE_REQUEST and CONDITIONAL_EXECUTION on the user's text,
  SANITIZE_RESPONSE on the final response text).
- `StreamingTextGuardrail`: a `TextGuardrail` that can also check streamed
  output chunk by chunk through a `TextScanner`.
- `ExecutionIntercept`: wraps the generation call (EXECUTION_INTERCEPT).
- `ToolCallGuardrail`: checks one generated tool call (SANITIZE_RESPONSE).

Verdicts are never claimed by a guardrail, they are derived by the pipeline
from what it returns: blocked, else changed (MODIFY), else ALLOW.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from turnlog.domain.events import ToolCall, ToolDefinition


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSubject:
    """The request a turn is about to send, as the request stages see it.

    Attributes:
        user_text: The new user message.
        system_prompt: The conversation's system prompt.
        model: The model the turn asks for.
        tool_definitions: The tools offered to the model in this turn.
        context: Extra context snippets for the prompt, in order; request
            intercepts may add to it and the orchestrator renders them.
        labels: The conversation's labels, for intercepts that route on them.
    """

    user_text: str
    system_prompt: str = ""
    model: str = ""
    tool_definitions: tuple[ToolDefinition, ...] = ()
    context: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class InterceptResult:
    """What a request intercept returns.

    Attributes:
        request: The request to continue with (the input itself when unchanged).
        block_reason: Set to block the turn, with a reason safe to show a client.
        reason: Why the request was (or was not) changed.
    """

    request: RequestSubject
    block_reason: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TextCheck:
    """What a text guardrail returns for one text.

    Attributes:
        text: The text to continue with (the input itself when unchanged).
        block_reason: Set to block, with a reason safe to show a client (it must
            not quote the checked text).
        reason: Why the text was (or was not) changed.
    """

    text: str
    block_reason: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanStep:
    """What a `TextScanner` returns for one chunk (or for the end of the stream).

    Attributes:
        release: Output text now safe to pass on (possibly changed), in order.
        block_reason: Set to block the stream; nothing is released with it.
        reason: The final reason; read from the `finish` step only.
    """

    release: str = ""
    block_reason: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallCheck:
    """What a tool-call guardrail returns for one call.

    Attributes:
        call: The call to continue with (the input itself when unchanged).
        block_reason: Set to block, with a reason safe to show a client.
        reason: Why the call was (or was not) changed.
    """

    call: ToolCall
    block_reason: str | None = None
    reason: str = ""


@runtime_checkable
class Guardrail(Protocol):
    """What every guardrail has: a stable name and a version."""

    @property
    def name(self) -> str:
        """Stable name, recorded in every decision."""
        ...

    @property
    def version(self) -> str:
        """Version, bumped whenever the guardrail's behaviour changes."""
        ...


@runtime_checkable
class RequestIntercept(Guardrail, Protocol):
    """Rewrites the request before any guardrail checks it."""

    async def intercept(self, request: RequestSubject) -> InterceptResult:
        """Return the request to continue with, or a block."""
        ...


@runtime_checkable
class TextGuardrail(Guardrail, Protocol):
    """Checks a whole text."""

    def check(self, text: str) -> TextCheck:
        """Return the text to continue with, or a block. Pure and deterministic."""
        ...


class TextScanner(Protocol):
    """Checks one stream of text, chunk by chunk; one scanner per stream.

    Contract: over any split of a text into chunks, the concatenation of every
    `release` (from `feed` and `finish`) equals `check(text).text` of the
    guardrail that made the scanner, and the scanner blocks (at some step)
    exactly when `check(text)` blocks. A scanner releases text as soon as no
    later chunk can change it, and releases nothing that a later chunk could
    turn into a block. After a block it is not fed again.
    """

    def feed(self, chunk: str) -> ScanStep:
        """Take the next chunk; return what is safe to release now, or a block."""
        ...

    def finish(self) -> ScanStep:
        """End the stream; return the rest of the output, or a block."""
        ...


@runtime_checkable
class StreamingTextGuardrail(TextGuardrail, Protocol):
    """A text guardrail that can also check a stream of text."""

    def scanner(self) -> TextScanner:
        """Return a fresh scanner for one stream."""
        ...


@runtime_checkable
class ToolCallGuardrail(Guardrail, Protocol):
    """Checks one tool call the model generated."""

    def check_call(self, call: ToolCall, tools: Mapping[str, ToolDefinition]) -> ToolCallCheck:
        """Return the call to continue with, or a block.

        Args:
            call: The generated call.
            tools: The tools offered in this turn, by name.
        """
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallSubject:
    """Generated tool calls and the tools that were offered.

    Attributes:
        calls: The calls, in the order the model made them.
        tool_definitions: The tools offered to the model in this turn.
    """

    calls: tuple[ToolCall, ...]
    tool_definitions: tuple[ToolDefinition, ...] = ()

    def tools_by_name(self) -> Mapping[str, ToolDefinition]:
        """Return the offered tools by name (the last definition of a name wins)."""
        return {tool.name: tool for tool in self.tool_definitions}


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseContext:
    """What a response stream needs to know about its turn.

    Attributes:
        tool_definitions: The tools offered to the model, for tool-call checks.
    """

    tool_definitions: tuple[ToolDefinition, ...] = field(default_factory=tuple)
