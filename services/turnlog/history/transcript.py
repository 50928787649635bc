"""A conversation's transcript, rebuilt from its recorded events: pure code, no I/O.

`build_transcript` walks a stream's events (from the log or an export file),
folds them with the domain's `evolve` (so a log that does not fold is refused
exactly as `VerifyConversation` would refuse it) and collects, turn by turn,
what a person auditing the conversation wants to see: the user's message,
every generation (its final text, tool calls and finish reason, or the text
streamed before it was withdrawn or cut off), tool results, guardrail
decisions and the turn's outcome. `render_transcript` prints it as plain
text; the golden tests compare that text with committed transcripts, and
`turnlog replay` prints it.

Times are left out of the rendering on purpose: a transcript says what was
said and decided, and the same log always renders to the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from turnlog.conversation import engine_io
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, InvalidTransitionError, TurnStatus, evolve
from turnlog.engine.v1 import engine_pb2
from turnlog.storage.port import RecordedEvent


class TranscriptError(ValueError):
    """The events do not make a conversation (undecodable, or they do not fold).

    Attributes:
        version: the stream version of the offending event.
    """

    def __init__(self, version: int, problem: str) -> None:
        super().__init__(f"version {version}: {problem}")
        self.version = version
        self.problem = problem


@dataclass(slots=True, kw_only=True)
class GenerationRecord:
    """One model generation of a turn.

    Attributes:
        generation_id: "<turn id>/<n>".
        model: the model asked (as recorded when the generation started).
        sampling: the sampling settings it ran with.
        text: the final text (after response guardrails), "" if it never completed.
        tool_calls: the tool calls it made.
        finish_reason: why it ended; None if it never completed.
        streamed: the text streamed live to clients, in order.
        retracted: (start, end, reason) of streamed text withdrawn by a guardrail.
    """

    generation_id: str
    model: str
    sampling: ev.SamplingParams
    text: str = ""
    tool_calls: tuple[ev.ToolCall, ...] = ()
    finish_reason: ev.FinishReason | None = None
    streamed: list[str] = field(default_factory=list)
    retracted: list[tuple[int, int, str]] = field(default_factory=list)
    usage: ev.Usage = field(default_factory=ev.Usage)
    context: ev.ContextWindow | None = None
    """The prompt's window as recorded (None in logs written before windows)."""
    state_before: ConversationState | None = None
    """The conversation just before the generation started (states are immutable)."""

    def prompt(self) -> engine_pb2.ChatPrompt:
        """The prompt the model was given, rebuilt from the log: the recorded window over the state."""
        assert self.state_before is not None
        first = self.context.first_version if self.context is not None else 0
        compaction = self.context.compaction_id if self.context is not None else ""
        return engine_io.chat_prompt(
            self.state_before, first_version=first, compaction_id=compaction
        )

    @property
    def completed(self) -> bool:
        """True when the log holds the generation's `GenerationCompleted`."""
        return self.finish_reason is not None

    @property
    def said(self) -> str:
        """What it said: its final text, or what it streamed before it ended."""
        return self.text if self.completed else "".join(self.streamed)


@dataclass(slots=True, kw_only=True)
class ToolOutcome:
    """A tool call's outcome: its result text, or the error it failed with."""

    call_id: str
    ok: bool
    text: str


@dataclass(slots=True, kw_only=True)
class TurnRecord:
    """One turn: what went in, every step, and how it ended.

    Attributes:
        number: 1-based turn number within the transcript.
        start_version: stream version of the turn's `TurnStarted`.
        sampling: the turn's effective sampling (what its generations used).
        status: how it ended (RUNNING when the log stops mid-turn).
        steps: the turn's records in log order (guardrail decisions,
            generations, tool calls and outcomes, the round limit).
    """

    number: int
    turn_id: str
    request_id: str
    start_version: int
    sampling: ev.SamplingParams
    max_tool_round_trips: int
    context_policy: ev.ContextPolicy | None = None
    strict_max_tokens: bool = False
    compaction_only: bool = False
    user_text: str = ""
    status: TurnStatus = TurnStatus.RUNNING
    finish_reason: ev.FinishReason | None = None
    outcome_reason: str = ""
    usage: ev.Usage = field(default_factory=ev.Usage)
    steps: list[Step] = field(default_factory=list)

    @property
    def generations(self) -> list[GenerationRecord]:
        return [s for s in self.steps if isinstance(s, GenerationRecord)]

    @property
    def compactions(self) -> list[ev.ContextCompacted]:
        return [s for s in self.steps if isinstance(s, ev.ContextCompacted)]

    @property
    def decisions(self) -> list[ev.GuardrailDecided]:
        return [s for s in self.steps if isinstance(s, ev.GuardrailDecided)]

    @property
    def tool_outcomes(self) -> list[ToolOutcome]:
        return [s for s in self.steps if isinstance(s, ToolOutcome)]

    @property
    def model(self) -> str:
        """The model of the turn's first generation ("" when none ran)."""
        generations = self.generations
        return generations[0].model if generations else ""


Step = (
    GenerationRecord
    | ev.GuardrailDecided
    | ev.ContextCompacted
    | ev.ToolCallRequested
    | ToolOutcome
    | ev.ToolRoundLimitReached
)


@dataclass(slots=True, kw_only=True)
class Transcript:
    """A conversation up to `state.version`: its settings (in `state`) and its turns."""

    state: ConversationState
    turns: list[TurnRecord] = field(default_factory=list)
    archive_reason: str | None = None


def build_transcript(events: Sequence[RecordedEvent], *, at: int | None = None) -> Transcript:
    """The transcript of one stream's events, up to version `at` (all when None).

    Raises:
        TranscriptError: an event cannot be decoded or does not apply.
    """
    builder = _Builder()
    for event in events:
        if at is not None and event.stream_version > at:
            break
        try:
            domain_event = codec.decode_stored(event)
        except codec.UnknownEventTypeError as e:
            raise TranscriptError(event.stream_version, f"unknown event type {event.type!r}") from e
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise TranscriptError(
                event.stream_version, f"{event.type} cannot be decoded: {e}"
            ) from e
        try:
            builder.add(domain_event)
        except InvalidTransitionError as e:
            raise TranscriptError(event.stream_version, f"{event.type} does not apply: {e}") from e
    return builder.transcript


class _Builder:
    def __init__(self) -> None:
        self.transcript = Transcript(state=ConversationState())
        self._generations: dict[str, GenerationRecord] = {}

    def _turn(self) -> TurnRecord:
        return self.transcript.turns[-1]

    def add(self, event: ev.Event) -> None:
        before = self.transcript.state
        state = evolve(before, event)  # refuses what does not apply
        self.transcript.state = state
        match event:
            case ev.TurnStarted():
                self.transcript.turns.append(
                    TurnRecord(
                        number=len(self.transcript.turns) + 1,
                        turn_id=event.turn_id,
                        request_id=event.request_id,
                        start_version=state.version,
                        sampling=event.sampling,
                        max_tool_round_trips=event.max_tool_round_trips,
                        context_policy=event.context_policy,
                        strict_max_tokens=event.strict_max_tokens,
                        compaction_only=event.compaction_only,
                    )
                )
            case ev.MessageAppended(role=ev.Role.USER) if event.turn_id:
                self._turn().user_text = event.content
            case ev.GenerationStarted():
                record = GenerationRecord(
                    generation_id=event.generation_id,
                    model=event.model,
                    sampling=event.sampling,
                    context=event.context,
                    state_before=before,
                )
                self._generations[event.generation_id] = record
                self._turn().steps.append(record)
            case ev.TextStreamed():
                self._generation(event.generation_id).streamed.extend(event.pieces)
            case ev.TextRetracted():
                self._generation(event.generation_id).retracted.append(
                    (event.start, event.end, event.reason)
                )
            case ev.GenerationCompleted():
                record = self._generation(event.generation_id)
                record.text = event.text
                record.tool_calls = event.tool_calls
                record.finish_reason = event.finish_reason
                record.usage = event.usage
            case (
                ev.GuardrailDecided()
                | ev.ToolCallRequested()
                | ev.ToolRoundLimitReached()
                | ev.ContextCompacted()
            ):
                self._turn().steps.append(event)
            case ev.ToolCallCompleted():
                self._turn().steps.append(
                    ToolOutcome(call_id=event.call_id, ok=True, text=event.result)
                )
            case ev.ToolCallFailed():
                self._turn().steps.append(
                    ToolOutcome(call_id=event.call_id, ok=False, text=event.error)
                )
            case ev.ConversationArchived():
                self.transcript.archive_reason = event.reason
            case _:
                pass
        if isinstance(
            event,
            ev.TurnCompleted
            | ev.TurnFailed
            | ev.TurnCancelled
            | ev.TurnBlocked
            | ev.TurnInterrupted,
        ):
            ended = state.turns[-1]
            turn = self._turn()
            turn.status = ended.status
            turn.finish_reason = ended.finish_reason
            turn.outcome_reason = ended.outcome_reason
            turn.usage = ended.usage

    def _generation(self, generation_id: str) -> GenerationRecord:
        record = self._generations.get(generation_id)
        if record is None:
            raise InvalidTransitionError(f"generation {generation_id!r} never started")
        return record


# -- rendering ------------------------------------------------------------------


def transcript_to_json(transcript: Transcript) -> dict[str, object]:
    """The transcript as plain JSON (`turnlog replay --json`): settings, then turns and steps."""
    state = transcript.state
    return {
        "conversation_id": state.conversation_id,
        "version": state.version,
        "forked_from": list(state.forked_from) if state.forked_from else None,
        "archived": state.archived,
        "settings": codec.state_to_json(
            dataclasses.replace(state, messages=(), turns=(), pending_tool_calls=())
        ),
        "turns": [
            {
                "number": turn.number,
                "turn_id": turn.turn_id,
                "request_id": turn.request_id,
                "start_version": turn.start_version,
                "status": str(turn.status),
                "finish_reason": str(turn.finish_reason) if turn.finish_reason else None,
                "outcome_reason": turn.outcome_reason,
                "user_text": turn.user_text,
                "usage": dataclasses.asdict(turn.usage),
                "steps": [_step_json(step) for step in turn.steps],
            }
            for turn in transcript.turns
        ],
    }


def _step_json(step: Step) -> dict[str, object]:
    match step:
        case GenerationRecord():
            return {
                "kind": "generation",
                "generation_id": step.generation_id,
                "model": step.model,
                "completed": step.completed,
                "text": step.said,
                "tool_calls": [dataclasses.asdict(c) for c in step.tool_calls],
                "finish_reason": str(step.finish_reason) if step.finish_reason else None,
                "retracted": [list(r) for r in step.retracted],
            }
        case ToolOutcome():
            return {"kind": "tool_result", **dataclasses.asdict(step)}
        case _:
            kind, data = codec.encode(step)
            return {"kind": kind, **data}


def _quote(text: str) -> str:
    """Text on one line: newlines and other control characters escaped as in JSON."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def describe_window(window: ev.ContextWindow) -> str:
    """One line: the policy, what was left out, the prompt's tokens and the reply's room."""
    if window.left_out_turns:
        kept = f"turns from version {window.first_version} ({window.left_out_turns} left out)"
    else:
        kept = "whole conversation"
    if window.compaction_id:
        kept += f", summary {window.compaction_id}"
    room = f"max_tokens {window.max_tokens}"
    if window.requested_max_tokens is not None:
        room += f" (clamped from {window.requested_max_tokens})"
    return (
        f"{window.policy}, {kept}, prompt {window.prompt_tokens} of "
        f"{window.max_context_tokens} tokens, {room}"
    )


def _sampling(sampling: ev.SamplingParams) -> str:
    parts = []
    for f in dataclasses.fields(sampling):
        value = getattr(sampling, f.name)
        if value is None or value == ():
            continue
        parts.append(f"{f.name}={json.dumps(list(value) if isinstance(value, tuple) else value)}")
    return " ".join(parts) or "(service defaults)"


def _outcome(turn: TurnRecord) -> str:
    if turn.status is TurnStatus.COMPLETED:
        return f"completed ({turn.finish_reason})"
    if turn.status is TurnStatus.RUNNING:
        return "unfinished (the log ends mid-turn)"
    if turn.outcome_reason:
        return f"{turn.status} ({turn.outcome_reason})"
    return str(turn.status)


def render_transcript(transcript: Transcript) -> str:
    """The transcript as plain text, one line per step (ends with a newline)."""
    state = transcript.state
    out: list[str] = [f"conversation {state.conversation_id} at version {state.version}"]
    if state.forked_from is not None:
        out.append(f"  forked from {state.forked_from[0]} at version {state.forked_from[1]}")
    out.append(f"  model: {state.model or '(service default)'}")
    out.append(f"  sampling: {_sampling(state.sampling)}")
    out.append(f"  guardrail profile: {state.guardrail_profile or '(service default)'}")
    if state.labels:
        out.append("  labels: " + ", ".join(f"{k}={v}" for k, v in state.labels))
    if state.tools:
        names = [f"{t.name}{' (client-side)' if t.client_side else ''}" for t in state.tools]
        out.append("  tools: " + ", ".join(names))
    if state.system_prompt:
        out.append(f"  system: {_quote(state.system_prompt)}")
    for turn in transcript.turns:
        out.append("")
        out.append(
            f"turn {turn.number} [{turn.turn_id}] request {turn.request_id}: {_outcome(turn)}"
        )
        out.append(f"  sampling: {_sampling(turn.sampling)}")
        if turn.compaction_only:
            out.append("  compaction (CompactConversation)")
        else:
            out.append(f"  user: {_quote(turn.user_text)}")
        for step in turn.steps:
            out.extend(_render_step(step))
        usage = turn.usage
        if turn.status is not TurnStatus.RUNNING and (
            usage.prompt_tokens or usage.completion_tokens
        ):
            out.append(
                f"  usage: {usage.prompt_tokens} prompt tokens"
                f" ({usage.cached_prompt_tokens} cached), {usage.completion_tokens} completion tokens"
            )
    if state.archived:
        out.append("")
        reason = f" ({transcript.archive_reason})" if transcript.archive_reason else ""
        out.append(f"archived{reason}")
    return "\n".join(out) + "\n"


def _render_step(step: Step) -> list[str]:
    match step:
        case ev.GuardrailDecided():
            reason = f": {_quote(step.reason)}" if step.reason else ""
            return [
                f"  guardrail {step.stage} {step.guardrail}@{step.guardrail_version}"
                f" -> {step.verdict}{reason}"
            ]
        case GenerationRecord():
            lines = [f"  generation {step.generation_id} ({step.model or 'default model'})"]
            if step.context is not None:
                lines.append(f"    context: {describe_window(step.context)}")
            if step.completed:
                if step.text:
                    lines.append(f"    assistant: {_quote(step.text)}")
                for call in step.tool_calls:
                    lines.append(f"    calls {call.name}({call.arguments_json}) [{call.call_id}]")
                lines.append(f"    finish: {step.finish_reason}")
            else:
                streamed = "".join(step.streamed)
                lines.append(f"    streamed before it ended: {_quote(streamed)}")
            for start, end, reason in step.retracted:
                lines.append(f"    withdrawn: characters {start}-{end} ({_quote(reason)})")
            return lines
        case ev.ToolCallRequested():
            where = "client" if step.client_side else "server"
            return [f"  tool call {step.call.call_id} -> {where}"]
        case ToolOutcome():
            label = "result" if step.ok else "failed"
            return [f"  tool {label} {step.call_id}: {_quote(step.text)}"]
        case ev.ToolRoundLimitReached():
            return [f"  tool round limit reached ({step.limit})"]
        case ev.ContextCompacted():
            return [
                f"  compacted {step.compaction_id} ({step.model or 'default model'}):"
                f" {step.summarized_turns} turn(s) from version {step.first_version}"
                f" to {step.through_version}, {step.replaced_tokens} tokens into"
                f" {step.summary_tokens}",
                f"    summary: {_quote(step.summary)}",
            ]
    return []
