"""Auditing a conversation stream: its hash chain is intact and its fold succeeds.

Pure code over recorded events (from the log or an export file): it is what
`VerifyConversation` runs, and what an import checks before writing.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from turnlog.domain import codec
from turnlog.domain.state import ConversationState, InvalidTransitionError, evolve
from turnlog.storage.hashchain import verify_chain
from turnlog.storage.port import RecordedEvent


class ProblemKind(enum.Enum):
    """What kind of check an event failed."""

    VERSION_SEQUENCE = "version_sequence"
    """Versions do not run 1, 2, 3 ... (an event deleted, or of another stream)."""
    HASH_CHAIN = "hash_chain"
    """An event's hash does not match its content, or its link to the previous one."""
    FOLD = "fold"
    """The event cannot be decoded or does not apply to the state before it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    """The outcome of `audit_stream`.

    Attributes:
        stream_id: the stream audited.
        events_checked: events read.
        last_version: the highest version read (0 for none).
        broken_at_version: the first version failing a check, or None.
        kind: which check it failed, or None.
        problem: what is wrong there, safe to show, or None.
        state: the folded state up to the event before the first broken one
            (the whole stream when intact).
    """

    stream_id: str
    events_checked: int
    last_version: int
    broken_at_version: int | None = None
    kind: ProblemKind | None = None
    problem: str | None = None
    state: ConversationState = field(default_factory=ConversationState)

    @property
    def ok(self) -> bool:
        """True when the chain verifies and the fold succeeds."""
        return self.broken_at_version is None


def audit_stream(stream_id: str, events: Sequence[RecordedEvent]) -> AuditReport:
    """Checks the chain (`turnlog.storage.hashchain`) and folds the stream.

    The first failing version wins, whichever check it fails; a fold failure
    after a chain failure is not reported (the state there is not trusted).
    """
    chain = verify_chain(stream_id, events)
    state = ConversationState()
    fold_failure: tuple[int, str] | None = None
    for event in events:
        if chain.broken_at_version is not None and event.stream_version >= chain.broken_at_version:
            break
        try:
            state = evolve(state, codec.decode_stored(event))
            tenant = event.tenant
            if tenant != state.tenant:
                # The tenant column derives from the hashed metadata, so an
                # event moved to another tenant breaks the chain; an event
                # naming another tenant than its conversation fails here.
                fold_failure = (
                    event.stream_version,
                    f"the event names tenant {tenant!r}, its conversation is {state.tenant!r}'s",
                )
        except codec.UnknownEventTypeError:
            fold_failure = (event.stream_version, f"unknown event type {event.type!r}")
        except InvalidTransitionError as e:
            fold_failure = (event.stream_version, f"{event.type} does not apply: {e}")
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            fold_failure = (event.stream_version, f"{event.type} cannot be decoded: {e}")
        if fold_failure is not None:
            break
    if fold_failure is None and chain.ok and events and not state.exists:
        fold_failure = (events[-1].stream_version, "the stream never creates a conversation")
    checked = len(events) if chain.ok else chain.events_checked
    broken: tuple[int | None, ProblemKind | None, str | None] = (None, None, None)
    if fold_failure is not None:
        broken = (fold_failure[0], ProblemKind.FOLD, fold_failure[1])
    elif not chain.ok:
        problem = chain.problem or "broken"
        kind = (
            ProblemKind.VERSION_SEQUENCE
            if problem.startswith(("version gap", "event of another stream"))
            else ProblemKind.HASH_CHAIN
        )
        broken = (chain.broken_at_version, kind, problem)
    return AuditReport(
        stream_id=stream_id,
        events_checked=checked,
        last_version=chain.last_version,
        broken_at_version=broken[0],
        kind=broken[1],
        problem=broken[2],
        state=state,
    )
