"""The guardrail pipeline the turn orchestration calls, stage by stage.

Five stages run in this order for every turn (DESIGN.md, "Turn
orchestration"):

1. REQUEST_INTERCEPT: `RequestIntercept`s rewrite the request.
2. SANITIZE_REQUEST: `TextGuardrail`s on the user text (e.g. PII redaction).
3. CONDITIONAL_EXECUTION: `TextGuardrail`s on the user text that may block
   (blocked terms, maximum input length); a block here means the generation
   is never called.
4. EXECUTION_INTERCEPT: `ExecutionIntercept`s wrap the generation call.
5. SANITIZE_RESPONSE: `TextGuardrail`s on the response text, streamed through
   `ResponseStreamFilter`, then on each generated tool call's name and
   arguments (`ToolCallSanitizer`), then `ToolCallGuardrail`s on the
   sanitized calls.

Stages 1 to 3 are `check_request`; stage 4 is `wrap_execution`; stage 5 is
`response_stream` (or `check_response` for a whole response, and
`check_tool_calls` for tool calls alone). The sanitize stages also cover
what enters the conversation beside the user's text (`sanitize_input`: a
tool's result or error, a cancel reason) and the request fields the log
records verbatim (`check_fields`, which refuses rather than rewrites).
A pipeline holds no per-turn state and may be shared by any number of
concurrent turns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from turnlog.domain.events import GuardrailStage, ToolCall, ToolDefinition, Verdict
from turnlog.guardrails.contracts import (
    RequestIntercept,
    RequestSubject,
    ResponseContext,
    TextGuardrail,
    ToolCallGuardrail,
    ToolCallSubject,
)
from turnlog.guardrails.execution import ExecutionIntercept, GenerationCall
from turnlog.guardrails.records import Block, GuardrailDecision, text_digest
from turnlog.guardrails.response import (
    ResponseMode,
    ResponseOutcome,
    ResponseStreamFilter,
    ToolCallOutcome,
    check_tool_calls,
)
from turnlog.guardrails.sanitize import (
    RequestField,
    TextOutcome,
    ToolCallSanitizer,
    refuse_changed_fields,
    sanitize_text,
)

if TYPE_CHECKING:
    from turnlog.guardrails.registry import GuardrailRegistry


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestOutcome:
    """The result of the request stages (1 to 3).

    Attributes:
        request: The request as the stages left it (rewritten, redacted).
        decisions: One per guardrail that ran, in stage order.
        blocked: The block, if a guardrail blocked; the stages after it did
            not run, and the generation must not be called.
    """

    request: RequestSubject
    decisions: tuple[GuardrailDecision, ...]
    blocked: Block | None = None

    @property
    def text_to_send(self) -> str:
        """The user text to render into the prompt."""
        return self.request.user_text


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseSubject:
    """A whole response, for `GuardrailPipeline.check_response`.

    Attributes:
        text: The generated text.
        tool_calls: The generated tool calls.
        tool_definitions: The tools offered to the model in this turn.
    """

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_definitions: tuple[ToolDefinition, ...] = ()


class GuardrailPipeline:
    """The guardrails of one profile, arranged in the five stages."""

    def __init__(
        self,
        *,
        profile: str = "",
        request_intercepts: Sequence[RequestIntercept] = (),
        sanitize_request: Sequence[TextGuardrail] = (),
        conditional_execution: Sequence[TextGuardrail] = (),
        execution_intercepts: Sequence[ExecutionIntercept] = (),
        sanitize_response: Sequence[TextGuardrail] = (),
        tool_calls: Sequence[ToolCallGuardrail] = (),
        response_mode: ResponseMode = ResponseMode.STREAMING,
    ) -> None:
        """Arrange guardrails into stages; each sequence runs in the order given.

        `execution_intercepts` are listed outermost first: the first one sees
        the call as the orchestrator makes it.
        """
        self.profile = profile
        self.request_intercepts = tuple(request_intercepts)
        self.sanitize_request = tuple(sanitize_request)
        self.conditional_execution = tuple(conditional_execution)
        self.execution_intercepts = tuple(execution_intercepts)
        self.sanitize_response = tuple(sanitize_response)
        self.tool_calls = tuple(tool_calls)
        self.response_mode = response_mode
        # Generated calls are sanitized like the response text, before any
        # tool-call guardrail sees (or quotes) them.
        self._tool_sanitizers: tuple[ToolCallGuardrail, ...] = tuple(
            ToolCallSanitizer(g) for g in self.sanitize_response
        )

    @classmethod
    def for_profile(cls, name: str, registry: GuardrailRegistry) -> GuardrailPipeline:
        """Return the pipeline of profile `name` ("" means the registry's default).

        Raises:
            turnlog.errors.InvalidArgumentError: When no such profile exists.
        """
        return registry.pipeline(name)

    async def check_request(self, subject: RequestSubject) -> RequestOutcome:
        """Run stages 1 to 3 over a request, stopping at the first block."""
        decisions: list[GuardrailDecision] = []
        request = subject
        for intercept in self.request_intercepts:
            result = await intercept.intercept(request)
            blocked = result.block_reason is not None
            verdict = (
                Verdict.BLOCK
                if blocked
                else Verdict.MODIFY
                if result.request != request
                else Verdict.ALLOW
            )
            decision = GuardrailDecision(
                stage=GuardrailStage.REQUEST_INTERCEPT,
                guardrail=intercept.name,
                guardrail_version=intercept.version,
                verdict=verdict,
                reason=result.block_reason or result.reason,
                before_digest=text_digest(request.user_text),
                after_digest=text_digest(
                    request.user_text if blocked else result.request.user_text
                ),
            )
            decisions.append(decision)
            if blocked:
                return RequestOutcome(
                    request=request,
                    decisions=tuple(decisions),
                    blocked=Block.from_decision(decision),
                )
            request = result.request
        for stage, guardrails in (
            (GuardrailStage.SANITIZE_REQUEST, self.sanitize_request),
            (GuardrailStage.CONDITIONAL_EXECUTION, self.conditional_execution),
        ):
            for guardrail in guardrails:
                check = guardrail.check(request.user_text)
                blocked = check.block_reason is not None
                decision = GuardrailDecision.of(
                    stage=stage,
                    guardrail=guardrail.name,
                    guardrail_version=guardrail.version,
                    before=request.user_text,
                    after=request.user_text if blocked else check.text,
                    blocked=blocked,
                    reason=check.block_reason or check.reason,
                )
                decisions.append(decision)
                if blocked:
                    return RequestOutcome(
                        request=request,
                        decisions=tuple(decisions),
                        blocked=Block.from_decision(decision),
                    )
                if check.text != request.user_text:
                    request = _with_user_text(request, check.text)
        return RequestOutcome(request=request, decisions=tuple(decisions))

    def wrap_execution(self, call: GenerationCall) -> GenerationCall:
        """Return `call` wrapped in the execution intercepts (stage 4).

        The returned call yields the events `call` yields plus the
        intercepts' `GuardrailDecision`s, inline where they happened.
        """
        for intercept in reversed(self.execution_intercepts):
            call = intercept.wrap(call)
        return call

    def response_stream(self, context: ResponseContext | None = None) -> ResponseStreamFilter:
        """Return a fresh filter for one generation's output (stage 5)."""
        context = context or ResponseContext()
        return ResponseStreamFilter(
            guardrails=self.sanitize_response,
            tool_guardrails=self.tool_calls,
            tool_definitions=context.tool_definitions,
            mode=self.response_mode,
            tool_sanitizers=self._tool_sanitizers,
        )

    def check_response(self, subject: ResponseSubject) -> ResponseOutcome:
        """Run stage 5 over a whole response, as a buffered stream would.

        The outcome equals that of a filter fed the whole text in one piece,
        in buffered mode: `actions` holds one `EmitText` of the final text,
        or the `StopResponse`.
        """
        stream = ResponseStreamFilter(
            guardrails=self.sanitize_response,
            tool_guardrails=self.tool_calls,
            tool_definitions=subject.tool_definitions,
            mode=ResponseMode.BUFFERED,
            tool_sanitizers=self._tool_sanitizers,
        )
        stream.feed(subject.text)
        return stream.finish(subject.tool_calls)

    def check_tool_calls(self, subject: ToolCallSubject) -> ToolCallOutcome:
        """Run the tool-call sanitizers and guardrails (stage 5) alone, e.g. on a later round's calls."""
        return check_tool_calls(self.tool_calls, subject, sanitizers=self._tool_sanitizers)

    def sanitize_input(self, text: str, *, subject: str) -> TextOutcome:
        """Run the sanitize-request guardrails (stage 2) over a text entering the conversation.

        For what reaches the log and the model beside the user's message: a
        tool's result or error (server- or client-side), a cancel reason. JSON
        is sanitized value by value and stays valid JSON. Decisions are made
        only for guardrails that changed or blocked the text. `subject` names
        the text in each decision's reason and must not quote it.
        """
        return sanitize_text(
            GuardrailStage.SANITIZE_REQUEST, self.sanitize_request, text, subject=subject
        )

    def check_fields(self, fields: Iterable[RequestField]) -> None:
        """Refuse request fields that a sanitize-request guardrail would change or block.

        For fields the log records as given (system prompt, labels, tool
        definitions, stop sequences, the structured-output regex): they are
        never rewritten, so nothing is changed and nothing needs a decision.

        Raises:
            turnlog.guardrails.sanitize.FieldRefusedError: Naming the first such
                field and the guardrail (an INVALID_ARGUMENT).
        """
        refuse_changed_fields(self.sanitize_request, fields, profile=self.profile)


def _with_user_text(request: RequestSubject, text: str) -> RequestSubject:
    return dataclasses.replace(request, user_text=text)
