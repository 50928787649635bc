"""The sanitize-response stage: response text (streamed or whole) and tool calls.

`ResponseStreamFilter` runs the profile's response guardrails over one
generation's output as it streams. For each delta the orchestrator calls
`feed`, and applies the returned `StreamAction`s to the client stream in
order; at the end it calls `finish` with the generated tool calls and applies
`ResponseOutcome.actions`.

What a client sees when a response guardrail blocks (see docs/guardrails.md):

- STREAMING mode: text is emitted as soon as every guardrail has released it
  (guardrails hold back only what could still change). On a block the filter
  returns `RetractText(start=0, end=<characters emitted so far>)`, meaning
  "discard this response's text you were shown", then
  `StopResponse(block)`, the outcome. The blocked text itself was never
  released, as the built-in scanners hold back any text that could still
  turn into a block. The orchestrator stops the generation.
- BUFFERED mode: nothing is emitted until every guardrail, tool calls
  included, has passed the whole response; then one `EmitText` carries it.
  A block is just `StopResponse(block)`: nothing to retract.

Either way the client always gets an explicit outcome, never silence.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from turnlog.domain.events import GuardrailStage, ToolCall, ToolDefinition, Verdict
from turnlog.guardrails.contracts import (
    ScanStep,
    StreamingTextGuardrail,
    TextGuardrail,
    TextScanner,
    ToolCallGuardrail,
    ToolCallSubject,
)
from turnlog.guardrails.records import Block, GuardrailDecision, tool_call_text

_STAGE = GuardrailStage.SANITIZE_RESPONSE


class ResponseMode(enum.StrEnum):
    """How response text reaches a streaming client."""

    STREAMING = "streaming"
    """Emit text as soon as the guardrails release it; retract it on a block."""
    BUFFERED = "buffered"
    """Emit nothing until the whole response has passed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EmitText:
    """Send `text` to the client; it starts at character `start` of this response."""

    text: str
    start: int

    @property
    def end(self) -> int:
        """The character offset just past `text`."""
        return self.start + len(self.text)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetractText:
    """Tell the client to discard characters [`start`, `end`) of this response.

    Offsets count Unicode code points of the text emitted for this one
    generation (`EmitText.start`/`end`), from 0.
    """

    start: int
    end: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StopResponse:
    """The response is blocked: stop generating and report `block` to the client."""

    block: Block


StreamAction = EmitText | RetractText | StopResponse


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallOutcome:
    """The result of the tool-call guardrails.

    Attributes:
        tool_calls: The calls to execute (possibly changed); empty when blocked.
        decisions: One per guardrail per call checked, call by call, in order.
        blocked: The first block; later calls and guardrails are not checked.
    """

    tool_calls: tuple[ToolCall, ...]
    decisions: tuple[GuardrailDecision, ...]
    blocked: Block | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseOutcome:
    """The result of the sanitize-response stage for one generation.

    Attributes:
        final_text: The response text that passed (redacted where modified);
            empty when blocked.
        tool_calls: The tool calls that passed; empty when blocked.
        decisions: In stage order: text guardrails in profile order, then
            tool-call guardrails call by call. On a block, text decisions
            stop at the guardrail that blocked.
        blocked: The block, if any.
        actions: Stream actions still to apply, from `finish` (the rest of
            the text, or a retraction and the stop); empty when a block was
            already returned by `feed`.
    """

    final_text: str
    tool_calls: tuple[ToolCall, ...]
    decisions: tuple[GuardrailDecision, ...]
    blocked: Block | None = None
    actions: tuple[StreamAction, ...] = ()


def check_tool_calls(
    guardrails: Sequence[ToolCallGuardrail],
    subject: ToolCallSubject,
    *,
    sanitizers: Sequence[ToolCallGuardrail] = (),
) -> ToolCallOutcome:
    """Run tool-call guardrails over every call, stopping at the first block.

    `sanitizers` run first on each call; they record a decision only when
    they change or block it (an unchanged call adds nothing to the log, so a
    clean tool turn is recorded as before they existed). `guardrails` record
    one decision each, ALLOW included.
    """
    tools: Mapping[str, ToolDefinition] = subject.tools_by_name()
    decisions: list[GuardrailDecision] = []
    passed: list[ToolCall] = []
    quiet = len(sanitizers)
    for call in subject.calls:
        for index, guardrail in enumerate((*sanitizers, *guardrails)):
            result = guardrail.check_call(call, tools)
            decision = GuardrailDecision.of(
                stage=_STAGE,
                guardrail=guardrail.name,
                guardrail_version=guardrail.version,
                before=tool_call_text(call),
                after=tool_call_text(result.call),
                blocked=result.block_reason is not None,
                reason=result.block_reason or result.reason,
            )
            if index >= quiet or decision.verdict is not Verdict.ALLOW:
                decisions.append(decision)
            if result.block_reason is not None:
                return ToolCallOutcome(
                    tool_calls=(), decisions=tuple(decisions), blocked=Block.from_decision(decision)
                )
            call = result.call
        passed.append(call)
    return ToolCallOutcome(tool_calls=tuple(passed), decisions=tuple(decisions))


@dataclass(slots=True)
class _WholeTextScanner:
    """Adapts a guardrail that cannot stream: holds everything until the end."""

    guardrail: TextGuardrail
    parts: list[str] = field(default_factory=list)

    def feed(self, chunk: str) -> ScanStep:
        self.parts.append(chunk)
        return ScanStep()

    def finish(self) -> ScanStep:
        result = self.guardrail.check("".join(self.parts))
        if result.block_reason is not None:
            return ScanStep(block_reason=result.block_reason)
        return ScanStep(release=result.text, reason=result.reason)


@dataclass(slots=True)
class _Stage:
    guardrail: TextGuardrail
    scanner: TextScanner
    seen: hashlib._Hash = field(default_factory=hashlib.sha256)
    released: hashlib._Hash = field(default_factory=hashlib.sha256)
    reason: str = ""
    block_reason: str | None = None
    finished: bool = False

    def decision(self) -> GuardrailDecision:
        before = self.seen.hexdigest()
        after = self.released.hexdigest()
        if self.block_reason is not None:
            verdict, after, reason = Verdict.BLOCK, before, self.block_reason
        else:
            verdict = Verdict.ALLOW if after == before else Verdict.MODIFY
            reason = self.reason
        return GuardrailDecision.from_digests(
            stage=_STAGE,
            guardrail=self.guardrail.name,
            guardrail_version=self.guardrail.version,
            verdict=verdict,
            before_digest=before,
            after_digest=after,
            reason=reason,
        )


class ResponseStreamFilter:
    """Runs the response guardrails over one generation's streamed output.

    Not thread-safe; one filter per generation. See the module docstring for
    what the actions mean to a client.
    """

    def __init__(
        self,
        *,
        guardrails: Sequence[TextGuardrail],
        tool_guardrails: Sequence[ToolCallGuardrail],
        tool_definitions: Sequence[ToolDefinition],
        mode: ResponseMode,
        tool_sanitizers: Sequence[ToolCallGuardrail] = (),
    ) -> None:
        """Open one scanner per guardrail; guardrails that cannot stream hold until the end.

        `tool_sanitizers` run on each tool call before `tool_guardrails`
        (see `check_tool_calls`).
        """
        self._stages = [
            _Stage(
                g, g.scanner() if isinstance(g, StreamingTextGuardrail) else _WholeTextScanner(g)
            )
            for g in guardrails
        ]
        self._tool_guardrails = tuple(tool_guardrails)
        self._tool_sanitizers = tuple(tool_sanitizers)
        self._tool_definitions = tuple(tool_definitions)
        self._mode = mode
        self._output: list[str] = []
        self._emitted = 0
        self._block: Block | None = None
        self._blocking_stage = -1
        self._finished = False

    @property
    def mode(self) -> ResponseMode:
        """The response mode of this stream."""
        return self._mode

    @property
    def emitted_chars(self) -> int:
        """How many characters of this response have been emitted to the client."""
        return self._emitted

    @property
    def blocked(self) -> Block | None:
        """The block, once a guardrail has blocked."""
        return self._block

    def feed(self, delta: str) -> list[StreamAction]:
        """Take the next text delta and return the actions for the client, in order.

        Returns `[EmitText]` (streaming mode, when text was released), `[]`
        (nothing releasable yet, or buffered mode), or on a block
        `[RetractText, StopResponse]` (the retraction only when text was
        emitted). After a block further deltas are ignored (returns `[]`).

        Raises:
            RuntimeError: When called after `finish`.
        """
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._block is not None or not delta:
            return []
        released = self._through(delta, final=False)
        if released is None:
            return self._block_actions()
        return self._pass_on(released)

    def finish(self, tool_calls: Sequence[ToolCall] = ()) -> ResponseOutcome:
        """End the stream: flush the guardrails, check `tool_calls`, return the outcome.

        Call it exactly once, also after a block (to collect the decisions).

        Raises:
            RuntimeError: When called twice.
        """
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._block is not None:
            return self._blocked_outcome(actions=())
        released = self._through("", final=True)
        if released is None:
            return self._blocked_outcome(actions=tuple(self._block_actions()))
        tools = check_tool_calls(
            self._tool_guardrails,
            ToolCallSubject(calls=tuple(tool_calls), tool_definitions=self._tool_definitions),
            sanitizers=self._tool_sanitizers,
        )
        text_decisions = tuple(stage.decision() for stage in self._stages)
        if tools.blocked is not None:
            self._block = tools.blocked
            return ResponseOutcome(
                final_text="",
                tool_calls=(),
                decisions=text_decisions + tools.decisions,
                blocked=tools.blocked,
                actions=tuple(self._block_actions()),
            )
        self._output.append(released)
        actions: list[StreamAction]
        if self._mode is ResponseMode.BUFFERED:
            actions = self._emit("".join(self._output))
        else:
            actions = self._emit(released)
        return ResponseOutcome(
            final_text="".join(self._output),
            tool_calls=tools.tool_calls,
            decisions=text_decisions + tools.decisions,
            actions=tuple(actions),
        )

    def _through(self, text: str, *, final: bool) -> str | None:
        """Pass text through every stage; None when a stage blocked."""
        for index, stage in enumerate(self._stages):
            stage.seen.update(text.encode("utf-8"))
            step = stage.scanner.feed(text) if text else ScanStep()
            out = step.release
            if step.block_reason is None and final:
                end = stage.scanner.finish()
                stage.finished = True
                stage.reason = end.reason
                step = end
                out += end.release
            if step.block_reason is not None:
                self._blocked_at(index, step.block_reason)
                return None
            stage.released.update(out.encode("utf-8"))
            text = out
            if not text and not final:
                return ""
        return text

    def _blocked_at(self, index: int, reason: str) -> None:
        stage = self._stages[index]
        stage.block_reason = reason
        self._blocking_stage = index
        # Flush the guardrails before the blocker, so that their decisions
        # cover all they were given; their output goes nowhere.
        for earlier in self._stages[:index]:
            if not earlier.finished:
                end = earlier.scanner.finish()
                earlier.finished = True
                earlier.reason = end.reason
                if end.block_reason is not None:
                    earlier.block_reason = end.block_reason
                else:
                    earlier.released.update(end.release.encode("utf-8"))
        self._block = Block.from_decision(stage.decision())

    def _pass_on(self, text: str) -> list[StreamAction]:
        if not text:
            return []
        self._output.append(text)
        if self._mode is ResponseMode.BUFFERED:
            return []
        return self._emit(text)

    def _emit(self, text: str) -> list[StreamAction]:
        if not text:
            return []
        action = EmitText(text=text, start=self._emitted)
        self._emitted = action.end
        return [action]

    def _block_actions(self) -> list[StreamAction]:
        assert self._block is not None
        actions: list[StreamAction] = []
        if self._emitted:
            actions.append(RetractText(start=0, end=self._emitted, reason=self._block.describe()))
        actions.append(StopResponse(block=self._block))
        return actions

    def _blocked_outcome(self, *, actions: tuple[StreamAction, ...]) -> ResponseOutcome:
        assert self._block is not None
        decisions = tuple(stage.decision() for stage in self._stages[: self._blocking_stage + 1])
        return ResponseOutcome(
            final_text="", tool_calls=(), decisions=decisions, blocked=self._block, actions=actions
        )
