"""The whole event log read back after a load, and what it must hold.

`read_back` reads every event from the start of the log to its end
(`EventStore.read_all`, the order subscriptions follow), decodes each
conversation stream's events and folds them. The checks each return a list of
problems, empty when all holds, so a failing test names every problem at
once:

- `stream_problems`: the log's conversations are exactly the ones created;
  each stream's versions are gapless, it folds, its hash chain verifies, every
  event carries its conversation's tenant, and no turn is left open.
- `turn_problems`: every acknowledged turn is in the log exactly once (one
  `TurnStarted` with the request id sent, the turn id the client saw, one user
  message, one terminal event of the status the client saw); every started
  turn has exactly one terminal event (no half-written turn, whatever the
  client saw); and no turn is there that nobody sent.
- `subscription_problems`: the all-conversation subscriber received exactly
  the log's conversation events: none missing, none repeated, none extra,
  each stream in version order, and all of them in the log's own order.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from load_driver import LoadReport, SeenEvent

from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, TurnStatus, fold
from turnlog.eventlog import STREAM_PREFIX, stream_id
from turnlog.history.service import ADMIN_READS_STREAM
from turnlog.storage import START_POSITION, EventStore, RecordedEvent

#: The event type that ends a turn, by the status it gives the turn.
TERMINAL: dict[type[ev.Event], TurnStatus] = {
    ev.TurnCompleted: TurnStatus.COMPLETED,
    ev.TurnFailed: TurnStatus.FAILED,
    ev.TurnCancelled: TurnStatus.CANCELLED,
    ev.TurnBlocked: TurnStatus.BLOCKED,
    ev.TurnInterrupted: TurnStatus.INTERRUPTED,
}


@dataclass(slots=True, kw_only=True)
class LoggedStream:
    """One conversation stream as read back: stored events, decoded events, folded state."""

    stream_id: str
    recorded: list[RecordedEvent] = field(default_factory=list)
    decoded: list[ev.Event] = field(default_factory=list)
    state: ConversationState | None = None
    problem: str = ""
    """Why the stream does not decode or fold ("" when it does)."""


@dataclass(slots=True, kw_only=True)
class LogReadBack:
    """The whole log, in its all-streams order, and its conversation streams."""

    events: list[RecordedEvent]
    streams: dict[str, LoggedStream]

    def conversation_events(self) -> list[RecordedEvent]:
        return [e for e in self.events if e.stream_id.startswith(STREAM_PREFIX)]


async def read_back(
    store: EventStore, database_url: str, *, page: int = 1000, timeout_s: float = 60.0
) -> LogReadBack:
    """Reads the log from its start to its end, then decodes and folds each conversation.

    `read_all` returns only events below the oldest transaction still running
    anywhere on the server (docs/event-log.md, "No skipped events"), so on a
    server shared with other work its end can lag behind the last commit.
    The read goes on until it holds as many events as the table does (a
    count that sees every committed row), for at most `timeout_s`.
    """
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        counted = await (await conn.execute("SELECT count(*) FROM turnlog.events")).fetchone()
    committed = int(counted[0]) if counted else 0
    events: list[RecordedEvent] = []
    after = START_POSITION
    async with asyncio.timeout(timeout_s):
        while True:
            read = await store.read_all(after=after, limit=page)
            events.extend(read.events)
            after = read.next_position
            if read.reached_end:
                if len(events) >= committed:
                    break
                await asyncio.sleep(0.1)
    streams: dict[str, LoggedStream] = {}
    for event in events:
        if event.stream_id.startswith(STREAM_PREFIX):
            streams.setdefault(event.stream_id, LoggedStream(stream_id=event.stream_id))
            streams[event.stream_id].recorded.append(event)
    for stream in streams.values():
        try:
            stream.decoded = [codec.decode_stored(e) for e in stream.recorded]
            stream.state = fold(stream.decoded)
        except Exception as e:  # any failure to replay is what the check reports
            stream.problem = f"{type(e).__name__}: {e}"
    return LogReadBack(events=events, streams=streams)


def _tenants_by_stream(report: LoadReport) -> dict[str, str]:
    return {
        stream_id(c.conversation.removeprefix("conversations/")): c.tenant
        for c in report.creations
        if c.acknowledged
    }


async def stream_problems(store: EventStore, log: LogReadBack, report: LoadReport) -> list[str]:
    """The conversations are the ones created; each is gapless, folds, verifies, is one tenant's."""
    problems: list[str] = []
    tenants = _tenants_by_stream(report)
    if set(log.streams) != set(tenants):
        problems.append(
            f"conversation streams: {len(set(log.streams) - set(tenants))} not created by the load,"
            f" {len(set(tenants) - set(log.streams))} created and not in the log"
        )
    others = {e.stream_id for e in log.events if not e.stream_id.startswith(STREAM_PREFIX)}
    if others - {ADMIN_READS_STREAM}:
        problems.append(f"unexpected streams in the log: {sorted(others - {ADMIN_READS_STREAM})}")
    for sid, stream in sorted(log.streams.items()):
        versions = [e.stream_version for e in stream.recorded]
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"{sid}: versions in log order are not 1..{len(versions)}")
        if stream.state is None:
            problems.append(f"{sid}: does not fold: {stream.problem}")
        else:
            if not stream.state.exists or stream.state.version != len(versions):
                problems.append(
                    f"{sid}: folds to version {stream.state.version} of {len(versions)}"
                )
            if stream.state.tenant != tenants.get(sid, stream.state.tenant):
                problems.append(
                    f"{sid}: tenant {stream.state.tenant!r}, created as {tenants[sid]!r}"
                )
            if stream.state.open_turn is not None:
                problems.append(f"{sid}: turn {stream.state.open_turn.turn_id} never ended")
        if wrong := {e.tenant for e in stream.recorded} - {tenants.get(sid)}:
            problems.append(f"{sid}: events of tenants {sorted(wrong)}")
        verified = await store.verify(sid)
        if not verified.ok or verified.events_checked != len(versions):
            problems.append(
                f"{sid}: chain does not verify ({verified.events_checked} events checked,"
                f" broken at {verified.broken_at_version}: {verified.problem})"
            )
    return problems


def turn_problems(log: LogReadBack, report: LoadReport) -> list[str]:
    """Acknowledged turns exactly once as the client saw them; no half-written or stray turn."""
    problems: list[str] = []
    started: dict[str, dict[str, list[ev.TurnStarted]]] = {}
    ended: dict[str, dict[str, list[TurnStatus]]] = {}
    user_messages: dict[str, Counter[str]] = {}
    for sid, stream in log.streams.items():
        started[sid] = defaultdict(list)
        ended[sid] = defaultdict(list)
        user_messages[sid] = Counter()
        for event in stream.decoded:
            if isinstance(event, ev.TurnStarted):
                started[sid][event.request_id].append(event)
            elif type(event) in TERMINAL:
                ended[sid][event.turn_id].append(TERMINAL[type(event)])  # type: ignore[union-attr]
            elif isinstance(event, ev.MessageAppended) and event.role is ev.Role.USER:
                user_messages[sid][event.turn_id] += 1
        # Every turn that started ended exactly once, whatever its client saw.
        turn_ids = {s.turn_id for starts in started[sid].values() for s in starts}
        for turn_id in sorted(turn_ids):
            if len(ended[sid].get(turn_id, [])) != 1:
                problems.append(
                    f"{sid}: turn {turn_id} has {len(ended[sid].get(turn_id, []))} terminal events"
                )
        for turn_id in sorted(set(ended[sid]) - turn_ids):
            problems.append(f"{sid}: turn {turn_id} ended without starting")
    sent = {
        (stream_id(t.conversation.removeprefix("conversations/")), t.request_id)
        for t in report.turns
    }
    for sid, by_request in sorted(started.items()):
        for request_id in sorted(set(by_request) - {r for s, r in sent if s == sid}):
            problems.append(f"{sid}: a turn with request id {request_id!r} nobody sent")
    for turn in report.acknowledged():
        sid = stream_id(turn.conversation.removeprefix("conversations/"))
        what = f"{sid} {turn.rpc} {turn.request_id}"
        starts = started.get(sid, {}).get(turn.request_id, [])
        if len(starts) != 1:
            problems.append(f"{what}: acknowledged, and started {len(starts)} times in the log")
            continue
        if starts[0].turn_id != turn.turn_id:
            problems.append(
                f"{what}: acknowledged as {turn.turn_id}, logged as {starts[0].turn_id}"
            )
        if ended[sid].get(turn.turn_id) != [TurnStatus(turn.status)]:
            problems.append(
                f"{what}: acknowledged {turn.status}, logged {ended[sid].get(turn.turn_id)}"
            )
        if user_messages[sid][turn.turn_id] != 1:
            problems.append(f"{what}: {user_messages[sid][turn.turn_id]} user messages logged")
        state = log.streams[sid].state
        folded = state.turn_for_request(turn.request_id) if state is not None else None
        if folded is None or folded.status.value != turn.status:
            problems.append(
                f"{what}: folds to {folded and folded.status}, acknowledged {turn.status}"
            )
    return problems


def subscription_problems(seen: Sequence[SeenEvent], log: LogReadBack) -> list[str]:
    """The subscriber received exactly the log's conversation events, in the log's order."""
    problems: list[str] = []
    logged = log.conversation_events()
    logged_ids = [str(e.event_id) for e in logged]
    seen_ids = [s.event_id for s in seen]
    if repeated := sorted(i for i, n in Counter(seen_ids).items() if n > 1):
        problems.append(f"subscriber: {len(repeated)} events received more than once")
    if missing := set(logged_ids) - set(seen_ids):
        problems.append(f"subscriber: {len(missing)} of {len(logged_ids)} logged events missing")
    if extra := set(seen_ids) - set(logged_ids):
        problems.append(f"subscriber: {len(extra)} events received that the log does not hold")
    versions: dict[str, list[int]] = defaultdict(list)
    for s in seen:
        versions[s.stream_id].append(s.version)
    for sid, got in sorted(versions.items()):
        if got != list(range(1, len(got) + 1)):
            problems.append(f"subscriber: {sid} versions received out of order or with gaps")
    if not problems and seen_ids != logged_ids:
        problems.append("subscriber: received the log's events in another order than the log's")
    return problems
