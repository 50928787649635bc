"""Turn control from any replica: cancels and client-side tool results, wherever the turn runs.

A turn runs in the process of the replica that started it (`RunningTurns`);
a `CancelTurn` or `SubmitToolResults` may arrive at any replica. `TurnControl`
decides on the log (is the turn open, which client-side calls does it await,
what did it record), then hands the action to the turn: directly when it
runs here, else as a letter in the turn mailbox (`turnlog.storage.TurnMailbox`),
which the replica running the turn takes and applies (`serve`). The caller
is answered from the log too: once the turn has ended (a cancel) or has
recorded every result (tool results), so the answer holds on every replica.

What travels is what the log would hold: a tool result or a cancel reason
passes the sanitize-request guardrails where it arrives, and the letter
carries the events that record it (`ToolOutcome`), never the client's text
as sent. docs/conversation.md, "Turn control", has the reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from turnlog import errors
from turnlog.conversation.options import ServiceDefaults
from turnlog.conversation.projection import TERMINAL_EVENTS
from turnlog.conversation.repository import ConversationRepository
from turnlog.conversation.running import RunningTurns
from turnlog.conversation.turn import ToolOutcome, check_tool_outcome
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, Turn
from turnlog.eventlog import Clock
from turnlog.guardrails import GuardrailPipeline, GuardrailRegistry, decisions_to_events
from turnlog.storage import Letter, TurnMailbox

log = logging.getLogger(__name__)

#: How long a caller waits at most for a cancelled turn's end, or for its
#: results to be recorded, when its call has no shorter deadline.
MAX_WAIT_S = 60.0
#: A letter nobody took is deleted by any replica after this long (its
#: sender died before withdrawing it; a live sender withdraws it when it
#: stops waiting, after `MAX_WAIT_S` at most).
LETTER_TTL_S = 3600.0
#: How often the receiver looks for letters without a notification (a lost
#: NOTIFY, a listener reconnecting).
POLL_INTERVAL_S = 2.0
#: How often each replica deletes letters older than `LETTER_TTL_S`.
EXPIRY_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolResultInput:
    """One client-side tool call's answer: `result`, or `error` when the tool failed."""

    call_id: str
    result: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Calls:
    """A turn's tool calls as far as the log shows: which the turn awaits, which are answered.

    `answered` holds the outcomes of the latest generation's calls, then
    (for ids not reused by it) those of earlier generations: call ids are
    unique within a generation only (a model may number its calls afresh).
    """

    awaited: frozenset[str]
    answered: dict[str, ev.ToolCallCompleted | ev.ToolCallFailed]


def _same_outcome(recorded: ev.ToolCallCompleted | ev.ToolCallFailed, outcome: ToolOutcome) -> bool:
    """Whether `outcome` would record exactly what was recorded (a repeated answer)."""
    mine = outcome.recorded
    if isinstance(recorded, ev.ToolCallCompleted):
        return isinstance(mine, ev.ToolCallCompleted) and mine.result == recorded.result
    return isinstance(mine, ev.ToolCallFailed) and mine.error == recorded.error


class _CallsReader:
    """Folds a turn's events into `_Calls` (the client-side calls of its latest generation)."""

    def __init__(self, turn_id: str, client_tools: frozenset[str]) -> None:
        self.turn_id = turn_id
        self.client_tools = client_tools
        self.latest: tuple[ev.ToolCall, ...] = ()
        #: Outcomes of the latest generation's calls.
        self.answered: dict[str, ev.ToolCallCompleted | ev.ToolCallFailed] = {}
        #: Outcomes of earlier generations' calls.
        self.earlier: dict[str, ev.ToolCallCompleted | ev.ToolCallFailed] = {}
        self.ended: ev.Event | None = None

    def apply(self, event: ev.Event) -> None:
        if getattr(event, "turn_id", None) != self.turn_id:
            return
        if isinstance(event, ev.GenerationCompleted):
            self.latest = event.tool_calls
            self.earlier.update(self.answered)
            self.answered = {}
        elif isinstance(event, ev.ToolCallCompleted | ev.ToolCallFailed):
            self.answered[event.call_id] = event
        elif isinstance(event, TERMINAL_EVENTS):
            self.ended = event

    def calls(self) -> _Calls:
        awaited = frozenset(
            c.call_id
            for c in self.latest
            if c.name in self.client_tools and c.call_id not in self.answered
        )
        return _Calls(
            awaited=frozenset() if self.ended is not None else awaited,
            answered={**self.earlier, **self.answered},
        )


class TurnControl:
    """Cancels and client tool results for turns running here or on another replica.

    Args:
        repository: The conversations (reads the log, follows a turn).
        running: This process's turns.
        mailbox: The mailbox shared with the other replicas; None when this
            process is the only one (a turn open but not running here then
            belongs to no one and waits for recovery).
        guardrails, defaults: Where the sanitize guardrails of a
            conversation's profile come from.
        clock: Microseconds since the epoch (a block's time).
    """

    def __init__(
        self,
        repository: ConversationRepository,
        running: RunningTurns,
        mailbox: TurnMailbox | None,
        *,
        guardrails: GuardrailRegistry,
        defaults: ServiceDefaults,
        clock: Clock,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.repository = repository
        self.running = running
        self.mailbox = mailbox
        self.guardrails = guardrails
        self.defaults = defaults
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self._receiver: asyncio.Task[None] | None = None

    def pipeline_of(self, state: ConversationState) -> GuardrailPipeline:
        """The sanitize guardrails a conversation's texts pass (its profile's)."""
        return GuardrailPipeline.for_profile(
            state.guardrail_profile or self.defaults.guardrail_profile, self.guardrails
        )

    # -- cancel ------------------------------------------------------------------

    async def request_cancel(self, state: ConversationState, turn: Turn, reason: str) -> int | None:
        """Hand a cancel to the open `turn`; returns the letter id when it went by mailbox.

        Raises:
            TurnNotRunningHereError: the turn runs elsewhere and there is no mailbox.
        """
        cid = state.conversation_id
        if self.running.get(cid, turn.turn_id) is not None:
            self.running.cancel(cid, turn.turn_id, reason)
            return None
        mailbox = self._mailbox(turn.turn_id)
        checked = self.pipeline_of(state).sanitize_input(reason, subject="the cancel reason")
        body = {
            "kind": "cancel",
            "conversation": cid,
            "reason": "cancelled" if checked.blocked is not None else checked.text,
            "decisions": [
                codec.encode(d)
                for d in decisions_to_events(checked.decisions, turn_id=turn.turn_id)
            ],
        }
        return await mailbox.post(turn.turn_id, json.dumps(body))

    async def withdraw(self, letter_id: int | None) -> None:
        """Remove a letter nobody took (its sender stopped waiting); never raises."""
        if letter_id is not None and self.mailbox is not None:
            await self.mailbox.withdraw(letter_id)

    def _mailbox(self, turn_id: str) -> TurnMailbox:
        if self.mailbox is None:
            raise errors.TurnNotRunningHereError(
                "the turn is not running on this server", metadata={"turnId": turn_id}
            )
        return self.mailbox

    # -- client tool results -------------------------------------------------------

    async def submit_tool_results(
        self,
        state: ConversationState,
        turn: Turn,
        results: Sequence[ToolResultInput],
        *,
        timeout_s: float,
    ) -> list[str]:
        """Answer client-side calls of `turn`; returns their ids once every result is recorded.

        A result identical to the recorded one is accepted and changes
        nothing; the whole request is refused, recording nothing, when any
        result is for a call the turn does not await or differs from the
        recorded one.

        Raises:
            ToolCallNotAwaitedError: as said.
            DeadlineExceededError: not recorded within `timeout_s` (it may be later).
            TurnNotRunningHereError: the turn runs elsewhere and there is no mailbox.
        """
        cid, turn_id = state.conversation_id, turn.turn_id
        pipeline = self.pipeline_of(state)
        mine = {
            r.call_id: check_tool_outcome(
                pipeline,
                turn_id,
                r.call_id,
                result=r.result,
                error=r.error,
                blocked_at_us=self.clock(),
            )
            for r in results
        }
        reader = _CallsReader(turn_id, frozenset(t.name for t in state.tools if t.client_side))
        letter_id: int | None = None
        try:
            follow = self.repository.follow(
                state.conversation_id, after_version=turn.start_version - 1
            )
            async with contextlib.aclosing(follow) as events:
                # The turn so far, as of `state` (the catch-up part of the follow).
                for _ in range(state.version - turn.start_version + 1):
                    reader.apply(await anext(events))
                calls = reader.calls()
                to_send = self._decide(turn_id, calls, mine)
                if not to_send:
                    return [r.call_id for r in results]
                letter_id = await self._deliver(cid, turn_id, {c: mine[c] for c in to_send})
                async with asyncio.timeout(timeout_s):
                    while any(c not in reader.answered for c in to_send) and reader.ended is None:
                        reader.apply(await anext(events))
        except TimeoutError:
            raise errors.DeadlineExceededError(
                "the results were not recorded in time; retry with the same results",
                metadata={"turnId": turn_id},
            ) from None
        finally:
            await self.withdraw(letter_id)
        for call_id in to_send:
            recorded = reader.answered.get(call_id)
            blocked = isinstance(mine[call_id].recorded, ev.TurnBlocked)
            if recorded is None and blocked and isinstance(reader.ended, ev.TurnBlocked):
                continue  # the result was blocked: the turn ended so
            if recorded is None or not _same_outcome(recorded, mine[call_id]):
                raise errors.ToolCallNotAwaitedError(
                    "the turn did not record this result (it ended, or took another)",
                    metadata={"turnId": turn_id, "callId": call_id},
                )
        return [r.call_id for r in results]

    @staticmethod
    def _decide(turn_id: str, calls: _Calls, mine: dict[str, ToolOutcome]) -> list[str]:
        """The calls to answer now; raises if any result is not acceptable (nothing sent then)."""
        to_send = []
        for call_id, outcome in mine.items():
            recorded = None if call_id in calls.awaited else calls.answered.get(call_id)
            if recorded is not None:
                if _same_outcome(recorded, outcome):
                    continue  # answered already, with this result
                raise errors.ToolCallNotAwaitedError(
                    f"tool call {call_id!r} was answered already with another result",
                    metadata={"turnId": turn_id, "callId": call_id},
                )
            if call_id not in calls.awaited:
                raise errors.ToolCallNotAwaitedError(
                    f"the turn does not await tool call {call_id!r}",
                    metadata={"turnId": turn_id, "callId": call_id},
                )
            to_send.append(call_id)
        return to_send

    async def _deliver(
        self, cid: str, turn_id: str, outcomes: dict[str, ToolOutcome]
    ) -> int | None:
        """Hand checked outcomes to the turn: directly here, else by letter (its id)."""
        live = self.running.get(cid, turn_id)
        if live is not None:
            for call_id, outcome in outcomes.items():
                live.deliver_tool_outcome(call_id, outcome)
            return None
        mailbox = self._mailbox(turn_id)
        body = {
            "kind": "tool_results",
            "conversation": cid,
            "outcomes": {
                call_id: {
                    "decisions": [codec.encode(d) for d in o.decisions],
                    "recorded": codec.encode(o.recorded),
                }
                for call_id, o in outcomes.items()
            },
        }
        return await mailbox.post(turn_id, json.dumps(body))

    # -- the receiving side ----------------------------------------------------------

    def start(self) -> None:
        """Take and apply the letters for this process's turns until `stop` (needs a mailbox)."""
        if self.mailbox is not None and (self._receiver is None or self._receiver.done()):
            self._receiver = asyncio.create_task(self._serve(), name="turn-control")

    async def stop(self) -> None:
        """Stop taking letters (shutdown); letters for this process's turns then wait, moot."""
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
            self._receiver = None

    async def _serve(self) -> None:
        """Woken by the mailbox (or its poll timeout): take this process's letters and apply them."""
        assert self.mailbox is not None
        mailbox = self.mailbox
        last_expiry = last_sweep = time.monotonic()
        while True:
            notice = await mailbox.wait(self.poll_interval_s)
            here = set(self.running.turns)
            # Every poll interval all of this process's turns are looked at,
            # even while notices for other turns keep coming: a letter whose
            # NOTIFY was lost waits one interval at most (not until the
            # channel falls quiet, which on a busy cluster it never does).
            sweep = notice.everything or time.monotonic() - last_sweep >= self.poll_interval_s
            if sweep:
                last_sweep = time.monotonic()
            wanted = here if sweep else here & notice.turn_ids
            try:
                for letter in await mailbox.take(wanted) if wanted else ():
                    self.apply(letter)
                if time.monotonic() - last_expiry >= EXPIRY_INTERVAL_S:
                    last_expiry = time.monotonic()
                    await mailbox.expire(LETTER_TTL_S)
            except errors.StorageUnavailableError as e:
                log.warning("could not read the turn mailbox: %s", e)
                await asyncio.sleep(self.poll_interval_s)
            except Exception:
                # A bug must not stop this replica's turns from being reached.
                log.exception("turn control failed on a letter")

    def apply(self, letter: Letter) -> None:
        """Apply one letter to the turn it is for, if it still runs here (else it is moot)."""
        try:
            body: dict[str, Any] = json.loads(letter.body)
            cid = str(body["conversation"])
            if body["kind"] == "cancel":
                decisions = tuple(_decode(d) for d in body["decisions"])
                if self.running.get(cid, letter.turn_id) is not None:
                    self.running.cancel(
                        cid,
                        letter.turn_id,
                        str(body["reason"]),
                        decisions=tuple(d for d in decisions if isinstance(d, ev.GuardrailDecided)),
                    )
                return
            live = self.running.get(cid, letter.turn_id)
            if live is None:
                return
            for call_id, outcome in body["outcomes"].items():
                recorded = _decode(outcome["recorded"])
                if not isinstance(
                    recorded, ev.ToolCallCompleted | ev.ToolCallFailed | ev.TurnBlocked
                ):
                    raise TypeError("not a tool outcome")
                decided = tuple(_decode(d) for d in outcome["decisions"])
                live.deliver_tool_outcome(
                    call_id,
                    ToolOutcome(
                        decisions=tuple(d for d in decided if isinstance(d, ev.GuardrailDecided)),
                        recorded=recorded,
                    ),
                )
        except (KeyError, TypeError, ValueError) as e:
            log.error("ignoring a malformed turn letter %d: %s", letter.letter_id, type(e).__name__)


def _decode(pair: Any) -> ev.Event:
    type_name, data = pair
    return codec.decode(str(type_name), data)


__all__ = ["MAX_WAIT_S", "ToolResultInput", "TurnControl"]
