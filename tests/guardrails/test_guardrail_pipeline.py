"""The pipeline: stage order, blocks as outcomes, execution intercepts, streaming blocks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import pytest

from turnlog import errors
from turnlog.domain.events import (
    GuardrailDecided,
    GuardrailStage,
    ToolCall,
    ToolDefinition,
    TurnBlocked,
    Verdict,
)
from turnlog.guardrails import (
    Block,
    BlockedTerms,
    BuiltinSettings,
    EmitText,
    ExecutionEvent,
    GenerationCall,
    GenerationFinished,
    GenerationRequest,
    GuardrailDecision,
    GuardrailPipeline,
    GuardrailProfile,
    GuardrailSpec,
    InterceptResult,
    MaxLength,
    ModelFallback,
    PiiRedactor,
    RequestSubject,
    ResponseContext,
    ResponseMode,
    ResponseSubject,
    RetractText,
    RetryBeforeFirstDelta,
    StopResponse,
    TextCheck,
    TextDelta,
    ToolAllowList,
    ToolArgumentsSchema,
    ToolCallCheck,
    ToolCallSubject,
    decisions_to_events,
    default_registry,
    text_digest,
    tool_call_text,
)

# --- recording guardrails -----------------------------------------------------


@dataclass
class Recorder:
    log: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RecordingIntercept:
    recorder: Recorder
    name: str = "rec_intercept"
    version: str = "1"

    async def intercept(self, request: RequestSubject) -> InterceptResult:
        self.recorder.log.append("request_intercept")
        return InterceptResult(
            request=dataclasses.replace(request, context=(*request.context, "ctx"))
        )


@dataclass(frozen=True)
class RecordingText:
    recorder: Recorder
    label: str
    name: str = "rec_text"
    version: str = "1"

    def check(self, text: str) -> TextCheck:
        self.recorder.log.append(self.label)
        return TextCheck(text=text)


@dataclass(frozen=True)
class RecordingExecution:
    recorder: Recorder
    name: str = "rec_execution"
    version: str = "1"

    def wrap(self, call: GenerationCall) -> GenerationCall:
        async def wrapped(request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
            self.recorder.log.append("execution_intercept")
            async for event in call(request):
                yield event

        return wrapped


@dataclass(frozen=True)
class RecordingTool:
    recorder: Recorder
    name: str = "rec_tool"
    version: str = "1"

    def check_call(self, call: ToolCall, tools: object) -> ToolCallCheck:
        self.recorder.log.append("tool_call")
        return ToolCallCheck(call=call)


def scripted(*texts: str, recorder: Recorder | None = None) -> GenerationCall:
    async def call(request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
        if recorder is not None:
            recorder.log.append(f"generate:{request.model}")
        for text in texts:
            yield TextDelta(text=text)
        yield GenerationFinished(text="".join(texts), model=request.model)

    return call


def recording_pipeline(recorder: Recorder, **overrides: object) -> GuardrailPipeline:
    stages: dict[str, object] = {
        "request_intercepts": [RecordingIntercept(recorder)],
        "sanitize_request": [RecordingText(recorder, "sanitize_request")],
        "conditional_execution": [RecordingText(recorder, "conditional_execution")],
        "execution_intercepts": [RecordingExecution(recorder)],
        "sanitize_response": [RecordingText(recorder, "sanitize_response")],
        "tool_calls": [RecordingTool(recorder)],
    }
    stages.update(overrides)
    return GuardrailPipeline(profile="test", **stages)  # type: ignore[arg-type]


async def run_turn(
    pipeline: GuardrailPipeline, user_text: str, call: GenerationCall
) -> tuple[list[object], list[GuardrailDecision]]:
    """A minimal orchestrator: what the lead's turn loop does with the pipeline."""
    actions: list[object] = []
    decisions: list[GuardrailDecision] = []
    outcome = await pipeline.check_request(RequestSubject(user_text=user_text, model="m"))
    decisions += outcome.decisions
    if outcome.blocked is not None:
        return [outcome.blocked], decisions
    stream = pipeline.response_stream()
    tool_calls: tuple[ToolCall, ...] = ()
    async for event in pipeline.wrap_execution(call)(
        GenerationRequest(model="m", text=outcome.text_to_send)
    ):
        if isinstance(event, GuardrailDecision):
            decisions.append(event)
        elif isinstance(event, TextDelta):
            step = stream.feed(event.text)
            actions += step
            if any(isinstance(a, StopResponse) for a in step):
                break
        else:
            tool_calls = event.tool_calls
    result = stream.finish(tool_calls)
    actions += result.actions
    decisions += result.decisions
    return actions, decisions


# --- stage order and blocks ---------------------------------------------------


async def test_stages_run_in_order() -> None:
    recorder = Recorder()
    pipeline = recording_pipeline(recorder)
    call = scripted("hello", recorder=recorder)

    async def with_tool(request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
        async for event in call(request):
            if isinstance(event, GenerationFinished):
                event = dataclasses.replace(
                    event, tool_calls=(ToolCall(call_id="1", name="t", arguments_json="{}"),)
                )
            yield event

    _, decisions = await run_turn(pipeline, "hi", with_tool)
    assert recorder.log == [
        "request_intercept",
        "sanitize_request",
        "conditional_execution",
        "execution_intercept",
        "generate:m",
        "sanitize_response",
        # The response guardrail sanitizes the call (its name, then its
        # arguments) before the tool-call guardrail sees it.
        "sanitize_response",
        "sanitize_response",
        "tool_call",
    ]
    # The call passed the sanitizer unchanged: that records nothing.
    assert [(d.stage, d.guardrail) for d in decisions] == [
        (GuardrailStage.REQUEST_INTERCEPT, "rec_intercept"),
        (GuardrailStage.SANITIZE_REQUEST, "rec_text"),
        (GuardrailStage.CONDITIONAL_EXECUTION, "rec_text"),
        (GuardrailStage.SANITIZE_RESPONSE, "rec_text"),
        (GuardrailStage.SANITIZE_RESPONSE, "rec_tool"),
    ]
    # The intercept changed the context, not the text: MODIFY with equal digests.
    assert decisions[0].verdict is Verdict.MODIFY
    assert decisions[0].before_digest == decisions[0].after_digest == text_digest("hi")


async def test_conditional_block_stops_before_execution() -> None:
    recorder = Recorder()
    pipeline = recording_pipeline(
        recorder,
        conditional_execution=[BlockedTerms(("zork",)), RecordingText(recorder, "after")],
    )
    actions, decisions = await run_turn(
        pipeline, "tell me about ZORK", scripted("x", recorder=recorder)
    )
    assert recorder.log == ["request_intercept", "sanitize_request"]  # never generated
    [block] = actions
    assert block == Block.from_decision(decisions[-1])
    assert decisions[-1].verdict is Verdict.BLOCK
    assert decisions[-1].guardrail == "blocked_terms"
    outcome = await pipeline.check_request(RequestSubject(user_text="ZORK"))
    assert outcome.blocked is not None
    assert outcome.blocked.describe() == (
        "blocked by blocked_terms at stage conditional_execution "
        "because the text contains the blocked term 'zork'"
    )


async def test_sanitize_request_modifies_what_is_sent() -> None:
    pipeline = GuardrailPipeline(
        sanitize_request=[PiiRedactor()], conditional_execution=[MaxLength(20)]
    )
    outcome = await pipeline.check_request(RequestSubject(user_text="I am a@b.co"))
    assert outcome.text_to_send == "I am [EMAIL]"
    redaction, length = outcome.decisions
    assert redaction.verdict is Verdict.MODIFY
    assert redaction.before_digest == text_digest("I am a@b.co")
    assert redaction.after_digest == text_digest("I am [EMAIL]")
    assert length.verdict is Verdict.ALLOW
    assert length.before_digest == length.after_digest == text_digest("I am [EMAIL]")
    too_long = await pipeline.check_request(RequestSubject(user_text="x" * 21))
    assert too_long.blocked is not None
    assert too_long.blocked.guardrail == "max_input_length"


async def test_request_intercept_block_is_an_outcome() -> None:
    @dataclass(frozen=True)
    class Refuse:
        name: str = "refuse"
        version: str = "2"

        async def intercept(self, request: RequestSubject) -> InterceptResult:
            return InterceptResult(request=request, block_reason="closed")

    outcome = await GuardrailPipeline(request_intercepts=[Refuse()]).check_request(
        RequestSubject(user_text="x")
    )
    assert outcome.blocked is not None
    assert (outcome.blocked.stage, outcome.blocked.guardrail_version) == (
        GuardrailStage.REQUEST_INTERCEPT,
        "2",
    )


# --- execution intercepts -----------------------------------------------------


@dataclass
class Flaky:
    """Fails its first `failures` calls before (or after) the first delta."""

    failures: int
    error: type[Exception] = errors.EngineUnavailableError
    after_first_delta: bool = False
    calls: list[str] = field(default_factory=list)

    async def __call__(self, request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
        self.calls.append(request.model)
        failing = len(self.calls) <= self.failures
        if failing and not self.after_first_delta:
            raise self.error("worker down")
        yield TextDelta(text="hi")
        if failing:
            raise self.error("worker died")
        yield GenerationFinished(text="hi", model=request.model)


async def collect(call: GenerationCall, model: str = "m") -> list[ExecutionEvent]:
    return [event async for event in call(GenerationRequest(model=model, text="q"))]


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_retry_before_first_delta() -> None:
    flaky, sleeps = Flaky(failures=2), Sleeps()
    retry = RetryBeforeFirstDelta(max_attempts=3, backoff_s=(0.1, 0.5), sleep=sleeps)
    events = await collect(retry.wrap(flaky))
    assert flaky.calls == ["m", "m", "m"]
    assert sleeps.delays == [0.1, 0.5]
    decisions = [e for e in events if isinstance(e, GuardrailDecision)]
    assert [d.verdict for d in decisions] == [Verdict.MODIFY, Verdict.MODIFY]
    assert "ENGINE_UNAVAILABLE" in decisions[0].reason
    assert "worker down" not in decisions[0].reason
    assert [e for e in events if not isinstance(e, GuardrailDecision)] == [
        TextDelta(text="hi"),
        GenerationFinished(text="hi", model="m"),
    ]


async def test_retry_gives_up_after_max_attempts() -> None:
    flaky = Flaky(failures=5)
    retry = RetryBeforeFirstDelta(max_attempts=2, sleep=Sleeps())
    with pytest.raises(errors.EngineUnavailableError):
        await collect(retry.wrap(flaky))
    assert len(flaky.calls) == 2


async def test_no_retry_after_the_first_delta_or_on_other_errors() -> None:
    late = Flaky(failures=1, after_first_delta=True)
    with pytest.raises(errors.EngineUnavailableError):
        await collect(RetryBeforeFirstDelta(sleep=Sleeps()).wrap(late))
    assert late.calls == ["m"]
    other = Flaky(failures=1, error=errors.InvalidArgumentError)
    with pytest.raises(errors.InvalidArgumentError):
        await collect(RetryBeforeFirstDelta(sleep=Sleeps()).wrap(other))
    assert other.calls == ["m"]


async def test_untouched_call_records_one_allow_before_output() -> None:
    events = await collect(RetryBeforeFirstDelta(sleep=Sleeps()).wrap(Flaky(failures=0)))
    assert isinstance(events[0], GuardrailDecision)
    assert events[0].verdict is Verdict.ALLOW
    assert events[1:] == [TextDelta(text="hi"), GenerationFinished(text="hi", model="m")]


async def test_fallback_to_second_model() -> None:
    flaky = Flaky(failures=1)
    events = await collect(ModelFallback("small").wrap(flaky), model="big")
    assert flaky.calls == ["big", "small"]
    decision = events[0]
    assert isinstance(decision, GuardrailDecision)
    assert decision.verdict is Verdict.MODIFY
    assert decision.stage is GuardrailStage.EXECUTION_INTERCEPT
    assert events[-1] == GenerationFinished(text="hi", model="small")


async def test_fallback_composes_with_retry() -> None:
    flaky = Flaky(failures=3)
    pipeline = GuardrailPipeline(
        execution_intercepts=[
            ModelFallback("small"),
            RetryBeforeFirstDelta(max_attempts=2, sleep=Sleeps()),
        ]
    )
    events = await collect(pipeline.wrap_execution(flaky), model="big")
    assert flaky.calls == ["big", "big", "small", "small"]
    assert events[-1] == GenerationFinished(text="hi", model="small")


async def test_no_fallback_after_the_first_delta() -> None:
    flaky = Flaky(failures=1, after_first_delta=True)
    with pytest.raises(errors.EngineUnavailableError):
        await collect(ModelFallback("small").wrap(flaky), model="big")
    assert flaky.calls == ["big"]


# --- streaming blocks ---------------------------------------------------------


async def test_streamed_block_retracts_what_was_emitted() -> None:
    pipeline = GuardrailPipeline(sanitize_response=[PiiRedactor(), BlockedTerms(("zork",))])
    actions, decisions = await run_turn(
        pipeline, "hi", scripted("Sure. Mail a@b.co ", "about the Zo", "rk plan", " and more")
    )
    emitted = [a for a in actions if isinstance(a, EmitText)]
    assert "".join(a.text for a in emitted) == "Sure. Mail [EMAIL] about the "
    assert all("Zo" not in a.text for a in emitted)  # the term never reached the client
    retract, stop = actions[len(emitted) :]
    assert isinstance(stop, StopResponse)
    assert retract == RetractText(start=0, end=emitted[-1].end, reason=stop.block.describe())
    assert isinstance(stop, StopResponse)
    assert stop.block.guardrail == "blocked_terms"
    assert stop.block.stage is GuardrailStage.SANITIZE_RESPONSE
    redaction, block = decisions[-2:]
    assert redaction.verdict is Verdict.MODIFY
    assert block.verdict is Verdict.BLOCK


async def test_buffered_mode_emits_nothing_before_passing() -> None:
    pipeline = GuardrailPipeline(
        sanitize_response=[PiiRedactor()], response_mode=ResponseMode.BUFFERED
    )
    stream = pipeline.response_stream()
    for delta in ("one a@b.co ", "two ", "three"):
        assert stream.feed(delta) == []
    outcome = stream.finish()
    assert outcome.actions == (EmitText(text="one [EMAIL] two three", start=0),)
    assert outcome.final_text == "one [EMAIL] two three"


async def test_buffered_block_has_nothing_to_retract() -> None:
    pipeline = GuardrailPipeline(
        sanitize_response=[BlockedTerms(("zork",))], response_mode=ResponseMode.BUFFERED
    )
    stream = pipeline.response_stream()
    assert stream.feed("all fine ") == []
    [stop] = stream.feed("zork!")
    assert isinstance(stop, StopResponse)
    outcome = stream.finish()
    assert outcome.blocked == stop.block
    assert outcome.actions == ()
    assert outcome.final_text == ""


def test_block_at_finish_retracts() -> None:
    pipeline = GuardrailPipeline(sanitize_response=[BlockedTerms(("zork",))])
    stream = pipeline.response_stream()
    assert stream.feed("about zork") == [EmitText(text="about ", start=0)]
    outcome = stream.finish()
    assert outcome.blocked is not None
    retract, stop = outcome.actions
    assert retract == RetractText(start=0, end=6, reason=outcome.blocked.describe())
    assert stop == StopResponse(block=outcome.blocked)


WEATHER = ToolDefinition(
    name="get_weather",
    parameters_json_schema=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)


def test_a_blocked_tool_call_blocks_the_response_and_retracts() -> None:
    pipeline = GuardrailPipeline(tool_calls=[ToolAllowList(), ToolArgumentsSchema()])
    stream = pipeline.response_stream(ResponseContext(tool_definitions=(WEATHER,)))
    assert stream.feed("Checking.") == [EmitText(text="Checking.", start=0)]
    good = ToolCall(call_id="1", name="get_weather", arguments_json='{"city": "Oslo"}')
    bad = ToolCall(call_id="2", name="get_weather", arguments_json='{"town": "Oslo"}')
    outcome = stream.finish([good, bad])
    assert outcome.blocked is not None
    assert outcome.blocked.guardrail == "tool_arguments_schema"
    assert outcome.tool_calls == ()
    assert [a.__class__ for a in outcome.actions] == [RetractText, StopResponse]
    assert [(d.guardrail, d.verdict) for d in outcome.decisions] == [
        ("tool_allow_list", Verdict.ALLOW),
        ("tool_arguments_schema", Verdict.ALLOW),
        ("tool_allow_list", Verdict.ALLOW),
        ("tool_arguments_schema", Verdict.BLOCK),
    ]
    assert outcome.decisions[-1].before_digest == text_digest(tool_call_text(bad))


def test_check_tool_calls_and_check_response() -> None:
    pipeline = GuardrailPipeline(
        sanitize_response=[PiiRedactor()], tool_calls=[ToolAllowList.of(["get_weather"])]
    )
    call = ToolCall(call_id="1", name="get_weather", arguments_json="{}")
    tools = pipeline.check_tool_calls(ToolCallSubject(calls=(call,), tool_definitions=(WEATHER,)))
    assert tools.blocked is None
    assert tools.tool_calls == (call,)
    outcome = pipeline.check_response(
        ResponseSubject(text="x a@b.co", tool_calls=(call,), tool_definitions=(WEATHER,))
    )
    assert (outcome.final_text, outcome.tool_calls, outcome.blocked) == ("x [EMAIL]", (call,), None)


# --- records and events ---------------------------------------------------------


async def test_decisions_convert_to_events_with_digests() -> None:
    pipeline = GuardrailPipeline(sanitize_request=[PiiRedactor()])
    outcome = await pipeline.check_request(RequestSubject(user_text="to a@b.co"))
    [event] = decisions_to_events(outcome.decisions, turn_id="t1")
    assert event == GuardrailDecided(
        turn_id="t1",
        stage=GuardrailStage.SANITIZE_REQUEST,
        guardrail="pii_redaction",
        guardrail_version="1",
        verdict=Verdict.MODIFY,
        reason="redacted 1 email address",
        before_digest=hashlib.sha256(b"to a@b.co").hexdigest(),
        after_digest=hashlib.sha256(b"to [EMAIL]").hexdigest(),
    )


def test_streamed_decision_digests_cover_the_whole_text() -> None:
    stream = GuardrailPipeline(sanitize_response=[PiiRedactor()]).response_stream()
    for chunk in ("mail a@", "b.co", " now"):
        stream.feed(chunk)
    [decision] = stream.finish().decisions
    assert decision.before_digest == text_digest("mail a@b.co now")
    assert decision.after_digest == text_digest("mail [EMAIL] now")


def test_block_converts_to_turn_blocked() -> None:
    stream = GuardrailPipeline(sanitize_response=[BlockedTerms(("zork",))]).response_stream()
    stream.feed("zork.")
    block = stream.finish().blocked
    assert block is not None
    assert block.to_event(turn_id="t", blocked_at_us=5) == TurnBlocked(
        turn_id="t",
        blocked_at_us=5,
        stage=GuardrailStage.SANITIZE_RESPONSE,
        guardrail="blocked_terms",
        reason="the text contains the blocked term 'zork'",
    )


# --- profiles -------------------------------------------------------------------


def test_unknown_profile_is_invalid_argument() -> None:
    with pytest.raises(errors.InvalidArgumentError) as raised:
        GuardrailPipeline.for_profile("lenient", default_registry())
    assert raised.value.metadata == {"guardrailProfile": "lenient"}


def test_builtin_profiles() -> None:
    registry = default_registry(BuiltinSettings(blocked_terms=("zork",), fallback_model="small"))
    assert registry.profile_names == ("default", "none", "strict")
    none = GuardrailPipeline.for_profile("none", registry)
    assert none.sanitize_request == ()
    assert none.tool_calls == ()
    default = GuardrailPipeline.for_profile("", registry)
    assert default is GuardrailPipeline.for_profile("default", registry)
    assert default.response_mode is ResponseMode.STREAMING
    assert [g.name for g in default.execution_intercepts] == [
        "model_fallback",
        "retry_before_first_delta",
    ]
    strict = GuardrailPipeline.for_profile("strict", registry)
    assert strict.response_mode is ResponseMode.BUFFERED
    assert [g.name for g in strict.conditional_execution] == ["blocked_terms", "max_input_length"]


async def test_profile_configuration_applies() -> None:
    registry = default_registry(BuiltinSettings(blocked_terms=("zork",)))
    registry.register_profile(
        GuardrailProfile(
            name="tiny",
            conditional_execution=(
                GuardrailSpec(factory="blocked_terms", options={"terms": ["frob"]}),
                GuardrailSpec(factory="max_input_length", options={"max_chars": 4}),
            ),
        )
    )
    tiny = GuardrailPipeline.for_profile("tiny", registry)
    assert (await tiny.check_request(RequestSubject(user_text="zork"))).blocked is None
    blocked = await tiny.check_request(RequestSubject(user_text="frob"))
    assert blocked.blocked is not None
    assert blocked.blocked.guardrail == "blocked_terms"
    long = await tiny.check_request(RequestSubject(user_text="fives"))
    assert long.blocked is not None
    assert long.blocked.guardrail == "max_input_length"
    default = GuardrailPipeline.for_profile("default", registry)
    assert (
        await default.check_request(RequestSubject(user_text="\uff3a\uff2f\uff32\uff2b"))
    ).blocked is not None


@pytest.mark.parametrize(
    "profile",
    [
        GuardrailProfile(name="p", sanitize_request=(GuardrailSpec(factory="nope"),)),
        GuardrailProfile(name="p", sanitize_request=(GuardrailSpec(factory="tool_allow_list"),)),
        GuardrailProfile(
            name="p",
            conditional_execution=(
                GuardrailSpec(factory="max_input_length", options={"max_chars": "9"}),
            ),
        ),
        GuardrailProfile(
            name="p",
            conditional_execution=(GuardrailSpec(factory="blocked_terms", options={"x": 1}),),
        ),
    ],
)
def test_bad_profiles_are_invalid_arguments(profile: GuardrailProfile) -> None:
    registry = default_registry()
    registry.register_profile(profile)
    with pytest.raises(errors.InvalidArgumentError):
        registry.pipeline("p")


async def test_closing_the_wrapped_call_closes_the_engine_call() -> None:
    closed: list[bool] = []

    async def engine(request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
        try:
            yield TextDelta(text="a")
            yield TextDelta(text="b")
        finally:
            closed.append(True)

    pipeline = GuardrailPipeline(
        execution_intercepts=[ModelFallback("small"), RetryBeforeFirstDelta(sleep=Sleeps())]
    )
    events = pipeline.wrap_execution(engine)(GenerationRequest(model="m"))
    async for event in events:
        if isinstance(event, TextDelta):
            break
    await events.aclose()
    assert closed == [True]
