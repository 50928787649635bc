"""The prompt's window: which turns a generation's prompt holds, decided before it starts.

`TokenCounter` counts every message once through the worker's tokenizer and
chat template (`EngineService.CountChatTokens`) and remembers the count, so
deciding costs one lookup per message in the window, never a pass over the
whole conversation. `plan_window` is the decision itself, pure: under the
`truncate` policy the oldest whole turns are left out until the prompt plus
the reply's room fits, in steps (the window keeps its start while it fits,
and when it must move it moves far enough to leave room for several more
turns), so that consecutive prompts share their prefix in the worker's cache.
The system prompt, the tools and the current turn are never left out, and a
turn is kept or left out whole, so a tool call is never apart from its
result. docs/context.md has the rules and the figures.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from turnlog import errors
from turnlog.conversation import engine_io
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, Message
from turnlog.engine.v1 import engine_pb2
from turnlog.worker.client import EngineClient


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnTokens:
    """One turn of the candidate window: where it starts in the stream and its messages' tokens."""

    start_version: int
    tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowRules:
    """The inputs of a decision that are not the conversation."""

    policy: ev.ContextPolicy
    max_context_tokens: int
    requested_max_tokens: int | None
    strict_max_tokens: bool = False
    keep_fraction: float = 0.6
    min_reply_tokens: int = 16
    trigger_fraction: float = 1.0
    """The window moves when the prompt plus the reply's room passes this fraction of the context (compact: `context_compact_threshold`)."""


def plan_window(
    *,
    head_tokens: int,
    turns: Sequence[TurnTokens],
    previous_first_version: int,
    left_out_before: int,
    rules: WindowRules,
) -> ev.ContextWindow:
    """The window of one generation's prompt.

    Args:
        head_tokens: The system prompt and tools, with the generation prompt.
        turns: The turns that may be in the window, oldest first; the last is
            the current turn, which is always in.
        previous_first_version: The start of the previous window (0: none);
            `turns` begins there.
        left_out_before: Turns before `turns[0]` (already left out).
        rules: The policy, the context length and the reply's room.

    Raises:
        ContextLengthExceededError: the current turn does not fit even alone
            with the system prompt (INVALID_ARGUMENT), or a strict turn's
            max_tokens does not fit beside its prompt.
        ContextExhaustedError: under `disabled`, the prompt plus max_tokens
            do not fit.
    """
    assert turns, "the current turn is always a candidate"
    limit = rules.max_context_tokens
    reply = rules.requested_max_tokens or max(rules.min_reply_tokens, limit // 4)
    suffix = [0] * (len(turns) + 1)
    for i in range(len(turns) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + turns[i].tokens
    start = 0
    if rules.policy is not ev.ContextPolicy.DISABLED:
        budget = limit - reply
        if head_tokens + suffix[0] > min(budget, int(limit * rules.trigger_fraction) - reply):
            # Move in a step: far enough that several turns fit before the next move.
            target = max(0, int(budget * rules.keep_fraction))
            while start < len(turns) - 1 and head_tokens + suffix[start] > target:
                start += 1
    prompt = head_tokens + suffix[start]
    room = limit - prompt
    counts = {
        "promptTokens": str(prompt),
        "maxTokens": str(reply),
        "maxContextTokens": str(limit),
        "policy": rules.policy.value,
    }
    if rules.policy is ev.ContextPolicy.DISABLED and prompt + reply > limit:
        raise errors.ContextExhaustedError(
            f"the prompt ({prompt} tokens) plus max_tokens ({reply}) exceed the context "
            f"length ({limit}) and the context policy is disabled (truncate leaves old turns out)",
            metadata=counts,
        )
    if room < rules.min_reply_tokens:
        raise errors.ContextLengthExceededError(
            f"the message does not fit the context: the prompt is {prompt} tokens with only the "
            f"system prompt and this turn, leaving {max(room, 0)} of {limit} for the reply "
            f"(at least {rules.min_reply_tokens} needed)",
            metadata={**counts, "minReplyTokens": str(rules.min_reply_tokens)},
        )
    max_tokens = reply
    requested = None
    if reply > room:
        if rules.strict_max_tokens:
            raise errors.ContextLengthExceededError(
                f"the prompt ({prompt} tokens) plus max_tokens ({reply}) exceed the context "
                f"length ({limit}) and the turn asked for strict max_tokens",
                metadata=counts,
            )
        max_tokens, requested = room, reply
    first_version = turns[start].start_version if start > 0 else previous_first_version
    return ev.ContextWindow(
        policy=rules.policy,
        first_version=first_version,
        left_out_turns=left_out_before + start,
        prompt_tokens=prompt,
        max_context_tokens=limit,
        max_tokens=max_tokens,
        requested_max_tokens=requested,
    )


def candidate_turns(
    state: ConversationState, first_version: int
) -> tuple[list[tuple[str, int]], int]:
    """The turns started at or after `first_version` as (turn id, start version), oldest first, and how many started before."""
    inside: list[tuple[str, int]] = []
    for turn in reversed(state.turns):
        if turn.start_version < first_version:
            break
        inside.append((turn.turn_id, turn.start_version))
    inside.reverse()
    return inside, len(state.turns) - len(inside)


class TokenCounter:
    """Token counts of messages, each counted once by the worker and remembered (LRU).

    A message never changes once recorded, so its id (and how many of its
    tool calls are answered, which changes how it renders) is its key. The
    head (system prompt and tools) is keyed by its serialized form.
    """

    def __init__(self, engine: EngineClient, *, cache_size: int = 100_000) -> None:
        self._engine = engine
        self._cache_size = cache_size
        self._messages: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._heads: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        #: Messages counted by the worker (not found in the cache), for tests and metrics.
        self.counted = 0

    async def count(
        self,
        state: ConversationState,
        messages: Sequence[Message],
        *,
        affinity_key: str,
        head: engine_pb2.ChatPrompt | None = None,
    ) -> tuple[int, list[int], int]:
        """(head tokens, one count per message, the model's context length).

        `head`: another head than the conversation's plain one (a summary in
        the system message, or a summary request's).
        """
        if head is None:
            head = engine_io.chat_head(state)
        head_key = head.SerializeToString(deterministic=True)
        rendered = engine_io.chat_messages(messages)
        keys = [(m.message_id, len(r.tool_calls)) for m, r in zip(messages, rendered, strict=True)]
        # Taken now: other turns may evict cached entries while this one
        # awaits the worker (the soak found that as a KeyError).
        known = {i: self._messages[key] for i, key in enumerate(keys) if key in self._messages}
        missing = [i for i in range(len(keys)) if i not in known]
        cached_head = self._heads.get(head_key)
        if missing or cached_head is None:
            reply = await self._engine.count_chat_tokens(
                engine_pb2.CountChatTokensRequest(
                    head=head, messages=[rendered[i] for i in missing]
                ),
                affinity_key=affinity_key,
            )
            self.counted += len(missing)
            cached_head = (reply.head_tokens, reply.max_context_tokens)
            self._remember(self._heads, head_key, cached_head)
            for i, tokens in zip(missing, reply.message_tokens, strict=True):
                known[i] = tokens
                self._remember(self._messages, keys[i], tokens)
        elif head_key in self._heads:
            self._heads.move_to_end(head_key)
        for key in keys:
            if key in self._messages:
                self._messages.move_to_end(key)
        return cached_head[0], [known[i] for i in range(len(keys))], cached_head[1]

    def _remember(self, cache: OrderedDict[Any, Any], key: object, value: object) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)


async def decide_window(
    counter: TokenCounter,
    state: ConversationState,
    rules: WindowRules,
    *,
    affinity_key: str,
    compaction_id: str = "",
) -> ev.ContextWindow:
    """The window of the next generation over `state` (whose last turn is the current one).

    `compaction_id`: the summary the prompt holds after the system prompt;
    the window then starts no earlier than the first turn it did not summarize.
    """
    previous = state.context_window
    first = 0
    if rules.policy is not ev.ContextPolicy.DISABLED and previous is not None:
        first = previous.first_version
    compaction = state.compaction(compaction_id)
    if compaction is not None:
        first = max(first, compaction.through_version)
    candidates, before = candidate_turns(state, first)
    messages = engine_io.window_messages(state, first)
    head_tokens, counts, max_context = await counter.count(
        state, messages, affinity_key=affinity_key, head=engine_io.chat_head(state, compaction_id)
    )
    per_turn = dict.fromkeys((turn_id for turn_id, _ in candidates), 0)
    for message, tokens in zip(messages, counts, strict=True):
        if message.turn_id in per_turn:
            per_turn[message.turn_id] += tokens
    turns = [TurnTokens(start_version=v, tokens=per_turn[t]) for t, v in candidates]
    window = plan_window(
        head_tokens=head_tokens,
        turns=turns,
        previous_first_version=first,
        left_out_before=before,
        rules=replace(rules, max_context_tokens=max_context),
    )
    return replace(window, compaction_id=compaction.compaction_id) if compaction else window


SUMMARY_INSTRUCTION = engine_io.SUMMARY_INSTRUCTION


@dataclass(frozen=True, slots=True, kw_only=True)
class CompactionPlan:
    """What a compaction summarizes, and the prompt that asks for the summary."""

    first_version: int
    through_version: int
    turns: int
    replaced_tokens: int
    previous_compaction_id: str
    prompt: engine_pb2.ChatPrompt
    prompt_tokens: int
    max_tokens: int


async def plan_compaction(
    counter: TokenCounter,
    state: ConversationState,
    *,
    through_version: int,
    summary_max_tokens: int,
    affinity_key: str,
) -> CompactionPlan | None:
    """The summary of the turns of the current window started before `through_version`, or None.

    The summary's prompt is the system prompt with the previous summary (no
    tools), the turns' messages as they are (so tool calls stay with their
    results), then `SUMMARY_INSTRUCTION`. If it does not fit with
    `summary_max_tokens` of reply, the oldest of those turns are left out of
    it (truncated, not summarized); None when nothing is left to summarize.
    """
    previous = state.compactions[-1] if state.compactions else None
    previous_id = previous.compaction_id if previous is not None else ""
    start = state.context_window.first_version if state.context_window is not None else 0
    if previous is not None:
        start = max(start, previous.through_version)
    turns = [
        (turn_id, version)
        for turn_id, version in candidate_turns(state, start)[0]
        if version < through_version
    ]
    if not turns:
        return None
    inside = {turn_id for turn_id, _ in turns}
    summary = engine_io.summary_messages(state, turns[0][1], through_version)
    messages = summary[:-1]
    head = engine_io.chat_head(state, previous_id, tools=False)
    head_tokens, counts, limit = await counter.count(
        state, summary, affinity_key=affinity_key, head=head
    )
    plain_head, _, _ = await counter.count(
        state, [], affinity_key=affinity_key, head=engine_io.chat_head(state, tools=False)
    )
    per_turn = dict.fromkeys(inside, 0)
    for message, tokens in zip(messages, counts, strict=False):
        per_turn[message.turn_id] += tokens
    total = head_tokens + sum(counts)
    while turns and total + summary_max_tokens > limit:
        total -= per_turn[turns.pop(0)[0]]
    if not turns:
        return None
    kept = {turn_id for turn_id, _ in turns}
    prompt = engine_io.summary_request_prompt(state, turns[0][1], through_version, previous_id)
    return CompactionPlan(
        first_version=turns[0][1],
        through_version=through_version,
        turns=len(turns),
        replaced_tokens=head_tokens - plain_head + sum(per_turn[t] for t in kept),
        previous_compaction_id=previous_id,
        prompt=prompt,
        prompt_tokens=total,
        max_tokens=summary_max_tokens,
    )


async def summary_tokens(
    counter: TokenCounter, state: ConversationState, compaction_id: str, *, affinity_key: str
) -> int:
    """What a summary adds to the head: the head with it minus the plain head."""
    with_summary, _, _ = await counter.count(
        state, [], affinity_key=affinity_key, head=engine_io.chat_head(state, compaction_id)
    )
    plain, _, _ = await counter.count(state, [], affinity_key=affinity_key)
    return with_summary - plain


__all__ = [
    "SUMMARY_INSTRUCTION",
    "CompactionPlan",
    "TokenCounter",
    "TurnTokens",
    "WindowRules",
    "candidate_turns",
    "decide_window",
    "plan_compaction",
    "plan_window",
    "summary_tokens",
]
