"""The conversation's side of the engine protocol: what goes to a worker and what comes back.

In: a conversation's state and a generation's sampling become a
`StartGeneration` (the chat for the worker's template, the tool definitions,
the sampling, and how finely the text may be cut). Out: the worker's deltas
and its final message become the guardrails' `TextDelta`s and one
`GenerationFinished`. Like vLLM's input and output processors around
`AsyncLLM`: the turn never touches an engine protobuf.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from turnlog import metrics
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, Message
from turnlog.engine.v1 import engine_pb2
from turnlog.eventlog import derived_id
from turnlog.guardrails import GenerationFinished, TextDelta
from turnlog.guardrails.execution import ExecutionEvent

_FINISH = {
    engine_pb2.FINISH_REASON_STOP: ev.FinishReason.STOP,
    engine_pb2.FINISH_REASON_LENGTH: ev.FinishReason.LENGTH,
    engine_pb2.FINISH_REASON_STOP_SEQUENCE: ev.FinishReason.STOP_SEQUENCE,
    engine_pb2.FINISH_REASON_CANCELLED: ev.FinishReason.CANCELLED,
    engine_pb2.FINISH_REASON_ERROR: ev.FinishReason.ERROR,
}
_ROLES = {
    ev.Role.SYSTEM: engine_pb2.CHAT_ROLE_SYSTEM,
    ev.Role.USER: engine_pb2.CHAT_ROLE_USER,
    ev.Role.ASSISTANT: engine_pb2.CHAT_ROLE_ASSISTANT,
    ev.Role.TOOL: engine_pb2.CHAT_ROLE_TOOL,
}

#: What the engine is sent to start one generation.
EngineRequest = engine_pb2.StartGeneration
#: What the engine sends for one request: deltas, then its end.
EngineMessage = engine_pb2.GenerationDelta | engine_pb2.GenerationDone


def start_generation(
    state: ConversationState,
    sampling: ev.SamplingParams,
    *,
    first_version: int = 0,
    compaction_id: str = "",
    min_delta_interval_s: float = 0.0,
) -> engine_pb2.StartGeneration:
    """The engine request of a generation over the conversation as it stands.

    `first_version`: the window (see `chat_prompt`). `min_delta_interval_s`
    > 0 lets the worker hold text pieces up to that long (for a generation
    nobody streams).
    """
    start = engine_pb2.StartGeneration(
        chat=chat_prompt(state, first_version=first_version, compaction_id=compaction_id),
        sampling=engine_sampling(sampling),
    )
    if min_delta_interval_s > 0:
        start.min_delta_interval.FromNanoseconds(round(min_delta_interval_s * 1e9))
    return start


def copy_of(start: engine_pb2.StartGeneration) -> engine_pb2.StartGeneration:
    """A fresh copy to send (the engine client stamps a request id into what it sends)."""
    attempt = engine_pb2.StartGeneration()
    attempt.CopyFrom(start)
    return attempt


def window_messages(state: ConversationState, first_version: int) -> tuple[Message, ...]:
    """The messages of the turns started at or after `first_version` (all when it is 0 or 1).

    Walks back from the newest message only as far as the window reaches, so
    the cost follows the window, not the conversation.
    """
    if first_version <= 1:
        return state.messages
    inside: set[str] = set()
    for turn in reversed(state.turns):
        if turn.start_version < first_version:
            break
        inside.add(turn.turn_id)
    start = len(state.messages)
    while start > 0 and state.messages[start - 1].turn_id in inside:
        start -= 1
    return state.messages[start:]


#: How a summary joins the system prompt (docs/context.md, "Compaction").
SUMMARY_HEADER = "Summary of the earlier conversation:\n"


def system_content(state: ConversationState, compaction_id: str = "") -> str:
    """The system message: the system prompt, then the named compaction's summary (if any)."""
    compaction = state.compaction(compaction_id)
    if compaction is None:
        return state.system_prompt
    summary = SUMMARY_HEADER + compaction.summary
    return f"{state.system_prompt}\n\n{summary}" if state.system_prompt else summary


def chat_head(
    state: ConversationState, compaction_id: str = "", *, tools: bool = True
) -> engine_pb2.ChatPrompt:
    """What every prompt of the conversation starts with: the system message and the tools.

    With `compaction_id`, that compaction's summary is part of the system
    message (one system message: every chat template accepts it).
    """
    head = engine_pb2.ChatPrompt()
    system = system_content(state, compaction_id)
    if system:
        head.messages.append(
            engine_pb2.ChatMessage(role=engine_pb2.CHAT_ROLE_SYSTEM, content=system)
        )
    for tool in state.tools if tools else ():
        head.tools.append(
            engine_pb2.ToolDefinition(
                name=tool.name,
                description=tool.description,
                parameters_json_schema=tool.parameters_json_schema,
            )
        )
    return head


def chat_messages(messages: Sequence[Message]) -> list[engine_pb2.ChatMessage]:
    """Messages as the template gets them.

    Assistant tool calls that got no result among `messages` (cut by the
    round-trip cap, or left by an ended turn) are left out: chat templates
    expect every call to be answered.
    """
    answered = {m.tool_call_id for m in messages if m.role is ev.Role.TOOL}
    out = []
    for message in messages:
        chat = engine_pb2.ChatMessage(
            role=_ROLES[message.role], content=message.content, tool_call_id=message.tool_call_id
        )
        for call in message.tool_calls:
            if call.call_id in answered:
                chat.tool_calls.append(
                    engine_pb2.ToolCall(
                        id=call.call_id, name=call.name, arguments_json=call.arguments_json
                    )
                )
        out.append(chat)
    return out


def chat_prompt(
    state: ConversationState, *, first_version: int = 0, compaction_id: str = ""
) -> engine_pb2.ChatPrompt:
    """The prompt: the head (with the window's summary), then the window's messages (`window_messages`)."""
    prompt = chat_head(state, compaction_id)
    prompt.add_generation_prompt = True
    prompt.messages.extend(chat_messages(window_messages(state, first_version)))
    return prompt


#: The request that ends a summary's prompt (docs/context.md, "Compaction").
SUMMARY_INSTRUCTION = (
    "Summarize the conversation so far in a few sentences, for yourself to continue it: "
    "keep names, numbers, decisions and open questions. Do not call tools. "
    "Reply with the summary only."
)
_INSTRUCTION = Message(
    message_id="turnlog/summary-instruction", role=ev.Role.USER, content=SUMMARY_INSTRUCTION
)


def range_messages(state: ConversationState, first: int, through: int) -> list[Message]:
    """The messages of the turns started at or after `first` and before `through`."""
    inside = set()
    for turn in reversed(state.turns):  # back only as far as the range reaches
        if turn.start_version < first:
            break
        if turn.start_version < through:
            inside.add(turn.turn_id)
    return [m for m in window_messages(state, first) if m.turn_id in inside]


def summary_messages(state: ConversationState, first: int, through: int) -> list[Message]:
    """A summary request's messages: the range's, then the instruction."""
    return [*range_messages(state, first, through), _INSTRUCTION]


def summary_prompt(
    state: ConversationState, compacted: ev.ContextCompacted
) -> engine_pb2.ChatPrompt:
    """The prompt that asked for `compacted`'s summary, over the state just before it was recorded.

    The system message with the previous summary (no tools), the summarized
    turns' messages as they are, then `SUMMARY_INSTRUCTION`.
    """
    return summary_request_prompt(
        state, compacted.first_version, compacted.through_version, compacted.previous_compaction_id
    )


def summary_request_prompt(
    state: ConversationState, first: int, through: int, previous_compaction_id: str
) -> engine_pb2.ChatPrompt:
    prompt = chat_head(state, previous_compaction_id, tools=False)
    prompt.add_generation_prompt = True
    prompt.messages.extend(chat_messages(summary_messages(state, first, through)))
    return prompt


def engine_sampling(sampling: ev.SamplingParams) -> engine_pb2.SamplingParams:
    """The engine's sampling message (unset fields stay unset: the worker's defaults)."""
    params: dict[str, Any] = {"stop": list(sampling.stop)}
    if sampling.temperature is not None:
        params["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        params["top_p"] = sampling.top_p
    if sampling.top_k is not None:
        params["top_k"] = sampling.top_k
    if sampling.max_tokens is not None:
        params["max_tokens"] = sampling.max_tokens
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    if sampling.regex is not None:
        params["structured_output"] = engine_pb2.StructuredOutput(regex=sampling.regex)
    return engine_pb2.SamplingParams(**params)


class GenerationReader:
    """Reads one engine request's messages as the guardrails' execution events.

    Each delta becomes a `TextDelta`; the final message a `GenerationFinished`
    with the whole text, token ids, tool calls (ids derived from the turn
    where the worker gave none), finish reason and usage. Also observes the
    `first_token` (from `sent_at`) and `generation` stage times.
    """

    __slots__ = ("_first", "_model", "_sent_at", "_text", "_token_ids", "_turn_id")

    def __init__(self, *, turn_id: str, model: str, sent_at: float) -> None:
        self._turn_id = turn_id
        self._model = model
        self._sent_at = sent_at
        self._first = 0.0
        self._token_ids: list[int] = []
        self._text: list[str] = []

    def read(self, item: EngineMessage) -> ExecutionEvent:
        """The execution event of one engine message."""
        if isinstance(item, engine_pb2.GenerationDelta):
            if not self._first:
                self._first = time.perf_counter()
                metrics.observe_stage("first_token", self._first - self._sent_at)
            self._token_ids.extend(item.token_ids)
            self._text.append(item.text)
            return TextDelta(text=item.text, token_ids=tuple(item.token_ids))
        if self._first:
            metrics.observe_stage("generation", time.perf_counter() - self._first)
        calls = tuple(
            ev.ToolCall(
                call_id=c.id or derived_id(self._turn_id, "call", str(i)),
                name=c.name,
                arguments_json=c.arguments_json,
            )
            for i, c in enumerate(item.tool_calls)
        )
        return GenerationFinished(
            text="".join(self._text),
            tool_calls=calls,
            finish_reason=_FINISH.get(item.finish_reason, ev.FinishReason.STOP),
            model=self._model,
            usage=ev.Usage(
                prompt_tokens=item.usage.prompt_tokens,
                completion_tokens=item.usage.completion_tokens,
                cached_prompt_tokens=item.usage.cached_prompt_tokens,
            ),
            token_ids=tuple(self._token_ids),
        )


__all__ = [
    "SUMMARY_INSTRUCTION",
    "EngineMessage",
    "EngineRequest",
    "GenerationReader",
    "chat_head",
    "chat_messages",
    "chat_prompt",
    "copy_of",
    "engine_sampling",
    "range_messages",
    "start_generation",
    "summary_messages",
    "summary_prompt",
    "summary_request_prompt",
    "window_messages",
]
