"""Execution intercepts: middleware around the generation call.

The orchestrator passes the real engine call in as a `GenerationCall`: an
async callable that takes a `GenerationRequest` and yields `TextDelta`s and
then one `GenerationFinished`. An `ExecutionIntercept` wraps such a call and
returns another; intercepts may retry it, replace it or route it, and report
what they did by yielding `GuardrailDecision`s inline, in the order things
happened (so a retry is on record even when the call fails in the end). The
innermost call never yields decisions; every wrapper passes them through.

Built-ins retry and fall back only *before the first output event*: once a
delta has reached the client, a second attempt would repeat or contradict
it, so a later failure propagates unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from turnlog import errors
from turnlog.domain.events import FinishReason, GuardrailStage, ToolCall, Usage, Verdict
from turnlog.guardrails.contracts import Guardrail
from turnlog.guardrails.records import GuardrailDecision, text_digest


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """What an execution intercept may look at and change about a generation.

    The orchestrator keeps the rendered prompt, sampling settings and the like
    in the closure of its call; intercepts route on `model`.

    Attributes:
        model: The model to generate with.
        text: The request text after the request stages, for digests and routing.
        labels: The conversation's labels, for routing.
    """

    model: str
    text: str = ""
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TextDelta:
    """A piece of generated text, streamed to the client."""

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationFinished:
    """The last event of a generation."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason = FinishReason.STOP
    model: str = ""
    usage: Usage = field(default_factory=Usage)
    token_ids: tuple[int, ...] = ()


ExecutionEvent = TextDelta | GenerationFinished | GuardrailDecision
GenerationCall = Callable[[GenerationRequest], AsyncGenerator[ExecutionEvent, None]]
"""An async generator function; closing its generator must abort the generation."""
Sleep = Callable[[float], Awaitable[None]]


@runtime_checkable
class ExecutionIntercept(Guardrail, Protocol):
    """Wraps the generation call (stage EXECUTION_INTERCEPT)."""

    def wrap(self, call: GenerationCall) -> GenerationCall:
        """Return a call that runs `call` with this intercept's behaviour.

        The returned call must yield what `call` yields (decisions included),
        may add its own decisions, and must close `call`'s iterator when it is
        closed itself (so a cancelled turn aborts the engine request).
        """
        ...


def _error_reason(error: BaseException) -> str:
    """Name an error for a decision reason without leaking its message."""
    if isinstance(error, errors.TurnlogError):
        return error.reason
    return type(error).__name__


async def _close(stream: AsyncGenerator[ExecutionEvent, None]) -> None:
    await stream.aclose()


def _decision(
    intercept: Guardrail, request: GenerationRequest, *, modified: bool, reason: str
) -> GuardrailDecision:
    digest = text_digest(request.text)
    return GuardrailDecision(
        stage=GuardrailStage.EXECUTION_INTERCEPT,
        guardrail=intercept.name,
        guardrail_version=intercept.version,
        verdict=Verdict.MODIFY if modified else Verdict.ALLOW,
        reason=reason,
        # Intercepts change the call, never the text: the digests are equal.
        before_digest=digest,
        after_digest=digest,
    )


@dataclass(frozen=True, slots=True)
class RetryBeforeFirstDelta:
    """Retries the call on a transient error raised before its first output event.

    Each retry is recorded as a MODIFY decision as it happens; a call that
    needed no retry gets one ALLOW decision just before its first output
    event. When the attempts are used up the last error propagates.

    Args:
        max_attempts: Attempts in all, the first one included (at least 1).
        backoff_s: Seconds to wait before retry n (the last value repeats).
        retry_on: The transient error classes.
        sleep: Awaited with each backoff; injected so tests need no clock.
    """

    max_attempts: int = 3
    backoff_s: tuple[float, ...] = (0.05, 0.2)
    retry_on: tuple[type[Exception], ...] = (errors.EngineUnavailableError,)
    sleep: Sleep = asyncio.sleep
    name: str = "retry_before_first_delta"
    version: str = "1"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def _delay(self, retry: int) -> float:
        if not self.backoff_s:
            return 0.0
        return self.backoff_s[min(retry - 1, len(self.backoff_s) - 1)]

    def wrap(self, call: GenerationCall) -> GenerationCall:
        """Return `call` with retries before the first output event."""

        async def retrying(request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
            attempt = 1
            while True:
                stream = call(request)
                started = False
                try:
                    async for event in stream:
                        if not started and not isinstance(event, GuardrailDecision):
                            started = True
                            if attempt == 1:
                                yield _decision(
                                    self,
                                    request,
                                    modified=False,
                                    reason="first attempt produced output",
                                )
                        yield event
                    return
                except self.retry_on as error:
                    if started or attempt >= self.max_attempts:
                        raise
                    delay = self._delay(attempt)
                    yield _decision(
                        self,
                        request,
                        modified=True,
                        reason=f"attempt {attempt} of {self.max_attempts} failed before the first "
                        f"delta ({_error_reason(error)}); retrying after {delay:g}s",
                    )
                finally:
                    await _close(stream)
                await self.sleep(delay)
                attempt += 1

        return retrying


@dataclass(frozen=True, slots=True)
class ModelFallback:
    """Repeats the call with `fallback_model` when the first model fails before output.

    Records one MODIFY decision when it falls back, or one ALLOW decision
    just before the first output event of an untouched call. An error after
    the first output event, or from the fallback model, propagates.

    Args:
        fallback_model: The model to fall back to.
        fallback_on: The error classes that trigger the fallback.
    """

    fallback_model: str
    fallback_on: tuple[type[Exception], ...] = (
        errors.EngineUnavailableError,
        errors.EngineInternalError,
    )
    name: str = "model_fallback"
    version: str = "1"

    def wrap(self, call: GenerationCall) -> GenerationCall:
        """Return `call` with a fallback to `fallback_model`."""

        async def falling_back(request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
            stream = call(request)
            started = False
            try:
                async for event in stream:
                    if not started and not isinstance(event, GuardrailDecision):
                        started = True
                        yield _decision(
                            self,
                            request,
                            modified=False,
                            reason=f"model {request.model!r} answered",
                        )
                    yield event
                return
            except self.fallback_on as error:
                if started or request.model == self.fallback_model:
                    raise
                reason = (
                    f"model {request.model!r} failed before the first delta "
                    f"({_error_reason(error)}); falling back to {self.fallback_model!r}"
                )
            finally:
                await _close(stream)
            yield _decision(self, request, modified=True, reason=reason)
            fallback = call(dataclasses.replace(request, model=self.fallback_model))
            try:
                async for event in fallback:
                    yield event
            finally:
                await _close(fallback)

        return falling_back
