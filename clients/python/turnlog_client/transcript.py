"""A conversation's messages and turns, folded on the client from its typed events.

`ReadEvents` with `EVENT_VIEW_TYPED` gives each stored event as a typed
message (`LogEvent.event`). `Transcript.fold` applies them in version order
the way the service folds its log: the system message is the system prompt
(a setting of `ConversationCreated`, changed by `ConversationUpdated`; the
API shows it first, with message id "system"); the other messages come from
`MessageAppended` (user messages), `GenerationCompleted` (assistant
messages, with their tool calls) and `ToolCallCompleted`/`ToolCallFailed`
(tool messages); turns open with `TurnStarted` and close with one of the
five ending events.
A client can thus rebuild, audit or render a conversation (at any version)
from the log alone, and a test holds the result to `GetConversation`.

Only what a reader of the history needs is folded (messages, turns, the
archived flag, the fork origin); settings stay with `GetConversation`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import history_pb2 as hpb

#: The id the API gives the system message.
SYSTEM_MESSAGE_ID = "system"
_ENDINGS = {
    "turn_completed": pb.TURN_STATUS_COMPLETED,
    "turn_failed": pb.TURN_STATUS_FAILED,
    "turn_cancelled": pb.TURN_STATUS_CANCELLED,
    "turn_blocked": pb.TURN_STATUS_BLOCKED,
    "turn_interrupted": pb.TURN_STATUS_INTERRUPTED,
}


class UntypedEventError(ValueError):
    """An event came without its typed form (read with a raw view, or a type this client lacks)."""


@dataclass(slots=True)
class TranscriptTurn:
    """One turn as the log tells it."""

    turn_id: str
    request_id: str
    status: pb.TurnStatus.ValueType = pb.TURN_STATUS_RUNNING
    compaction_only: bool = False
    tool_round_limit_reached: bool = False


@dataclass(slots=True)
class Transcript:
    """Messages and turns of one conversation, folded from typed events.

    Attributes:
        conversation: the resource name.
        version: the last version folded.
        system_prompt: the system prompt at `version`.
        chat: the messages but the system message, oldest first.
        turns: oldest first.
        archived: whether the conversation is archived at `version`.
        forked_from: (source name, source version) for a fork.
    """

    conversation: str = ""
    version: int = 0
    system_prompt: str = ""
    chat: list[pb.Message] = field(default_factory=list)
    turns: list[TranscriptTurn] = field(default_factory=list)
    archived: bool = False
    forked_from: tuple[str, int] | None = None

    @property
    def messages(self) -> list[pb.Message]:
        """Every message as GetConversation shows them: the system message (if any) first."""
        if not self.system_prompt:
            return list(self.chat)
        system = pb.Message(
            message_id=SYSTEM_MESSAGE_ID, role=pb.ROLE_SYSTEM, content=self.system_prompt
        )
        return [system, *self.chat]

    @classmethod
    def fold(cls, events: Iterable[hpb.LogEvent]) -> Transcript:
        """The transcript of `events` (one conversation's, in version order, typed)."""
        transcript = cls()
        for event in events:
            transcript.apply(event)
        return transcript

    def apply(self, event: hpb.LogEvent) -> None:
        """Folds one more event (the next version)."""
        kind = event.WhichOneof("event")
        if kind is None:
            raise UntypedEventError(
                f"event {event.version} ({event.type}) has no typed form: read with a typed view"
            )
        self.conversation = event.conversation
        self.version = event.version
        if kind == "conversation_created":
            self.system_prompt = event.conversation_created.system_prompt
        elif kind == "conversation_updated":
            updated = event.conversation_updated
            if "system_prompt" in updated.fields:
                self.system_prompt = updated.system_prompt
        elif kind == "conversation_forked":
            forked = event.conversation_forked
            self.forked_from = (
                f"conversations/{forked.source_conversation_id}",
                forked.source_version,
            )
        elif kind == "conversation_archived":
            self.archived = True
        elif kind == "conversation_unarchived":
            self.archived = False
        elif kind == "message_appended":
            m = event.message_appended
            self.chat.append(
                pb.Message(
                    message_id=m.message_id, role=m.role, content=m.content, turn_id=m.turn_id
                )
            )
        elif kind == "turn_started":
            s = event.turn_started
            self.turns.append(
                TranscriptTurn(s.turn_id, s.request_id, compaction_only=s.compaction_only)
            )
        elif kind == "generation_completed":
            g = event.generation_completed
            self.chat.append(
                pb.Message(
                    message_id=g.generation_id,
                    role=pb.ROLE_ASSISTANT,
                    content=g.text,
                    turn_id=g.turn_id,
                    tool_calls=g.tool_calls,
                )
            )
        elif kind in ("tool_call_completed", "tool_call_failed"):
            done = getattr(event, kind)
            content = done.result if kind == "tool_call_completed" else done.error
            self.chat.append(
                pb.Message(
                    message_id=f"{done.turn_id}/{done.call_id}",
                    role=pb.ROLE_TOOL,
                    content=content,
                    turn_id=done.turn_id,
                    tool_call_id=done.call_id,
                )
            )
        elif kind == "tool_round_limit_reached":
            self._turn(event.tool_round_limit_reached.turn_id).tool_round_limit_reached = True
        elif kind in _ENDINGS:
            self._turn(getattr(event, kind).turn_id).status = _ENDINGS[kind]

    def _turn(self, turn_id: str) -> TranscriptTurn:
        for turn in reversed(self.turns):
            if turn.turn_id == turn_id:
                return turn
        raise ValueError(f"turn {turn_id!r} ends before it started")


__all__ = ["Transcript", "TranscriptTurn", "UntypedEventError"]
