"""A conversation's log as an ATIF trajectory (Agent Trajectory Interchange Format).

`export_atif(events)` turns the events of one conversation stream, in stream
order, into one ATIF trajectory (a JSON object, `ATIF_SCHEMA_VERSION`): the
system prompt, user messages and generations become steps, tool calls and
their results pair up inside the generation's step, token counts and token
ids become per-step metrics, and everything ATIF has no field for (turns and
their outcomes, guardrail decisions, retractions, sampling, fork origin) is
kept under `extra` at the level it belongs to. docs/atif.md has the full
mapping.

A pure function of its input: no clock, no I/O, so the same events always
export to the same trajectory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import TurnStatus, fold
from turnlog.storage.port import RecordedEvent

#: The ATIF version the export follows (Harbor RFC 0001, "trajectory format").
ATIF_SCHEMA_VERSION = "ATIF-v1.8"

JSONObject = dict[str, Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def export_atif(
    events: Sequence[RecordedEvent] | Sequence[ev.Event],
    *,
    agent_name: str = "turnlog",
    agent_version: str | None = None,
    model_name: str | None = None,
) -> JSONObject:
    """Export one conversation's events as an ATIF trajectory.

    Args:
        events: the whole stream of one conversation, in version order,
            starting at version 1: events as read from the log (decoded with
            the codec, stamped with their `recorded_at`) or domain events
            (stamped with the times the events themselves carry).
        agent_name: `agent.name`.
        agent_version: `agent.version`; None means the installed turnlog version.
        model_name: `agent.model_name`; None means the conversation's model.

    Returns:
        The trajectory as a JSON-ready dict (plain str, int, float, bool,
        lists and dicts), identical for identical input.

    Raises:
        ValueError: the events are empty, span several streams, or do not
            form a valid conversation (the fold refuses them).
    """
    exporter = _Exporter()
    for index, item in enumerate(events):
        exporter.add(item, index + 1)
    return exporter.trajectory(
        agent_name=agent_name,
        agent_version=agent_version if agent_version is not None else _turnlog_version(),
        model_name=model_name,
    )


# --- building blocks ----------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Step:
    step_id: int
    source: str
    timestamp: str | None
    message: str = ""
    copied: bool = False
    model_name: str | None = None
    tool_calls: list[JSONObject] = field(default_factory=list)
    results: list[JSONObject] = field(default_factory=list)
    metrics: JSONObject | None = None
    llm_call_count: int | None = None
    extra: JSONObject = field(default_factory=dict)

    def to_json(self) -> JSONObject:
        out: JSONObject = {"step_id": self.step_id}
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        out["source"] = self.source
        if self.model_name is not None:
            out["model_name"] = self.model_name
        out["message"] = self.message
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.results:
            out["observation"] = {"results": self.results}
        if self.metrics is not None:
            out["metrics"] = self.metrics
        if self.copied:
            out["is_copied_context"] = True
        if self.llm_call_count is not None:
            out["llm_call_count"] = self.llm_call_count
        if self.extra:
            out["extra"] = self.extra
        return out


@dataclass(slots=True, kw_only=True)
class _Generation:
    step: _Step
    completed: bool = False
    streamed: list[str] = field(default_factory=list)
    retracted: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class _Turn:
    record: JSONObject
    steps: list[_Step] = field(default_factory=list)
    open_generation: _Generation | None = None
    decisions: list[JSONObject] = field(default_factory=list)


class _Exporter:
    def __init__(self) -> None:
        self.domain_events: list[ev.Event] = []
        self.steps: list[_Step] = []
        self.turns: dict[str, _Turn] = {}
        self.generations: dict[tuple[str, str], _Generation] = {}
        self.call_steps: dict[str, _Step] = {}
        self.created: ev.ConversationCreated | None = None
        self.forked: ev.ConversationForked | None = None
        self.archived: ev.ConversationArchived | None = None
        self.updates: list[ev.ConversationUpdated] = []
        self.stream_id: str | None = None
        self.copied_through = 0
        # The event being added: its version, its recorded time (log input only).
        self.version = 0
        self.recorded_at: datetime | None = None
        self.clock_us: int | None = None

    # -- input -----------------------------------------------------------------

    def add(self, item: RecordedEvent | ev.Event, index: int) -> None:
        if isinstance(item, RecordedEvent):
            if self.stream_id is not None and item.stream_id != self.stream_id:
                raise ValueError("events of more than one stream")
            self.stream_id = item.stream_id
            event = codec.decode_stored(item)
            self.version = item.stream_version
            self.recorded_at = item.recorded_at
        elif isinstance(item, ev.EVENT_TYPES):
            event = item
            self.version = index
            self.recorded_at = None
        else:
            raise TypeError(f"not an event: {type(item).__name__}")
        self.domain_events.append(event)
        self._apply(event)

    def _apply(self, event: ev.Event) -> None:
        match event:
            case ev.ConversationCreated():
                self.created = event
                step = self._new_step("system", event, own_time_us=event.created_at_us)
                step.message = event.system_prompt
            case ev.ConversationForked():
                self.forked = event
                self._tick(event.forked_at_us)
                self.copied_through = self.version + event.source_version
            case ev.ConversationArchived():
                self.archived = event
                self._tick(event.archived_at_us)
            case ev.ConversationUnarchived():
                self.archived = None
                self._tick(event.unarchived_at_us)
            case ev.ConversationUpdated():
                # The agent above is the conversation as created; each change
                # of settings is listed in extra, and a new system prompt is a
                # system step where it took effect.
                self.updates.append(event)
                if "system_prompt" in event.fields:
                    step = self._new_step("system", event, own_time_us=event.updated_at_us)
                    step.message = event.system_prompt
                else:
                    self._tick(event.updated_at_us)
            case ev.MessageAppended():
                self._message(event)
            case ev.TurnStarted():
                self._tick(event.started_at_us)
                record: JSONObject = {
                    "turn_id": event.turn_id,
                    "request_id": event.request_id,
                    "status": TurnStatus.RUNNING.value,
                    "started_at_us": event.started_at_us,
                    "start_version": self.version,
                    "sampling": _sampling(event.sampling),
                    "max_tool_round_trips": event.max_tool_round_trips,
                }
                if self._copied():
                    record["is_copied_context"] = True
                self.turns[event.turn_id] = _Turn(record=record)
            case ev.GenerationStarted():
                self._generation_started(event)
            case ev.GenerationCompleted():
                self._generation_completed(event)
            case ev.TextStreamed():
                gen = self.generations.get((event.turn_id, event.generation_id))
                if gen is not None:
                    gen.streamed.extend(event.pieces)
            case ev.TextRetracted():
                retraction = {"generation_id": event.generation_id, **_data(event)}
                gen = self.generations.get((event.turn_id, event.generation_id))
                if gen is not None:
                    gen.retracted.append((event.start, event.end))
                    gen.step.extra.setdefault("retractions", []).append(retraction)
                else:
                    self._turn_extra(event.turn_id, "retractions", retraction)
            case ev.ToolCallRequested():
                self._tool_call_requested(event)
            case ev.ToolCallCompleted() | ev.ToolCallFailed():
                self._tool_result(event)
            case ev.ToolRoundLimitReached():
                self._record(event.turn_id)["tool_round_limit_reached"] = event.limit
            case ev.GuardrailDecided():
                self._decision(event)
            case ev.TurnCompleted():
                self._end(event.turn_id, TurnStatus.COMPLETED, event.completed_at_us, event)
            case ev.TurnFailed():
                self._end(event.turn_id, TurnStatus.FAILED, event.failed_at_us, event)
            case ev.TurnCancelled():
                self._end(event.turn_id, TurnStatus.CANCELLED, event.cancelled_at_us, event)
            case ev.TurnBlocked():
                self._end(event.turn_id, TurnStatus.BLOCKED, event.blocked_at_us, event)
            case ev.TurnInterrupted():
                self._end(event.turn_id, TurnStatus.INTERRUPTED, event.detected_at_us, event)

    # -- steps -----------------------------------------------------------------

    def _tick(self, time_us: int) -> None:
        self.clock_us = time_us

    def _copied(self) -> bool:
        return self.version <= self.copied_through

    def _new_step(
        self, source: str, event: ev.Event, *, own_time_us: int | None = None, turn_id: str = ""
    ) -> _Step:
        if own_time_us is not None:
            self._tick(own_time_us)
            timestamp = _iso_us(own_time_us)
        elif self.recorded_at is not None:
            timestamp = _iso(self.recorded_at)
        else:
            timestamp = None if self.clock_us is None else _iso_us(self.clock_us)
        step = _Step(
            step_id=len(self.steps) + 1,
            source=source,
            timestamp=timestamp,
            copied=self._copied(),
            extra={"event": type(event).__name__, "version": self.version},
        )
        if turn_id:
            step.extra["turn_id"] = turn_id
        self.steps.append(step)
        turn = self.turns.get(turn_id)
        if turn is not None:
            turn.steps.append(step)
        return step

    def _current_step(self, turn_id: str, event: ev.Event) -> _Step:
        """The step an event of a turn is about: the open generation's, else the turn's last."""
        turn = self.turns.get(turn_id)
        if turn is not None and turn.open_generation is not None:
            return turn.open_generation.step
        if turn is not None and turn.steps:
            return turn.steps[-1]
        return self._new_step("system", event, turn_id=turn_id)

    def _message(self, event: ev.MessageAppended) -> None:
        source = {
            ev.Role.SYSTEM: "system",
            ev.Role.USER: "user",
            ev.Role.ASSISTANT: "agent",
            ev.Role.TOOL: "system",
        }[event.role]
        step = self._new_step(source, event, turn_id=event.turn_id)
        step.extra["message_id"] = event.message_id
        if event.role is ev.Role.TOOL:
            # A tool result given as a message: no call of a step to pair with.
            step.extra["role"] = event.role.value
            step.results.append({"content": event.content})
        else:
            step.message = event.content

    def _generation_started(self, event: ev.GenerationStarted) -> None:
        step = self._new_step("agent", event, turn_id=event.turn_id)
        step.model_name = event.model or None
        info: JSONObject = {
            "generation_id": event.generation_id,
            "completed": False,
            "sampling": _sampling(event.sampling),
        }
        if event.worker:
            info["worker"] = event.worker
        if event.prompt_token_count:
            info["prompt_token_count"] = event.prompt_token_count
        step.extra["generation"] = info
        gen = _Generation(step=step)
        self.generations[(event.turn_id, event.generation_id)] = gen
        turn = self.turns.get(event.turn_id)
        if turn is not None:
            turn.open_generation = gen

    def _generation_completed(self, event: ev.GenerationCompleted) -> None:
        gen = self.generations.get((event.turn_id, event.generation_id))
        if gen is None:  # no GenerationStarted recorded: the step starts here
            step = self._new_step("agent", event, turn_id=event.turn_id)
            step.extra["generation"] = {"generation_id": event.generation_id}
            gen = _Generation(step=step)
            self.generations[(event.turn_id, event.generation_id)] = gen
        gen.completed = True
        step = gen.step
        step.message = event.text
        step.model_name = event.model or step.model_name
        step.llm_call_count = 1
        metrics: JSONObject = {
            "prompt_tokens": event.usage.prompt_tokens,
            "completion_tokens": event.usage.completion_tokens,
            "cached_tokens": event.usage.cached_prompt_tokens,
        }
        if event.token_ids:
            metrics["completion_token_ids"] = list(event.token_ids)
        step.metrics = metrics
        info = step.extra["generation"]
        info["completed"] = True
        info["finish_reason"] = event.finish_reason.value
        info["sampling"] = _sampling(event.sampling)
        for call in event.tool_calls:
            step.tool_calls.append(_tool_call(call))
            self.call_steps[call.call_id] = step
        turn = self.turns.get(event.turn_id)
        if turn is not None and turn.open_generation is gen:
            turn.open_generation = None

    def _tool_call_requested(self, event: ev.ToolCallRequested) -> None:
        step = self.call_steps.get(event.call.call_id)
        if step is None:
            # A call no generation step carries: a deterministic dispatch of its own.
            step = self._new_step("agent", event, turn_id=event.turn_id)
            step.llm_call_count = 0
            step.tool_calls.append(_tool_call(event.call))
            self.call_steps[event.call.call_id] = step
        if event.client_side:
            for call in step.tool_calls:
                if call["tool_call_id"] == event.call.call_id:
                    call.setdefault("extra", {})["client_side"] = True

    def _tool_result(self, event: ev.ToolCallCompleted | ev.ToolCallFailed) -> None:
        failed = isinstance(event, ev.ToolCallFailed)
        content = event.error if isinstance(event, ev.ToolCallFailed) else event.result
        result: JSONObject = {"source_call_id": event.call_id, "content": content}
        step = self.call_steps.get(event.call_id)
        if step is None:
            # A result for a call no step carries: kept, but not paired.
            step = self._current_step(event.turn_id, event)
            result = {"content": content, "extra": {"call_id": event.call_id}}
        if failed:
            result.setdefault("extra", {})["failed"] = True
        step.results.append(result)

    def _decision(self, event: ev.GuardrailDecided) -> None:
        decision = _data(event)
        turn = self.turns.get(event.turn_id)
        if turn is not None and turn.open_generation is None and not turn.steps:
            turn.decisions.append(decision)  # before any step of the turn
            return
        step = self._current_step(event.turn_id, event)
        step.extra.setdefault("guardrail_decisions", []).append(decision)

    def _record(self, turn_id: str) -> JSONObject:
        turn = self.turns.get(turn_id)
        return {} if turn is None else turn.record

    def _turn_extra(self, turn_id: str, key: str, value: JSONObject) -> None:
        self._record(turn_id).setdefault(key, []).append(value)

    def _end(self, turn_id: str, status: TurnStatus, at_us: int, event: ev.Event) -> None:
        self._tick(at_us)
        turn = self.turns.get(turn_id)
        if turn is None:
            return
        record = turn.record
        record["status"] = status.value
        record["ended_at_us"] = at_us
        record["end_version"] = self.version
        if isinstance(event, ev.TurnCompleted):
            record["finish_reason"] = event.finish_reason.value
            record["usage"] = _usage(event.usage)
        else:
            outcome = {
                k: v for k, v in _data(event).items() if not k.endswith("_at_us") and v != ""
            }
            if outcome:
                record["outcome"] = outcome
        turn.open_generation = None

    # -- output ----------------------------------------------------------------

    def trajectory(
        self, *, agent_name: str, agent_version: str, model_name: str | None
    ) -> JSONObject:
        if not self.domain_events:
            raise ValueError("no events to export")
        try:
            state = fold(self.domain_events)
        except Exception as e:  # InvalidTransitionError, or a turn of another stream
            raise ValueError(f"not a valid conversation stream: {e}") from e
        if not self.steps:
            raise ValueError("the stream has no step to export (no ConversationCreated)")
        for gen in self.generations.values():
            if not gen.completed:
                gen.step.message = _visible(gen.streamed, gen.retracted)
        created = self.created
        agent: JSONObject = {"name": agent_name, "version": agent_version}
        default_model = model_name or (created.model if created is not None else "") or None
        if default_model is not None:
            agent["model_name"] = default_model
        for step in self.steps:
            if step.model_name is not None and step.model_name == default_model:
                step.model_name = None  # omitted: the agent's model
        if created is not None and created.tools:
            agent["tool_definitions"] = [_tool_definition(t) for t in created.tools]
        agent_extra: JSONObject = {}
        if created is not None:
            if created.guardrail_profile:
                agent_extra["guardrail_profile"] = created.guardrail_profile
            if sampling := _sampling(created.sampling):
                agent_extra["sampling"] = sampling
            if client_side := [t.name for t in created.tools if t.client_side]:
                agent_extra["client_side_tools"] = client_side
        if agent_extra:
            agent["extra"] = agent_extra

        steps = [step.to_json() for step in self.steps]
        totals = {"total_prompt_tokens": 0, "total_completion_tokens": 0, "total_cached_tokens": 0}
        for step in self.steps:
            if step.metrics is not None:
                totals["total_prompt_tokens"] += step.metrics["prompt_tokens"]
                totals["total_completion_tokens"] += step.metrics["completion_tokens"]
                totals["total_cached_tokens"] += step.metrics["cached_tokens"]
        statuses: dict[str, int] = {}
        turns: list[JSONObject] = []
        for turn in self.turns.values():
            record = dict(turn.record)
            record["step_ids"] = [s.step_id for s in turn.steps]
            if turn.decisions:
                record["guardrail_decisions"] = turn.decisions
            turns.append(record)
            statuses[record["status"]] = statuses.get(record["status"], 0) + 1
        final_metrics: JSONObject = {
            **totals,
            "total_steps": len(steps),
            "extra": {
                "turns": len(turns),
                "turns_by_status": dict(sorted(statuses.items())),
                "generations": sum(g.completed for g in self.generations.values()),
            },
        }

        conversation: JSONObject = {
            "conversation_id": state.conversation_id,
            "version": state.version,
            "created_at_us": state.created_at_us,
        }
        if created is not None:
            if created.request_id:
                conversation["request_id"] = created.request_id
            if created.labels:
                conversation["labels"] = [list(pair) for pair in created.labels]
            if created.max_tool_round_trips is not None:
                conversation["max_tool_round_trips"] = created.max_tool_round_trips
        if self.archived is not None:
            conversation["archived"] = _data(self.archived)
        if self.updates:
            conversation["updates"] = [_data(u) for u in self.updates]
        extra: JSONObject = {"conversation": conversation}
        if self.forked is not None:
            extra["fork_origin"] = {
                "conversation_id": self.forked.source_conversation_id,
                "version": self.forked.source_version,
                "forked_at_us": self.forked.forked_at_us,
            }
        extra["turns"] = turns
        return {
            "schema_version": ATIF_SCHEMA_VERSION,
            "session_id": state.conversation_id,
            "agent": agent,
            "steps": steps,
            "final_metrics": final_metrics,
            "extra": extra,
        }


# --- value conversions -----------------------------------------------------------


def _data(event: ev.Event) -> JSONObject:
    """The event's stored JSON form, less its turn id (known from where it is placed)."""
    _, data = codec.encode(event)
    data.pop("turn_id", None)
    return data


def _sampling(sampling: ev.SamplingParams) -> JSONObject:
    """The sampling fields that are set (None and empty mean "inherited")."""
    out: JSONObject = {}
    for f in dataclasses.fields(sampling):
        value = getattr(sampling, f.name)
        if value is None or value == ():
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _usage(usage: ev.Usage) -> JSONObject:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_prompt_tokens,
    }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(text: str) -> JSONObject | None:
    """`text` parsed when it is a strict-JSON object, else None."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _tool_call(call: ev.ToolCall) -> JSONObject:
    arguments = _json_object(call.arguments_json)
    out: JSONObject = {
        "tool_call_id": call.call_id,
        "function_name": call.name,
        "arguments": arguments if arguments is not None else {},
    }
    if arguments is None:
        # Not a JSON object (a model's malformed call): kept verbatim.
        out["extra"] = {"arguments_json": call.arguments_json}
    return out


def _tool_definition(tool: ev.ToolDefinition) -> JSONObject:
    """OpenAI's function-calling shape, as ATIF's `tool_definitions` asks."""
    function: JSONObject = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    parameters = _json_object(tool.parameters_json_schema)
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def _visible(pieces: Sequence[str], retracted: Sequence[tuple[int, int]]) -> str:
    """Streamed text less the retracted code point ranges (as clients were left with it)."""
    text = "".join(pieces)
    if not retracted:
        return text
    keep = [True] * len(text)
    for start, end in retracted:
        for i in range(max(start, 0), min(end, len(text))):
            keep[i] = False
    return "".join(c for c, k in zip(text, keep, strict=True) if k)


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso_us(time_us: int) -> str | None:
    """ISO 8601 UTC for microseconds since the epoch; None when out of datetime's range."""
    try:
        return _iso(_EPOCH + timedelta(microseconds=time_us))
    except OverflowError:
        return None


def _turnlog_version() -> str:
    try:
        return metadata.version("turnlog")
    except metadata.PackageNotFoundError:
        return "0+unknown"
