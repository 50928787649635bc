"""Generation settings and their override chain: turn, then conversation, then service.

`TurnOptions` are what a turn (or a conversation's defaults) asks for, None
meaning "inherit"; `ServiceDefaults` is the bottom of the chain plus the
service's operational settings; `resolve` applies the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnOptions:
    """Generation settings; None (or empty) means "inherit"."""

    model: str | None = None
    sampling: ev.SamplingParams = field(default_factory=ev.SamplingParams)
    max_tool_round_trips: int | None = None
    context_policy: ev.ContextPolicy | None = None
    strict_max_tokens: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceDefaults:
    """Service-wide settings, the bottom of the override chain.

    Attributes:
        model: The model name recorded when neither turn nor conversation names one.
        sampling: Default sampling (max_tokens bounds every generation).
        max_tool_round_trips: Default cap of model-tool round trips per turn.
        text_flush_interval_s: How often streamed text is recorded, and
            then shown to its watchers, while a generation runs (a
            generation's first piece is recorded at once): smoother
            streaming vs commits.
        client_tool_timeout_s: How long a turn awaits a client-side tool
            result; then the turn fails (`CLIENT_TOOL_TIMEOUT`).
        snapshot_every: Save a snapshot when this many events follow the last one.
        guardrail_profile: The profile of conversations that name none ("" = registry default).
        state_cache_size: Conversations whose latest folded state is kept in
            memory (LRU); a load then reads only the events after it. 0 disables.
        unwatched_delta_interval_s: For a generation no client streams (a
            `SendMessage` turn), the worker may send its text in pieces this
            far apart (`StartGeneration.min_delta_interval`) rather than one
            per engine step: the result is the same, for less host CPU per
            token on the worker and here. 0: every piece as it comes.
    """

    model: str = ""
    sampling: ev.SamplingParams = field(default_factory=lambda: ev.SamplingParams(max_tokens=512))
    max_tool_round_trips: int = 4
    text_flush_interval_s: float = 0.25
    client_tool_timeout_s: float = 60.0
    snapshot_every: int = 200
    guardrail_profile: str = ""
    state_cache_size: int = 1024
    unwatched_delta_interval_s: float = 0.05
    context_policy: ev.ContextPolicy = ev.ContextPolicy.TRUNCATE
    context_keep_fraction: float = 0.6
    context_min_reply_tokens: int = 16
    context_compact_threshold: float = 0.8
    """Under `compact`, the oldest turns are summarized once the prompt plus the reply's room passes this fraction of the context."""
    context_summary_max_tokens: int = 160
    """The room of a summary (its generation's max_tokens)."""
    token_count_cache_size: int = 100_000
    tenant_max_running_turns: int = 128
    """Turns one tenant may run at once on this replica (0: no limit); more are
    refused RESOURCE_EXHAUSTED (TENANT_LIMIT_EXCEEDED), so no tenant takes every
    worker slot from the others."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedOptions:
    """What a turn runs with, after the override chain."""

    model: str
    sampling: ev.SamplingParams
    max_tool_round_trips: int
    context_policy: ev.ContextPolicy
    strict_max_tokens: bool


def resolve(
    defaults: ServiceDefaults, state: ConversationState, overrides: TurnOptions
) -> ResolvedOptions:
    """Turn options over the conversation's defaults over the service's (sampling field by field)."""
    rounds = next(
        r
        for r in (
            overrides.max_tool_round_trips,
            state.max_tool_round_trips,
            defaults.max_tool_round_trips,
        )
        if r is not None
    )
    return ResolvedOptions(
        model=overrides.model or state.model or defaults.model,
        sampling=defaults.sampling.overridden_by(state.sampling).overridden_by(overrides.sampling),
        max_tool_round_trips=rounds,
        context_policy=(
            overrides.context_policy or state.context_policy or defaults.context_policy
        ),
        strict_max_tokens=bool(overrides.strict_max_tokens),
    )


__all__ = ["ResolvedOptions", "ServiceDefaults", "TurnOptions", "resolve"]
