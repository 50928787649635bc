"""History throughput: replay (fold), event reads over gRPC and JSONL export, with baselines.

Run: .venv/bin/python bench/history.py [--quick] [--dsn URL] [--reps R] [--json PATH]

Without --dsn it starts an embedded PostgreSQL in a temporary folder (removed
afterwards). Everything runs in this process and on loopback: the store, a
`ConversationServicer` (no engine: nothing here generates) on 127.0.0.1:0, and
the gRPC clients, which therefore share the process (and the GIL) with the
server. The log is built first, with realistic events (turns of TurnStarted,
MessageAppended, GuardrailDecided, GenerationStarted, TextStreamed,
GenerationCompleted with token_ids, every fourth turn a tool call,
TurnCompleted), made into `NewEvent`s by the application's own `_new_event`
(`turnlog.domain.codec.encode` and the service's metadata) and written
through `PostgresEventStore.append`, two appends per turn as the service does
(on connections with synchronous_commit off, to build quickly; what is
measured only reads). Then VACUUM ANALYZE and a CHECKPOINT.

1. Fold: one conversation of --fold-events events, loaded without a snapshot
   the way `HistoryService.verify` does (one `read_stream`, `codec.decode_stored`
   per event, `fold`), timed as read, decode and fold; the result is checked
   (version, turns, messages). Also `HistoryService.verify` end to end (the
   same plus the hash chain), the fold of the first tenth alone (how the fold
   scales), and `ConversationApplication.load` from the latest snapshot
   (saved at the last turn end at least 100 events before the head, as the
   service's snapshots every 200 events leave it; state cache off), whose
   state must equal the full fold's. Baseline: `SELECT data::text` of the
   same rows with plain psycopg, and `json.loads` of each.
2. Reads over gRPC: ReadEvents of the fold conversation paged 1000 at a time;
   ReadEvents of all conversations paged 1000 at a time; SubscribeEvents of
   all conversations until its `caught_up` marker (the streamed catch-up,
   several events per message), over a log of --log-events events. The same
   three through `HistoryService` in process (no gRPC), to split service and
   gRPC costs. Baselines, in process: `store.read_stream` paged by 1000 and
   `store.read_all` paged by 1000 (with the service's stream-prefix filter).
   Counts are checked.
3. Export: --conversations small conversations (--turns turns each) exported
   as JSONL by --clients concurrent clients: through `HistoryService.export_jsonl`
   in process, through the ExportConversation RPC (one channel per client),
   and, as the baseline, one plain psycopg query per conversation formatted
   with `turnlog.history.jsonl.event_line` (and the header) only. The three
   must give the same bytes for every conversation in every run, and every
   export of the first run is checked by `jsonl.verify_exported`.

4. Tenants, at the store: after the parts above, --tenants tenants'
   conversations (--tenant-events events per tenant, in conversations of at
   most 1,000 events, the tenant in every event's metadata) are appended,
   interleaved, to the same log. From the log's end before they were written:
   a tenant's events read to the end with `store.read_all(filter=
   EventFilter(tenant=T))` paged by 1000, against an unfiltered `read_all` of
   the same number of events from the same point; and the same two through
   `subscribe_all` (catch-up, the store's pages of 500). Each run does this
   for ten tenants spread over the log, one after the other, each tenant's
   read next to an unfiltered one (which goes first alternates), so that a
   run lasts long enough to time and load that drifts within it falls on
   both sides alike. The tenants' reads are checked to return exactly their
   events, in order. The full run's 2,500 events per tenant are not a
   multiple of the page, so both sides make the same queries (at a multiple,
   the tenant's read needs one more, empty, page to see its end; the
   unfiltered side knows its count). (An unfiltered subscription reads whole
   pages of 500: with --quick's 20 events per tenant it reads 25 times what
   it hands out, so that ratio means nothing there.)

Every figure is the median of --reps runs after one untimed warm-up run; the
scenarios of a part alternate, their order rotating each repetition. The JSON
output has `figures` {name: {median, runs, unit}} and a top-level `ratios`
object: each ratio is the throughput of the path named first over that of
the path named second (above 1: the first is faster), paired per repetition
(bench/paired.py: run i over run i, then median, min, max and every run),
never a ratio of two medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import psycopg
from paired import format_paired, paired_ratio, rotated
from psycopg.conninfo import make_conninfo
from psycopg.rows import namedtuple_row

from turnlog.api.server import grpc_server
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.channel import credentialed_channel
from turnlog.auth.principal import Scope
from turnlog.auth.settings import AuthSettings
from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, TurnStatus, fold
from turnlog.eventlog import STREAM_PREFIX, derived_id, stream_id
from turnlog.history import jsonl
from turnlog.history.service import CaughtUp, EventQuery, HistoryService
from turnlog.storage import EventFilter, Position, RecordedEvent
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.migrations import migrate
from turnlog.storage.port import START_POSITION
from turnlog.storage.postgres import PostgresEventStore
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

PAGE = 1000
T0_US = 1_700_000_000_000_000
SYSTEM_PROMPT = "You are a careful assistant for a software team. Answer briefly and exactly."
USER_TEXTS = [
    "Explain the difference between a list and a tuple in Python, with an example of each.",
    "What does the with statement do, and how would I write my own context manager?",
    "Describe how a hash table resolves collisions, and what happens when it grows.",
    "How do I reverse a singly linked list in place? Please show the loop.",
    "Our service times out under load. Which metrics should we look at first, and why?",
]
WORDS = [
    *("the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as"),
    *("this", "be", "are", "by", "or", "an", "from", "at", "which", "you", "can", "list"),
    *("tuple", "value", "index", "table", "bucket", "hash", "key", "node", "pointer", "loop"),
    *("load", "latency", "request", "queue", "memory", "thread", "lock", "commit", "version"),
    *("stream", "event", "state", "replay", "fold", "snapshot", "export"),
]
WORKER = "127.0.0.1:50051"
MODEL = "bench-model-7b"
SAMPLING = ev.SamplingParams(temperature=0.7, top_p=0.95, max_tokens=512)
# Each channel its own connection (gRPC otherwise shares one between channels
# to the same target), with the default message size limits of a client.
CLIENT_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
# The shortest turn `turn_events` makes (no tool call, one TextStreamed).
MIN_TURN_EVENTS = 8


# -- building the log -------------------------------------------------------------


@dataclass
class Conversation:
    """A conversation built for the log, and what its fold must give."""

    conversation_id: str
    batches: list[list[ev.Event]] = field(default_factory=list)
    turns: int = 0
    messages: int = 0
    turn_ends: list[int] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(len(b) for b in self.batches)

    def domain_events(self) -> Iterator[ev.Event]:
        for batch in self.batches:
            yield from batch


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _reply(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _generation(
    rng: random.Random,
    turn_id: str,
    generation_id: str,
    text: str,
    streamed: int,
    prompt_tokens: int,
    tool_calls: tuple[ev.ToolCall, ...] = (),
) -> list[ev.Event]:
    """GenerationStarted, `streamed` TextStreamed, the response guardrail, GenerationCompleted."""
    pieces = [w + " " for w in text.split(" ")]
    per_event = max(1, -(-len(pieces) // streamed))
    out: list[ev.Event] = [
        ev.GenerationStarted(
            turn_id=turn_id,
            generation_id=generation_id,
            worker=WORKER,
            model=MODEL,
            sampling=SAMPLING,
            prompt_token_count=prompt_tokens,
        )
    ]
    for k in range(streamed):
        chunk = tuple(pieces[k * per_event : (k + 1) * per_event]) or ("",)
        out.append(ev.TextStreamed(turn_id=turn_id, generation_id=generation_id, pieces=chunk))
    out.append(
        ev.GuardrailDecided(
            turn_id=turn_id,
            stage=ev.GuardrailStage.SANITIZE_RESPONSE,
            guardrail="pii",
            guardrail_version="1.2.0",
            verdict=ev.Verdict.ALLOW,
            before_digest=_digest(text),
            after_digest=_digest(text),
        )
    )
    completion = max(1, len(text) // 4)
    out.append(
        ev.GenerationCompleted(
            turn_id=turn_id,
            generation_id=generation_id,
            text=text,
            token_ids=tuple(rng.randrange(150_000) for _ in range(completion)),
            finish_reason=ev.FinishReason.TOOL_CALLS if tool_calls else ev.FinishReason.STOP,
            usage=ev.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=completion, cached_prompt_tokens=64
            ),
            model=MODEL,
            sampling=SAMPLING,
            tool_calls=tool_calls,
        )
    )
    return out


def turn_events(
    rng: random.Random, cid: str, i: int, *, tool: bool, streamed: int
) -> tuple[list[ev.Event], list[ev.Event], int]:
    """One turn as the service appends it: (request batch, generation batch, messages added).

    Without a tool call 7 + `streamed` events, with one 13 + `streamed`.
    """
    turn_id = derived_id(cid, "turn", f"r{i}")
    at = T0_US + i * 30_000_000
    user = f"{USER_TEXTS[i % len(USER_TEXTS)]} (turn {i})"
    request: list[ev.Event] = [
        ev.TurnStarted(
            turn_id=turn_id,
            request_id=f"r{i}",
            started_at_us=at,
            sampling=SAMPLING,
            max_tool_round_trips=4,
        ),
        ev.MessageAppended(
            message_id=derived_id(turn_id, "user"), role=ev.Role.USER, content=user, turn_id=turn_id
        ),
        ev.GuardrailDecided(
            turn_id=turn_id,
            stage=ev.GuardrailStage.REQUEST_INTERCEPT,
            guardrail="pii",
            guardrail_version="1.2.0",
            verdict=ev.Verdict.ALLOW,
            before_digest=_digest(user),
            after_digest=_digest(user),
        ),
    ]
    prompt = 300 + 40 * i
    generation: list[ev.Event] = []
    messages = 2  # the user's and the final assistant message
    if tool:
        call = ev.ToolCall(
            call_id=f"call-{i}",
            name="calculator",
            arguments_json=json.dumps({"expression": f"{i} * 7 + 3"}),
        )
        generation += _generation(
            rng, turn_id, derived_id(turn_id, "g0"), "Let me compute that.", 1, prompt, (call,)
        )
        generation += [
            ev.ToolCallRequested(turn_id=turn_id, call=call),
            ev.ToolCallCompleted(turn_id=turn_id, call_id=call.call_id, result=str(i * 7 + 3)),
        ]
        messages += 2  # the tool-calling assistant message and the tool result
    text = _reply(rng, rng.randrange(40, 220))
    generation += _generation(rng, turn_id, derived_id(turn_id, "g1"), text, streamed, prompt)
    generation.append(
        ev.TurnCompleted(
            turn_id=turn_id,
            completed_at_us=at + 4_000_000,
            finish_reason=ev.FinishReason.STOP,
            usage=ev.Usage(prompt_tokens=prompt, completion_tokens=len(text) // 4),
        )
    )
    return request, generation, messages


def build_conversation(
    rng: random.Random, cid: str, *, turns: int | None = None, events: int | None = None
) -> Conversation:
    """`turns` turns, or turns up to exactly `events` events (the last one padded).

    Every fourth turn calls a tool; turns stream 1-3 TextStreamed events each.
    """
    conv = Conversation(cid)
    created = ev.ConversationCreated(
        conversation_id=cid,
        created_at_us=T0_US,
        system_prompt=SYSTEM_PROMPT,
        model=MODEL,
        sampling=SAMPLING,
        tools=(ev.ToolDefinition(name="calculator", description="Evaluates arithmetic."),),
        guardrail_profile="default",
        labels=(("team", "bench"),),
        request_id=f"create-{cid}",
    )
    conv.batches.append([created])
    if events is not None and events < 1 + MIN_TURN_EVENTS:
        raise ValueError(f"a conversation of turns needs at least {1 + MIN_TURN_EVENTS} events")
    i = 0
    while True:
        if turns is not None and i == turns:
            break
        request, generation, messages = turn_events(
            rng, cid, i, tool=i % 4 == 3, streamed=1 + i % 3
        )
        if events is not None:
            remaining = events - conv.events
            if remaining - len(request) - len(generation) < MIN_TURN_EVENTS:
                # The last turn: no tool call, as many TextStreamed as fill up.
                request, generation, messages = turn_events(
                    rng, cid, i, tool=False, streamed=remaining - MIN_TURN_EVENTS + 1
                )
                turns = i + 1
        conv.batches += [request, generation]
        conv.turns += 1
        conv.messages += messages
        conv.turn_ends.append(conv.events)
        i += 1
    if events is not None:
        assert conv.events == events, (conv.events, events)
    return conv


async def write_conversation(
    store: PostgresEventStore,
    app: ConversationApplication,
    conv: Conversation,
    tenant: str | None = None,
) -> None:
    """Appends the conversation's batches in order (two appends per turn, as the service).

    Events are made by the application's own `_new_event` (codec.encode, the
    metadata the service records), so the stored form is the service's;
    `tenant`, when given, is set in every event's metadata.
    """
    version = 0
    sid = stream_id(conv.conversation_id)
    for b, batch in enumerate(conv.batches):
        correlation = f"create-{conv.conversation_id}" if b == 0 else f"r{(b - 1) // 2}"
        events = [
            app.repository.new_event(
                derived_id(sid, str(version + k + 1)), e, correlation=correlation
            )
            for k, e in enumerate(batch)
        ]
        if tenant is not None:
            events = [
                dataclasses.replace(e, metadata=dataclasses.replace(e.metadata, tenant=tenant))
                for e in events
            ]
        result = await store.append(sid, events, expected_version=version)
        version = result.last_version


async def write_all(
    store: PostgresEventStore,
    app: ConversationApplication,
    convs: Sequence[Conversation],
    writers: int,
    tenants: Sequence[str | None] | None = None,
) -> None:
    """Writes `convs` by `writers` concurrent writers; conversation i is `tenants[i]`'s."""
    todo = iter(zip(convs, tenants or [None] * len(convs), strict=True))

    async def writer() -> None:
        for conv, tenant in todo:
            await write_conversation(store, app, conv, tenant)

    await asyncio.gather(*(writer() for _ in range(writers)))


# -- measuring --------------------------------------------------------------------


@dataclass
class Figure:
    unit: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


class Figures:
    def __init__(self) -> None:
        self.items: dict[str, Figure] = {}

    def add(self, name: str, unit: str, value: float) -> None:
        self.items.setdefault(name, Figure(unit)).runs.append(value)

    def median(self, name: str) -> float:
        return self.items[name].median


async def repeat(
    scenarios: dict[str, Callable[[bool], Awaitable[None]]], reps: int, part: str
) -> None:
    """One untimed warm-up run of each scenario, then `reps` rounds in rotating order.

    A scenario's argument says whether its run is measured.
    """
    names = list(scenarios)
    for name in names:
        await scenarios[name](False)
    for rep in range(reps):
        for name in rotated(names, rep):
            gc.collect()
            await scenarios[name](True)
        print(f"  {part}: round {rep + 1}/{reps} done", file=sys.stderr)


async def timed(run: Awaitable[Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = await run
    return result, time.perf_counter() - start


# -- part 1: fold -----------------------------------------------------------------


def check_state(state: ConversationState, conv: Conversation, what: str) -> None:
    problems = []
    if state.version != conv.events:
        problems.append(f"version {state.version} != {conv.events}")
    if state.conversation_id != conv.conversation_id or not state.exists:
        problems.append("wrong or missing conversation")
    if len(state.turns) != conv.turns:
        problems.append(f"{len(state.turns)} turns != {conv.turns}")
    if any(t.status is not TurnStatus.COMPLETED for t in state.turns):
        problems.append("a turn is not completed")
    if len(state.messages) != conv.messages:
        problems.append(f"{len(state.messages)} messages != {conv.messages}")
    if problems:
        raise AssertionError(f"{what}: " + "; ".join(problems))


async def part_fold(
    store: PostgresEventStore,
    dsn: str,
    conv: Conversation,
    reps: int,
    figures: Figures,
) -> dict[str, Any]:
    sid = stream_id(conv.conversation_id)
    n = conv.events
    history = HistoryService(store)
    app = ConversationApplication(store, None, defaults=ServiceDefaults(state_cache_size=0))
    reference = fold(conv.domain_events())
    check_state(reference, conv, "the built conversation")
    # The latest snapshot: at the last turn end at least 100 events before the head.
    snap_version = max([v for v in conv.turn_ends if v <= n - 100] or [conv.turn_ends[0]])
    snap_state = fold(e for i, e in enumerate(conv.domain_events()) if i < snap_version)
    snap_bytes = json.dumps(codec.state_to_json(snap_state), separators=(",", ":")).encode()
    await store.save_snapshot(
        sid, kind=codec.STATE_KIND, stream_version=snap_version, state=snap_bytes
    )
    tenth = max(1, n // 10)
    plain = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

    async def replay(measure: bool) -> None:
        t0 = time.perf_counter()
        events = await store.read_stream(sid)
        t1 = time.perf_counter()
        decoded = [codec.decode_stored(e) for e in events]
        t2 = time.perf_counter()
        state = fold(decoded)
        t3 = time.perf_counter()
        check_state(state, conv, "fold")
        first = decoded[:tenth]
        t4 = time.perf_counter()
        fold(first)
        t5 = time.perf_counter()
        if measure:
            figures.add("fold_read", "ms", (t1 - t0) * 1000)
            figures.add("fold_decode", "ms", (t2 - t1) * 1000)
            figures.add("fold_fold", "ms", (t3 - t2) * 1000)
            figures.add("fold_total", "ms", (t3 - t0) * 1000)
            figures.add("fold_total_rate", "events/s", n / (t3 - t0))
            figures.add("fold_fold_first_tenth", "ms", (t5 - t4) * 1000)

    async def verify(measure: bool) -> None:
        report, s = await timed(history.verify(conv.conversation_id))
        if not report.ok or report.events_checked != n:
            raise AssertionError(f"verify: {report}")
        check_state(report.state, conv, "verify")
        if measure:
            figures.add("verify_total", "ms", s * 1000)
            figures.add("verify_total_rate", "events/s", n / s)

    async def snapshot(measure: bool) -> None:
        state, s = await timed(app.load(conv.conversation_id))
        if state != reference:
            raise AssertionError("the state loaded from the snapshot differs from the full fold")
        if measure:
            figures.add("snapshot_load", "ms", s * 1000)

    async def plain_parse(measure: bool) -> None:
        t0 = time.perf_counter()
        cur = await plain.execute(
            "SELECT data::text FROM turnlog.events WHERE stream_id = %s ORDER BY stream_version",
            (sid,),
        )
        rows = await cur.fetchall()
        parsed = [json.loads(r[0]) for r in rows]
        s = time.perf_counter() - t0
        if len(parsed) != n:
            raise AssertionError(f"plain read: {len(parsed)} rows, not {n}")
        if measure:
            figures.add("plain_select_parse", "ms", s * 1000)
            figures.add("plain_select_parse_rate", "events/s", n / s)

    try:
        await repeat(
            {"fold": replay, "verify": verify, "snapshot": snapshot, "plain": plain_parse},
            reps,
            "fold",
        )
    finally:
        await plain.close()
    return {
        "events": n,
        "turns": conv.turns,
        "messages": conv.messages,
        "first_tenth_events": tenth,
        "snapshot_version": snap_version,
        "snapshot_tail_events": n - snap_version,
        "snapshot_bytes": len(snap_bytes),
    }


# -- part 2: reads ----------------------------------------------------------------


async def part_reads(
    store: PostgresEventStore,
    stub: sgrpc.ConversationServiceStub,
    big: Conversation,
    total: int,
    reps: int,
    figures: Figures,
) -> dict[str, Any]:
    sid = stream_id(big.conversation_id)
    name = f"conversations/{big.conversation_id}"
    prefix = EventFilter(stream_prefix=STREAM_PREFIX)
    history = HistoryService(store)
    sizes = {
        "max_read_events_page_bytes": 0,
        "subscribe_messages": 0,
        "max_subscribe_message_bytes": 0,
    }

    def record(measure: bool, figure: str, count: int, expected: int, seconds: float) -> None:
        if count != expected:
            raise AssertionError(f"{figure}: read {count} events, expected {expected}")
        if measure:
            figures.add(figure, "events/s", count / seconds)

    async def read_stream(measure: bool) -> None:
        async def run() -> int:
            count, version = 0, 1
            while True:
                events = await store.read_stream(sid, from_version=version, limit=PAGE)
                count += len(events)
                if len(events) < PAGE:
                    return count
                version = events[-1].stream_version + 1

        count, s = await timed(run())
        record(measure, "store_read_stream_one", count, big.events, s)

    async def read_events_one(measure: bool) -> None:
        async def run() -> int:
            count, token, last = 0, "", 0
            while True:
                page = await stub.ReadEvents(
                    spb.ReadEventsRequest(conversation=name, page_size=PAGE, page_token=token)
                )
                sizes["max_read_events_page_bytes"] = max(
                    sizes["max_read_events_page_bytes"], page.ByteSize()
                )
                count += len(page.events)
                if page.events:
                    if page.events[0].version != last + 1:
                        raise AssertionError("ReadEvents skipped or repeated a version")
                    last = page.events[-1].version
                if not page.next_page_token:
                    return count
                token = page.next_page_token

        count, s = await timed(run())
        record(measure, "grpc_read_events_one", count, big.events, s)

    async def read_all(measure: bool) -> None:
        async def run() -> int:
            count, position = 0, START_POSITION
            while True:
                page = await store.read_all(after=position, limit=PAGE, filter=prefix)
                count += len(page.events)
                position = page.next_position
                if page.reached_end:
                    return count

        count, s = await timed(run())
        record(measure, "store_read_all", count, total, s)

    async def history_read_events_one(measure: bool) -> None:
        async def run() -> int:
            count, token = 0, ""
            query = EventQuery(conversation_id=big.conversation_id)
            while True:
                page = await history.read_events(query, page_size=PAGE, page_token=token)
                count += len(page.events)
                if not page.next_page_token:
                    return count
                token = page.next_page_token

        count, s = await timed(run())
        record(measure, "history_read_events_one", count, big.events, s)

    async def history_read_events_all(measure: bool) -> None:
        async def run() -> int:
            count, token = 0, ""
            while True:
                page = await history.read_events(EventQuery(), page_size=PAGE, page_token=token)
                count += len(page.events)
                if not page.next_page_token:
                    return count
                token = page.next_page_token

        count, s = await timed(run())
        record(measure, "history_read_events_all", count, total, s)

    async def history_subscribe_all(measure: bool) -> None:
        async def run() -> int:
            count = 0
            items = history.subscribe(EventQuery())
            try:
                async for item in items:
                    if isinstance(item, CaughtUp):
                        return count
                    count += len(item)
            finally:
                await items.aclose()  # type: ignore[attr-defined]
            raise AssertionError("subscribe ended before CaughtUp")

        count, s = await timed(run())
        record(measure, "history_subscribe_catch_up_all", count, total, s)

    async def read_events_all(measure: bool) -> None:
        async def run() -> int:
            count, token = 0, ""
            while True:
                page = await stub.ReadEvents(
                    spb.ReadEventsRequest(page_size=PAGE, page_token=token)
                )
                sizes["max_read_events_page_bytes"] = max(
                    sizes["max_read_events_page_bytes"], page.ByteSize()
                )
                count += len(page.events)
                if not page.next_page_token:
                    return count
                token = page.next_page_token

        count, s = await timed(run())
        record(measure, "grpc_read_events_all", count, total, s)

    async def subscribe_all(measure: bool) -> None:
        async def run() -> int:
            count, messages = 0, 0
            call = stub.SubscribeEvents(spb.SubscribeEventsRequest())
            try:
                async for item in call:
                    if item.HasField("caught_up"):
                        if not item.caught_up.position:
                            raise AssertionError("caught_up without a position")
                        sizes["subscribe_messages"] = messages
                        return count
                    if not item.events:
                        raise AssertionError("a SubscribeEvents message without events")
                    sizes["max_subscribe_message_bytes"] = max(
                        sizes["max_subscribe_message_bytes"], item.ByteSize()
                    )
                    count += len(item.events)
                    messages += 1
            finally:
                call.cancel()
            raise AssertionError("SubscribeEvents ended before caught_up")

        count, s = await timed(run())
        record(measure, "grpc_subscribe_catch_up_all", count, total, s)

    await repeat(
        {
            "read_stream": read_stream,
            "history_read_events_one": history_read_events_one,
            "read_events_one": read_events_one,
            "read_all": read_all,
            "history_read_events_all": history_read_events_all,
            "read_events_all": read_events_all,
            "history_subscribe_all": history_subscribe_all,
            "subscribe_all": subscribe_all,
        },
        reps,
        "reads",
    )
    return {"one_conversation_events": big.events, "log_events": total, **sizes}


# -- part 3: export ---------------------------------------------------------------

_PLAIN_EXPORT = (
    "SELECT stream_id, stream_version, event_id, type, recorded_at, data::text AS data_json,"
    " metadata::text AS metadata_json, prev_hash, hash"
    " FROM turnlog.events WHERE stream_id = %s ORDER BY stream_version"
)


async def part_export(
    store: PostgresEventStore,
    dsn: str,
    target: str,
    token: str,
    convs: Sequence[Conversation],
    clients: int,
    reps: int,
    figures: Figures,
) -> dict[str, Any]:
    history = HistoryService(store)
    cids = [c.conversation_id for c in convs]
    expected_events = {c.conversation_id: c.events for c in convs}
    reference: dict[str, bytes] = {}
    channels = [credentialed_channel(target, token, options=CLIENT_OPTIONS) for _ in range(clients)]
    stubs = [sgrpc.ConversationServiceStub(ch) for ch in channels]
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(clients)]

    async def drive(one: Callable[[int, str], Awaitable[bytes]]) -> tuple[dict[str, bytes], float]:
        todo = iter(cids)
        out: dict[str, bytes] = {}

        async def client(k: int) -> None:
            for cid in todo:
                out[cid] = await one(k, cid)

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return out, time.perf_counter() - start

    def check(side: str, out: dict[str, bytes]) -> None:
        if not reference:
            for cid in cids:
                data = out[cid]
                reports = jsonl.verify_exported(jsonl.split_lines(data))
                if len(reports) != 1 or not reports[0].ok:
                    raise AssertionError(f"{side}: the export of {cid} does not verify")
                if reports[0].last_version != expected_events[cid]:
                    raise AssertionError(f"{side}: the export of {cid} is incomplete")
            reference.update(out)
        elif out != reference:
            bad = next(cid for cid in cids if out.get(cid) != reference[cid])
            raise AssertionError(f"{side}: the export of {bad} differs from the verified one")

    def record(measure: bool, side: str, out: dict[str, bytes], seconds: float) -> None:
        check(side, out)
        if measure:
            size = sum(len(b) for b in out.values())
            figures.add(f"{side}_conversations", "conversations/s", len(out) / seconds)
            figures.add(f"{side}_bytes", "MB/s", size / seconds / 1e6)

    async def in_process(measure: bool) -> None:
        async def one(k: int, cid: str) -> bytes:
            return b"".join([chunk async for chunk in history.export_jsonl(cid)])

        out, s = await drive(one)
        record(measure, "export_in_process", out, s)

    async def rpc(measure: bool) -> None:
        async def one(k: int, cid: str) -> bytes:
            request = spb.ExportConversationRequest(
                name=f"conversations/{cid}", format=hpb.EXPORT_FORMAT_JSONL
            )
            return b"".join([r.data async for r in stubs[k].ExportConversation(request)])

        out, s = await drive(one)
        record(measure, "export_rpc", out, s)

    async def plain(measure: bool) -> None:
        async def one(k: int, cid: str) -> bytes:
            cur = conns[k].cursor(row_factory=namedtuple_row)
            await cur.execute(_PLAIN_EXPORT, (stream_id(cid),))
            rows = await cur.fetchall()
            lines = [jsonl.header_line()]
            lines += [jsonl.event_line(cast(RecordedEvent, r)) for r in rows]
            return "".join(lines).encode("utf-8")

        out, s = await drive(one)
        record(measure, "export_plain_query", out, s)

    try:
        await repeat({"in_process": in_process, "rpc": rpc, "plain": plain}, reps, "export")
    finally:
        for ch in channels:
            await ch.close(grace=None)
        for conn in conns:
            await conn.close()
    sizes = sorted(len(b) for b in reference.values())
    return {
        "conversations": len(cids),
        "events": sum(expected_events.values()),
        "clients": clients,
        "export_bytes_total": sum(sizes),
        "export_bytes_median": statistics.median(sizes),
        "verified_exports": len(reference),
    }


# -- part 4: tenants ------------------------------------------------------------------


def tenant_name(i: int) -> str:
    return f"tenant-{i:03d}"


def build_tenant_log(
    rng: random.Random, tag: str, tenants: int, per_tenant: int
) -> tuple[list[Conversation], list[str]]:
    """Every tenant's conversations (at most 1,000 events each), in the order to write them.

    Round-robin over the tenants (each tenant's first conversation, then each
    one's second, ...), so that the concurrent writers interleave tenants.
    """
    sizes: list[int] = []
    left = per_tenant
    while left > 0:
        size = min(1000, left)
        if 0 < left - size < 1 + MIN_TURN_EVENTS:  # keep the last one long enough
            size = left - (1 + MIN_TURN_EVENTS)
        sizes.append(size)
        left -= size
    convs: list[Conversation] = []
    owners: list[str] = []
    for c, size in enumerate(sizes):
        for t in range(tenants):
            convs.append(build_conversation(rng, f"tenant-{tag}-{t:03d}-{c}", events=size))
            owners.append(tenant_name(t))
    return convs, owners


async def part_tenants(
    store: PostgresEventStore,
    start: Position,
    measured: dict[str, list[str]],
    reps: int,
    figures: Figures,
) -> dict[str, Any]:
    """Tenants' events from `start` (the log's end before the tenants were written).

    `measured`: the tenants read in each run, each with its conversation
    streams; they hold the same number of events, n. A run reads each
    tenant's events to the end (which must be exactly its streams' events,
    in the all-stream order) and, beside each, n events from `start`
    unfiltered: the same number of reads of the same number of events.
    """
    counts: set[int] = set()
    for streams in measured.values():
        counts.add(sum([len(await store.read_stream(sid)) for sid in streams]))
    if len(counts) != 1:
        raise AssertionError(f"the measured tenants differ in size: {counts}")
    n = counts.pop()
    total = n * len(measured)

    def check(events: Sequence[RecordedEvent], tenant: str, what: str) -> None:
        streams = set(measured[tenant])
        if len(events) != n:
            raise AssertionError(f"{what}: {len(events)} events of {tenant}, expected {n}")
        if any(e.stream_id not in streams or e.tenant != tenant for e in events):
            raise AssertionError(f"{what}: an event not of {tenant}")
        positions = [e.position for e in events]
        if positions != sorted(set(positions)) or positions[0] <= start:
            raise AssertionError(f"{what}: not in the all-stream order after the start")

    def record(measure: bool, figure: str, count: int, seconds: float) -> None:
        if count != total:
            raise AssertionError(f"{figure}: read {count} events, expected {total}")
        if measure:
            figures.add(figure, "events/s", count / seconds)

    async def read_tenant(tenant: str) -> list[RecordedEvent]:
        events: list[RecordedEvent] = []
        position = start
        while True:  # to the end: the reader cannot know where the tenant's events stop
            page = await store.read_all(
                after=position, limit=PAGE, filter=EventFilter(tenant=tenant)
            )
            events += page.events
            position = page.next_position
            if page.reached_end:
                return events

    async def read_n() -> int:
        count, position = 0, start
        while count < n:
            page = await store.read_all(after=position, limit=min(PAGE, n - count))
            count += len(page.events)
            position = page.next_position
            if page.reached_end and count < n:
                raise AssertionError("the log ended before the unfiltered read's count")
        return count

    async def subscribe(filter: EventFilter | None) -> list[RecordedEvent]:
        events: list[RecordedEvent] = []
        subscription = store.subscribe_all(after=start, filter=filter)
        try:
            async for event in subscription:
                events.append(event)
                if len(events) == n:
                    break
        finally:
            await subscription.aclose()
        return events

    async def interleaved(
        measure: bool,
        tenant_side: Callable[[str], Awaitable[list[RecordedEvent]]],
        unfiltered_side: Callable[[], Awaitable[int]],
        figure: str,
        baseline: str,
        what: str,
    ) -> None:
        """For each tenant: its read, and an unfiltered read of n events, in alternating order.

        The two sides of a run interleave tenant by tenant (the first side
        alternating), so load that drifts during a run falls on both alike.
        """
        seconds = {figure: 0.0, baseline: 0.0}
        counts = {figure: 0, baseline: 0}
        for i, tenant in enumerate(measured):
            for side in rotated([figure, baseline], i):
                start_s = time.perf_counter()
                if side == figure:
                    events = await tenant_side(tenant)
                    elapsed = time.perf_counter() - start_s
                    if not measure:
                        check(events, tenant, what)
                    count = len(events)
                else:
                    count = await unfiltered_side()
                    elapsed = time.perf_counter() - start_s
                seconds[side] += elapsed
                counts[side] += count
        for side in (figure, baseline):
            record(measure, side, counts[side], seconds[side])

    async def reads(measure: bool) -> None:
        await interleaved(
            measure, read_tenant, read_n, "tenant_read_all", "tenant_baseline_read_all", "read_all"
        )

    async def subscribe_n() -> int:
        return len(await subscribe(None))

    async def subscribes(measure: bool) -> None:
        await interleaved(
            measure,
            lambda tenant: subscribe(EventFilter(tenant=tenant)),
            subscribe_n,
            "tenant_subscribe_catch_up",
            "tenant_baseline_subscribe_catch_up",
            "subscribe_all",
        )

    await repeat({"read_all": reads, "subscribe_all": subscribes}, reps, "tenants")
    return {"measured_tenants": list(measured), "events_per_measured_tenant": n}


async def analyze_and_checkpoint(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("VACUUM ANALYZE turnlog.events")
        # Flush what the build dirtied now, not during the measurements (a
        # --dsn role without the privilege skips this).
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute("CHECKPOINT")


async def write_tenants(
    dsn: str, convs: Sequence[Conversation], owners: Sequence[str]
) -> tuple[Position, float]:
    """Appends the tenants' conversations; the log's end before them, and the seconds taken."""
    started = time.perf_counter()
    writer = await PostgresEventStore.open(
        make_conninfo(dsn, options="-c synchronous_commit=off"), min_size=8, max_size=8
    )
    try:
        # The log's end: a tenant read that finds nothing moves past every event.
        nobody = await writer.read_all(filter=EventFilter(tenant="no tenant has this name"))
        assert nobody.reached_end
        assert not nobody.events
        start = nobody.next_position
        await write_all(writer, ConversationApplication(writer, None), convs, 8, owners)
    finally:
        await writer.close()
    await analyze_and_checkpoint(dsn)
    return start, time.perf_counter() - started


# -- the run ----------------------------------------------------------------------


async def bench(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    await migrate(dsn)
    rng = random.Random(args.seed)
    tag = uuid.uuid4().hex[:8]
    big = build_conversation(rng, f"fold-{tag}", events=args.fold_events)
    small = [
        build_conversation(rng, f"export-{tag}-{i:05d}", turns=args.turns)
        for i in range(args.conversations)
    ]
    filler: list[Conversation] = []
    have = big.events + sum(c.events for c in small)
    while have < args.log_events:
        conv = build_conversation(
            rng,
            f"fill-{tag}-{len(filler):05d}",
            events=max(1 + MIN_TURN_EVENTS, min(250, args.log_events - have)),
        )
        filler.append(conv)
        have += conv.events
    total = have

    started = time.perf_counter()
    writer = await PostgresEventStore.open(
        make_conninfo(dsn, options="-c synchronous_commit=off"), min_size=8, max_size=8
    )
    maker = ConversationApplication(writer, None)
    try:
        await asyncio.gather(
            write_conversation(writer, maker, big), write_all(writer, maker, filler, 4)
        )
        await write_all(writer, maker, small, 8)
    finally:
        await writer.close()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("VACUUM ANALYZE turnlog.events")
        # Flush what the build dirtied now, not during the measurements (a
        # --dsn role without the privilege skips this).
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute("CHECKPOINT")
        cur = await conn.execute(
            "SELECT count(*), pg_total_relation_size('turnlog.events'),"
            " current_setting('server_version') FROM turnlog.events"
        )
        row = await cur.fetchone()
    assert row is not None
    if row[0] != total:
        raise AssertionError(f"the log holds {row[0]} events, not {total}")
    build_s = time.perf_counter() - started
    print(f"  log built: {total} events in {build_s:.1f} s", file=sys.stderr)

    figures = Figures()
    store = await PostgresEventStore.open(dsn, min_size=clients_pool(args), max_size=20)
    app = ConversationApplication(store, None, defaults=ServiceDefaults(state_cache_size=0))
    # turnlog serve's own server, authentication and validation included; the
    # log's conversations (written with no tenant) are the tenant "default"'s.
    auth_dir = tempfile.TemporaryDirectory(prefix="turnlog-bench-auth-")
    authenticator = Authenticator(AuthSettings.local_default(Path(auth_dir.name)))
    assert authenticator.local_key is not None
    token = authenticator.local_key.mint_token(
        scopes=(Scope.READ, Scope.HISTORY), subject="bench", ttl_s=24 * 3600
    )
    server, _ = grpc_server(app, authenticator=authenticator)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        fold_info = await part_fold(store, dsn, big, args.reps, figures)
        async with credentialed_channel(target, token, options=CLIENT_OPTIONS) as channel:
            reads_info = await part_reads(
                store, sgrpc.ConversationServiceStub(channel), big, total, args.reps, figures
            )
        export_info = await part_export(
            store, dsn, target, token, small, args.clients, args.reps, figures
        )
        tenant_convs, owners = build_tenant_log(rng, tag, args.tenants, args.tenant_events)
        tenant_start, tenant_build_s = await write_tenants(dsn, tenant_convs, owners)
        print(
            f"  tenant log built: {sum(c.events for c in tenant_convs)} events in"
            f" {tenant_build_s:.1f} s",
            file=sys.stderr,
        )
        # Ten tenants spread over the log (fewer if there are fewer), read in turn.
        picks = sorted({tenant_name(i * args.tenants // 10) for i in range(10)})
        streams: dict[str, list[str]] = {t: [] for t in picks}
        for conv, owner in zip(tenant_convs, owners, strict=True):
            if owner in streams:
                streams[owner].append(stream_id(conv.conversation_id))
        measured_info = await part_tenants(store, tenant_start, streams, args.reps, figures)
        tenants_info = {
            "tenants": args.tenants,
            "events_per_tenant": args.tenant_events,
            "conversations_per_tenant": len(tenant_convs) // args.tenants,
            "events": sum(c.events for c in tenant_convs),
            **measured_info,
            "log_build_s": round(tenant_build_s, 1),
        }
    finally:
        await server.stop(0)
        await authenticator.aclose()
        auth_dir.cleanup()
        await app.shutdown()
        await store.close()

    def paired(faster_if_higher: str, baseline: str) -> dict[str, Any]:
        """Run i of the first figure over run i of the second (same part, same repetition)."""
        return paired_ratio(figures.items[faster_if_higher].runs, figures.items[baseline].runs)

    m = figures.median
    # Each ratio is a throughput over a throughput: for figures in ms the
    # baseline's time goes on top.
    ratios = {
        "fold_vs_plain_parse": paired("plain_select_parse", "fold_total"),
        "verify_vs_plain_parse": paired("plain_select_parse", "verify_total"),
        "snapshot_load_vs_fold": paired("fold_total", "snapshot_load"),
        "read_events_one_vs_read_stream": paired("grpc_read_events_one", "store_read_stream_one"),
        "read_events_all_vs_read_all": paired("grpc_read_events_all", "store_read_all"),
        "read_events_stream_vs_read_all": paired("grpc_subscribe_catch_up_all", "store_read_all"),
        "subscribe_rpc_vs_in_process": paired(
            "grpc_subscribe_catch_up_all", "history_subscribe_catch_up_all"
        ),
        "export_in_process_vs_plain_query": paired(
            "export_in_process_conversations", "export_plain_query_conversations"
        ),
        "export_rpc_vs_plain_query": paired(
            "export_rpc_conversations", "export_plain_query_conversations"
        ),
        "tenant_read_all_vs_unfiltered": paired("tenant_read_all", "tenant_baseline_read_all"),
        "tenant_subscribe_vs_unfiltered": paired(
            "tenant_subscribe_catch_up", "tenant_baseline_subscribe_catch_up"
        ),
    }
    # How the fold scales: time per event over the whole stream / over its first tenth.
    per_event_all = m("fold_fold") / big.events
    per_event_tenth = m("fold_fold_first_tenth") / fold_info["first_tenth_events"]
    fold_info["fold_per_event_all_vs_first_tenth"] = round(per_event_all / per_event_tenth, 2)
    return {
        "settings": {
            "fold_events": args.fold_events,
            "conversations": args.conversations,
            "turns": args.turns,
            "log_events": total,
            "clients": args.clients,
            "reps": args.reps,
            "seed": args.seed,
            "quick": args.quick,
            "database": "embedded PostgreSQL" if args.dsn is None else "--dsn",
            "server_version": row[2],
            "events_table_bytes": row[1],
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "grpc": grpc.__version__,
            "log_build_s": round(build_s, 1),
        },
        "fold": fold_info,
        "reads": reads_info,
        "export": export_info,
        "tenants": tenants_info,
        "figures": {
            name: {
                "median": round(f.median, 3),
                "runs": [round(v, 3) for v in f.runs],
                "unit": f.unit,
            }
            for name, f in figures.items.items()
        },
        "ratios": ratios,
    }


def clients_pool(args: argparse.Namespace) -> int:
    return max(2, min(20, int(args.clients) + 2))


def print_table(out: dict[str, Any]) -> None:
    s, f = out["settings"], out["figures"]
    print(
        f"PostgreSQL {s['server_version']}, log of {s['log_events']} events, "
        f"median of {s['reps']} runs (load average {s['load_average']})"
    )

    def row(label: str, name: str, extra: str = "") -> None:
        fig = f[name]
        value = fig["median"]
        text = f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"
        runs = [round(v) if v >= 100 else round(v, 2) for v in fig["runs"]]
        print(f"{label:<48}{text:>12} {fig['unit']:<16}{extra}{runs}")

    fo = out["fold"]
    print(
        f"\n1. Fold of one conversation: {fo['events']} events, {fo['turns']} turns, "
        f"{fo['messages']} messages"
    )
    row("read_stream (one query)", "fold_read")
    row("codec.decode_stored", "fold_decode")
    row("fold", "fold_fold")
    row("read + decode + fold", "fold_total")
    row("  = events/s", "fold_total_rate")
    row("HistoryService.verify (+ hash chain)", "verify_total")
    row("  = events/s", "verify_total_rate")
    row(f"fold of the first {fo['first_tenth_events']} events only", "fold_fold_first_tenth")
    row(
        f"load from snapshot @{fo['snapshot_version']} (+{fo['snapshot_tail_events']} events)",
        "snapshot_load",
    )
    row("baseline: SELECT data::text + json.loads", "plain_select_parse")
    row("  = events/s", "plain_select_parse_rate")
    print(
        f"fold time per event, whole stream / first tenth: "
        f"{fo['fold_per_event_all_vs_first_tenth']}"
    )
    r = out["reads"]
    print(
        f"\n2. Reads: one conversation of {r['one_conversation_events']} events; "
        f"all {r['log_events']} events (largest ReadEvents page "
        f"{r['max_read_events_page_bytes'] / 1e6:.2f} MB; SubscribeEvents catch-up in "
        f"{r['subscribe_messages']} messages, largest "
        f"{r['max_subscribe_message_bytes'] / 1e6:.2f} MB)"
    )
    row("ReadEvents RPC, one conversation, pages of 1000", "grpc_read_events_one")
    row("  in process: HistoryService.read_events", "history_read_events_one")
    row("baseline: store.read_stream by 1000", "store_read_stream_one")
    row("ReadEvents RPC, all, pages of 1000", "grpc_read_events_all")
    row("  in process: HistoryService.read_events", "history_read_events_all")
    row("SubscribeEvents RPC, all, to caught_up", "grpc_subscribe_catch_up_all")
    row("  in process: HistoryService.subscribe", "history_subscribe_catch_up_all")
    row("baseline: store.read_all by 1000", "store_read_all")
    e = out["export"]
    print(
        f"\n3. Export (JSONL) of {e['conversations']} conversations, {e['events']} events, "
        f"{e['export_bytes_total'] / 1e6:.1f} MB, {e['clients']} concurrent clients"
    )
    for side, label in (
        ("export_in_process", "HistoryService.export_jsonl"),
        ("export_rpc", "ExportConversation RPC"),
        ("export_plain_query", "baseline: psycopg query + event_line"),
    ):
        row(label, f"{side}_conversations")
        row("", f"{side}_bytes")
    t = out["tenants"]
    print(
        f"\n4. Tenants: {t['tenants']} tenants x {t['events_per_tenant']} events "
        f"({t['conversations_per_tenant']} conversations each) interleaved, "
        f"{t['events']} events; per run, {len(t['measured_tenants'])} of them read to the "
        f"end, each beside an unfiltered read of as many events"
    )
    row("store.read_all, filter=EventFilter(tenant=T)", "tenant_read_all")
    row("baseline: unfiltered read_all, same count", "tenant_baseline_read_all")
    row("store.subscribe_all, tenant filter, catch-up", "tenant_subscribe_catch_up")
    row("baseline: unfiltered subscribe_all, same count", "tenant_baseline_subscribe_catch_up")
    print("\nratios (throughput of the first over the second; > 1: first faster)")
    for name, value in out["ratios"].items():
        print(f"  {name:<40}{format_paired(value)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn", help="use this empty (or only migrated) database, not an embedded one"
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (under a minute)")
    parser.add_argument("--fold-events", type=int, help="events of the folded conversation")
    parser.add_argument("--conversations", type=int, help="small conversations to export")
    parser.add_argument("--turns", type=int, default=3, help="turns per small conversation")
    parser.add_argument("--log-events", type=int, help="at least this many events in the log")
    parser.add_argument("--clients", type=int, default=4, help="concurrent export clients")
    parser.add_argument("--tenants", type=int, default=100, help="tenants in part 4")
    parser.add_argument("--tenant-events", type=int, help="events per tenant in part 4")
    parser.add_argument("--reps", type=int, help="measured runs per scenario")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated texts")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    defaults = (
        {
            "fold_events": 2000,
            "conversations": 100,
            "log_events": 6000,
            "tenant_events": 20,
            "reps": 2,
        }
        if args.quick
        else {
            "fold_events": 10_000,
            "conversations": 1000,
            "log_events": 50_000,
            # Not a multiple of the page (1000): a read to the end then makes
            # as many queries as the unfiltered read of as many events (at a
            # multiple it needs one more, empty, to see the end).
            "tenant_events": 2500,
            "reps": 5,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reps < 1 or args.clients < 1 or args.conversations < 1 or args.tenants < 1:
        parser.error("--reps, --clients, --conversations and --tenants must be at least 1")
    if args.tenant_events < 1 + MIN_TURN_EVENTS:
        parser.error(f"--tenant-events must be at least {1 + MIN_TURN_EVENTS}")

    started = time.perf_counter()
    server: EmbeddedPostgres | None = None
    pg_dir: Path | None = None
    dsn = args.dsn
    try:
        if dsn is None:
            pg_dir = Path(tempfile.mkdtemp(prefix="turnlog-bench-history-"))
            server = EmbeddedPostgres(pg_dir / "pg")
            dsn = server.start()
        out = asyncio.run(bench(args, dsn))
    finally:
        if server is not None:
            server.stop()
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)
    out["settings"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    print_table(out)
    print("\nratios:", json.dumps(out["ratios"]))
    print(f"elapsed: {out['settings']['elapsed_s']} s")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
