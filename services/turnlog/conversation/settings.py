"""Changing a conversation's settings (`UpdateConversation`): the command and its event.

Pure decisions only (no I/O): which `ConversationUpdated` a command makes,
whether it changes anything, and whether a retried request id asks for the
same change. `ConversationApplication.update` runs them against the log.

The event records every path of the request's mask with its value (not only
the values that differ), so that a retry of the same request can be told
from a different request that reuses its id by comparing the two events.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from turnlog.conversation.options import TurnOptions
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, evolve

#: The settings an update compares to decide whether it changes anything.
_SETTINGS = (
    "system_prompt",
    "tools",
    "model",
    "sampling",
    "max_tool_round_trips",
    "context_policy",
    "labels",
    "guardrail_profile",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateConversation:
    """Input of `ConversationApplication.update`: only the settings in `fields` are read.

    `fields` are `UpdateConversationRequest.update_mask` paths
    (`ev.UPDATABLE_SETTINGS`); the API layer has refused any other.
    """

    conversation_id: str
    fields: tuple[str, ...]
    system_prompt: str = ""
    tools: tuple[ev.ToolDefinition, ...] = ()
    defaults: TurnOptions = field(default_factory=TurnOptions)
    labels: tuple[tuple[str, str], ...] = ()
    guardrail_profile: str = ""
    request_id: str = ""
    expected_version: int | None = None
    tenant: str = ev.DEFAULT_TENANT
    """The caller's tenant: the conversation must be one of its own."""


def update_event(
    command: UpdateConversation, *, tools: tuple[ev.ToolDefinition, ...], at_us: int
) -> ev.ConversationUpdated:
    """The event `command` records; `tools` are its tools as the registry completed them.

    Values of settings the mask does not name are left at their defaults, so
    two events of the same request are equal whatever else was sent.
    """
    named = set(command.fields)
    defaults = command.defaults if "defaults" in named else TurnOptions()
    return ev.ConversationUpdated(
        updated_at_us=at_us,
        fields=tuple(sorted(named)),
        system_prompt=command.system_prompt if "system_prompt" in named else "",
        tools=tools if "tools" in named else (),
        model=defaults.model or "",
        sampling=defaults.sampling,
        max_tool_round_trips=defaults.max_tool_round_trips,
        context_policy=defaults.context_policy,
        labels=tuple(sorted(command.labels)) if "labels" in named else (),
        guardrail_profile=command.guardrail_profile if "guardrail_profile" in named else "",
        request_id=command.request_id,
    )


def changes_anything(state: ConversationState, event: ev.ConversationUpdated) -> bool:
    """Whether recording `event` would change any setting of `state`."""
    after = evolve(state, event)
    return any(getattr(after, name) != getattr(state, name) for name in _SETTINGS)


def same_request(first: ev.ConversationUpdated, again: ev.ConversationUpdated) -> bool:
    """Whether `again` asks for exactly the change `first` recorded (its time aside)."""
    return dataclasses.replace(again, updated_at_us=first.updated_at_us) == first


__all__ = ["UpdateConversation", "changes_anything", "same_request", "update_event"]
