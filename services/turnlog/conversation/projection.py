"""What clients see of a turn: its events as numbered updates, derived from the log.

`TurnProjector` maps the domain events of one turn, in stream order, to
`TurnUpdate`s numbered 1, 2, 3 … The numbering is a pure function of the
turn's events, and the running turn publishes an update only once its event
is recorded, through this same projection (`conversation/turn.py`): so the
live stream and a resume read back from the log on any replica, before or
after a crash, number every update the same way, and a client resuming after
sequence n gets exactly the updates after n, nothing lost or repeated.

Mapping (events not listed produce nothing):

| event | updates |
|---|---|
| `TurnStarted` | one `TurnStarted` |
| `GuardrailDecided` | one decision |
| `TextStreamed(pieces)` | one `TextPiece` per piece (each was one live delta) |
| `TextRetracted` | one `Retraction` (the event, and the withdrawn text's UTF-8 size) |
| `GenerationCompleted` | one `ToolCallPiece` per tool call, then one assistant message |
| `ToolCallRequested` | one `ToolStarted` |
| `ToolCallCompleted` / `ToolCallFailed` | one `ToolFinished` |
| `ToolRoundLimitReached` | one limit notice |
| `ContextCompacted` | one compaction notice |
| terminal (`TurnCompleted` … `TurnInterrupted`) | one `TurnEnded`, the last |

`TurnResult` is a whole turn's updates, as a unary `SendMessage` returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, Turn


@dataclass(frozen=True, slots=True, kw_only=True)
class TextPiece:
    """Text streamed to clients (already through the response guardrails)."""

    generation_id: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallPiece:
    """A tool call the model generated.

    Workers parse tool calls when a generation ends, so each call arrives
    whole, in one piece, before the assistant message that carries it.
    """

    generation_id: str
    call: ev.ToolCall


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolStarted:
    """A tool call is executed by the service, or awaited from the client."""

    call: ev.ToolCall
    client_side: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolFinished:
    """A tool call's outcome: `result`, or `error` when it failed."""

    call: ev.ToolCall
    result: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Retraction:
    """Streamed text withdrawn: the `TextRetracted` event, and the withdrawn text's size.

    The event counts code points (`end - start`); a client in a language
    whose strings count UTF-16 units or bytes needs a unit it can use as
    well, so the projection, which has seen every piece streamed, also
    counts the withdrawn text in UTF-8 bytes.
    """

    event: ev.TextRetracted
    utf8_bytes: int

    @property
    def chars(self) -> int:
        """Code points withdrawn."""
        return self.event.end - self.event.start


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnEnded:
    """The turn ended; always the last update of a turn."""

    turn: Turn
    conversation_version: int


UpdatePayload = (
    ev.TurnStarted
    | ev.GuardrailDecided
    | TextPiece
    | ToolCallPiece
    | Retraction
    | ev.GenerationCompleted
    | ToolStarted
    | ToolFinished
    | ev.ToolRoundLimitReached
    | ev.ContextCompacted
    | TurnEnded
)

TERMINAL_EVENTS = (
    ev.TurnCompleted,
    ev.TurnFailed,
    ev.TurnCancelled,
    ev.TurnBlocked,
    ev.TurnInterrupted,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnUpdate:
    """One numbered step of a turn, as streamed to clients.

    Attributes:
        conversation_id: The conversation.
        turn_id: The turn.
        sequence: 1, 2, 3 … within the turn, gapless.
        payload: What happened.
    """

    conversation_id: str
    turn_id: str
    sequence: int
    payload: UpdatePayload

    @property
    def is_last(self) -> bool:
        """True for the turn's final update."""
        return isinstance(self.payload, TurnEnded)


def turn_id_of(event: ev.Event) -> str | None:
    """The turn an event belongs to, or None for conversation-level events."""
    turn_id = getattr(event, "turn_id", None)
    return turn_id if isinstance(turn_id, str) and turn_id else None


class TurnProjector:
    """Numbers one turn's updates; feed it the turn's events in stream order.

    Args:
        conversation_id: The conversation.
        turn_id: The turn.
    """

    def __init__(self, conversation_id: str, turn_id: str) -> None:
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.sequence = 0
        self._calls: dict[str, ev.ToolCall] = {}
        self._streamed: dict[str, list[str]] = {}
        """generation id -> the pieces streamed so far (to size a retraction)."""

    def _next(self, payload: UpdatePayload) -> TurnUpdate:
        self.sequence += 1
        return TurnUpdate(
            conversation_id=self.conversation_id,
            turn_id=self.turn_id,
            sequence=self.sequence,
            payload=payload,
        )

    def apply(self, event: ev.Event, state_after: ConversationState) -> list[TurnUpdate]:
        """The updates `event` produces; `state_after` is the state folded through it."""
        if turn_id_of(event) != self.turn_id:
            return []
        match event:
            case ev.TurnStarted() | ev.GuardrailDecided():
                return [self._next(event)]
            case ev.TextRetracted():
                text = "".join(self._streamed.get(event.generation_id, ()))
                withdrawn = text[event.start : event.end].encode("utf-8", "surrogatepass")
                return [self._next(Retraction(event=event, utf8_bytes=len(withdrawn)))]
            case ev.GenerationCompleted():
                calls = [
                    self._next(ToolCallPiece(generation_id=event.generation_id, call=call))
                    for call in event.tool_calls
                ]
                return [*calls, self._next(event)]
            case ev.ToolRoundLimitReached() | ev.ContextCompacted():
                return [self._next(event)]
            case ev.TextStreamed():
                self._streamed.setdefault(event.generation_id, []).extend(event.pieces)
                return [
                    self._next(TextPiece(generation_id=event.generation_id, text=p))
                    for p in event.pieces
                ]
            case ev.ToolCallRequested():
                self._calls[event.call.call_id] = event.call
                return [self._next(ToolStarted(call=event.call, client_side=event.client_side))]
            case ev.ToolCallCompleted():
                return [
                    self._next(ToolFinished(call=self._call(event.call_id), result=event.result))
                ]
            case ev.ToolCallFailed():
                return [self._next(ToolFinished(call=self._call(event.call_id), error=event.error))]
            case _ if isinstance(event, TERMINAL_EVENTS):
                turn = state_after.turn(self.turn_id)
                assert turn is not None
                ended = TurnEnded(turn=turn, conversation_version=state_after.version)
                return [self._next(ended)]
        return []

    def _call(self, call_id: str) -> ev.ToolCall:
        return self._calls.get(call_id) or ev.ToolCall(call_id=call_id, name="", arguments_json="")


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnResult:
    """A finished turn, as `SendMessage` returns it."""

    updates: tuple[TurnUpdate, ...]

    @property
    def ended(self) -> TurnEnded:
        """The final update's payload."""
        last = self.updates[-1].payload
        assert isinstance(last, TurnEnded)
        return last

    @property
    def assistant_message(self) -> ev.GenerationCompleted | None:
        """The last generation of the turn, if any."""
        gens = [u.payload for u in self.updates if isinstance(u.payload, ev.GenerationCompleted)]
        return gens[-1] if gens else None

    @property
    def tool_executions(self) -> list[ToolFinished]:
        """Tool calls with their outcomes, in order."""
        return [u.payload for u in self.updates if isinstance(u.payload, ToolFinished)]

    @property
    def decisions(self) -> list[ev.GuardrailDecided]:
        """Every guardrail decision of the turn, in order."""
        return [u.payload for u in self.updates if isinstance(u.payload, ev.GuardrailDecided)]
