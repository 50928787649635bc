"""The events of a conversation stream.

Events are facts, named in the past tense, and never change once written.
Each is a frozen dataclass; `turnlog.domain.codec` turns them into the
`(type, data)` pairs the event log stores. Adding an optional field with a
default is backwards compatible; any other change of shape needs an upcaster
in the codec, so that old logs keep replaying.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

#: The tenant of conversations recorded before tenancy (their events name
#: none), and the tenant `turnlog serve`'s local token is for. The event log's
#: `tenant` column uses the same name (turnlog.storage.DEFAULT_TENANT).
DEFAULT_TENANT = "default"


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    TOOL_CALLS = "tool_calls"
    CANCELLED = "cancelled"
    ERROR = "error"


class ContextPolicy(enum.StrEnum):
    """What a turn does when the conversation outgrows the model's context."""

    DISABLED = "disabled"
    """Nothing is left out and max_tokens is never clamped: what does not fit is refused."""
    TRUNCATE = "truncate"
    """The oldest whole turns are left out of the prompt until it fits (the default)."""
    COMPACT = "compact"
    """Reserved: summarize the oldest turns (not built yet; acts as TRUNCATE)."""


class GuardrailStage(enum.StrEnum):
    REQUEST_INTERCEPT = "request_intercept"
    SANITIZE_REQUEST = "sanitize_request"
    CONDITIONAL_EXECUTION = "conditional_execution"
    EXECUTION_INTERCEPT = "execution_intercept"
    SANITIZE_RESPONSE = "sanitize_response"


class Verdict(enum.StrEnum):
    ALLOW = "allow"
    MODIFY = "modify"
    BLOCK = "block"


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolDefinition:
    name: str
    description: str = ""
    parameters_json_schema: str = "{}"
    client_side: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """Sampling settings; None means "not set here, inherit"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Structured output: the generated text must match this regular expression.
    regex: str | None = None

    def overridden_by(self, other: SamplingParams) -> SamplingParams:
        """Return these params with every field that `other` sets replaced."""
        return SamplingParams(
            temperature=_pick(other.temperature, self.temperature),
            top_p=_pick(other.top_p, self.top_p),
            top_k=_pick(other.top_k, self.top_k),
            max_tokens=_pick(other.max_tokens, self.max_tokens),
            seed=_pick(other.seed, self.seed),
            stop=other.stop or self.stop,
            regex=_pick(other.regex, self.regex),
        )


def _pick(preferred: T | None, fallback: T | None) -> T | None:
    return fallback if preferred is None else preferred


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    call_id: str
    name: str
    arguments_json: str


# --- conversation lifecycle -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationCreated:
    """A conversation's first event. `labels` are (key, value) pairs with unique keys, sorted."""

    conversation_id: str
    created_at_us: int
    system_prompt: str = ""
    model: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: tuple[ToolDefinition, ...] = ()
    guardrail_profile: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    request_id: str = ""
    max_tool_round_trips: int | None = None
    context_policy: ContextPolicy | None = None
    """The conversation's context policy (None: the service default)."""
    tenant: str = ""
    """The tenant that owns the conversation ("": recorded before tenancy, `DEFAULT_TENANT`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationForked:
    """First event of a fork: the new stream starts as a copy of the source's prefix."""

    conversation_id: str
    source_conversation_id: str
    source_version: int
    forked_at_us: int
    tenant: str = ""
    """The tenant of the fork (always the source's: no fork crosses tenants)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationArchived:
    archived_at_us: int
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationUnarchived:
    """An archived conversation may take turns again."""

    unarchived_at_us: int


#: The settings `ConversationUpdated` can replace: `UpdateConversationRequest.update_mask` paths.
UPDATABLE_SETTINGS: tuple[str, ...] = (
    "system_prompt",
    "tools",
    "defaults",
    "labels",
    "guardrail_profile",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationUpdated:
    """Some of a conversation's settings replaced (`UpdateConversation`).

    Only the settings named in `fields` (`UPDATABLE_SETTINGS`, sorted) are
    replaced; the other values are left at their defaults and mean nothing.
    "defaults" replaces `model`, `sampling`, `max_tool_round_trips` and
    `context_policy` together. `labels` are (key, value) pairs with unique
    keys, sorted, stored as a JSON object as in `ConversationCreated`.
    Turns started after it use the new settings.
    """

    updated_at_us: int
    fields: tuple[str, ...]
    system_prompt: str = ""
    tools: tuple[ToolDefinition, ...] = ()
    model: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tool_round_trips: int | None = None
    context_policy: ContextPolicy | None = None
    labels: tuple[tuple[str, str], ...] = ()
    guardrail_profile: str = ""
    request_id: str = ""


# --- messages and turns -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageAppended:
    message_id: str
    role: Role
    content: str
    turn_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnStarted:
    turn_id: str
    request_id: str
    started_at_us: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tool_round_trips: int = 0
    context_policy: ContextPolicy | None = None
    """The turn's resolved context policy (None in logs written before policies)."""
    strict_max_tokens: bool = False
    """Refuse rather than clamp a max_tokens beyond the room the prompt leaves."""
    compaction_only: bool = False
    """A `CompactConversation` unit: no user message, one summary, no reply."""
    request_digest: str = ""
    """A digest of the request's content: a request id reused with other content is refused."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextWindow:
    """Which part of the conversation one generation's prompt held, and its token counts.

    The prompt is the system prompt and tools, then every message of the
    turns started at or after `first_version` (whole turns: a tool call is
    never apart from its result), the current turn always included.
    """

    policy: ContextPolicy
    first_version: int
    """Messages of turns whose TurnStarted is before this stream version are left out (0: none)."""
    left_out_turns: int
    prompt_tokens: int
    """The prompt's token count through the worker's tokenizer and chat template."""
    max_context_tokens: int
    max_tokens: int
    """The reply's room: the generation's max_tokens."""
    requested_max_tokens: int | None = None
    """Set when max_tokens was clamped to the room left: what was asked for."""
    compaction_id: str = ""
    """The summary (`ContextCompacted.compaction_id`) the prompt holds after the system prompt ("" none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextCompacted:
    """A summary of the oldest turns, generated in a turn, that later prompts hold in their place.

    Nothing is deleted: the summarized turns stay in the log and in the
    conversation's messages; a window that names this compaction holds the
    summary (with the system prompt) and the turns from `through_version` on.
    """

    turn_id: str
    compaction_id: str
    first_version: int
    """The summarized range starts with the turn started at this version (the previous summary, if any, was folded in)."""
    through_version: int
    """The first turn not summarized: later windows start at or after it."""
    summarized_turns: int
    summary: str
    model: str
    sampling: SamplingParams
    summary_tokens: int
    """The summary's tokens as it sits in the prompt (head with it minus head without)."""
    replaced_tokens: int
    """The tokens of the summarized turns' messages (and the previous summary) it replaces."""
    usage: Usage = field(default_factory=Usage)
    previous_compaction_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationStarted:
    turn_id: str
    generation_id: str
    worker: str
    model: str
    sampling: SamplingParams
    prompt_token_count: int = 0
    context: ContextWindow | None = None
    """The prompt's window (None in logs written before windows: the whole conversation)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationCompleted:
    turn_id: str
    generation_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    model: str
    sampling: SamplingParams
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TextStreamed:
    """Response text exactly as it was streamed to clients, coalesced.

    One event holds the pieces of text sent live since the previous one
    (a few events per second of generation, not one per token). Keeping the
    pieces, not their concatenation, lets any replica re-derive the live
    stream's numbering: each piece was one `TextDelta` with its own sequence.
    The text is what the response guardrails released (redacted), never the
    raw model output.
    """

    turn_id: str
    generation_id: str
    pieces: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TextRetracted:
    """Streamed text of a generation was withdrawn (a response guardrail blocked it).

    `start` and `end` count code points of the generation's streamed text.
    """

    turn_id: str
    generation_id: str
    start: int
    end: int
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallRequested:
    turn_id: str
    call: ToolCall
    client_side: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallCompleted:
    turn_id: str
    call_id: str
    result: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallFailed:
    turn_id: str
    call_id: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolRoundLimitReached:
    turn_id: str
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardrailDecided:
    turn_id: str
    stage: GuardrailStage
    guardrail: str
    guardrail_version: str
    verdict: Verdict
    reason: str = ""
    before_digest: str = ""
    after_digest: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnCompleted:
    turn_id: str
    completed_at_us: int
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnFailed:
    """A turn ended with an error; the API shows it as `Turn.error` (an `ErrorDetail`).

    `error_kind` is the error's reason (an `ErrorReason` name, "INTERNAL"
    for a bug). `message` (safe to show) and `metadata` (lowerCamel keys)
    were added later with empty defaults, so older events still decode.
    """

    turn_id: str
    failed_at_us: int
    error_kind: str
    phase: str
    retryable: bool
    message: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnCancelled:
    turn_id: str
    cancelled_at_us: int
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnBlocked:
    """A guardrail blocked the turn: a recorded outcome, not a server error."""

    turn_id: str
    blocked_at_us: int
    stage: GuardrailStage
    guardrail: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnInterrupted:
    """Written at start-up for a turn found without an end (the process died mid-turn)."""

    turn_id: str
    detected_at_us: int


Event = (
    ConversationCreated
    | ConversationForked
    | ConversationArchived
    | ConversationUpdated
    | ConversationUnarchived
    | MessageAppended
    | TurnStarted
    | GenerationStarted
    | GenerationCompleted
    | TextStreamed
    | TextRetracted
    | ToolCallRequested
    | ToolCallCompleted
    | ToolCallFailed
    | ToolRoundLimitReached
    | GuardrailDecided
    | ContextCompacted
    | TurnCompleted
    | TurnFailed
    | TurnCancelled
    | TurnBlocked
    | TurnInterrupted
)

EVENT_TYPES: tuple[type[Event], ...] = (
    ConversationCreated,
    ConversationForked,
    ConversationArchived,
    ConversationUpdated,
    ConversationUnarchived,
    MessageAppended,
    TurnStarted,
    GenerationStarted,
    GenerationCompleted,
    TextStreamed,
    TextRetracted,
    ToolCallRequested,
    ToolCallCompleted,
    ToolCallFailed,
    ToolRoundLimitReached,
    GuardrailDecided,
    ContextCompacted,
    TurnCompleted,
    TurnFailed,
    TurnCancelled,
    TurnBlocked,
    TurnInterrupted,
)
