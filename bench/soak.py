"""Soak: a steady mixed load on one `turnlog serve` for minutes, watching for leaks.

A measurement program, not a test: it exits 1 when what it measured is
beyond the tolerances below. Everything runs on loopback, as separate
processes, as in bench/memory.py (whose process handling and readings it
uses): an embedded PostgreSQL (unless --dsn), a scripted `turnlog worker`
(replies of 34 tokens, --token-delay-ms apart), one `turnlog serve` with its
default limits and a TURNLOG_DATA_DIR of its own, and this process, the
client, with the token serve prints.

The load: every 1/--rate seconds one operation starts, unless --concurrency
are already in flight (then the tick is counted as skipped), drawn at random
(seeded) with these weights:

    send           3  SendMessage on a conversation no other operation is turning
    stream         3  StreamTurn, every event read to the end
    stream_resume  1  StreamTurn cancelled at its first text, then resumed
                      (ResumeTurn after the last sequence seen) to the end
    subscribe      2  SubscribeEvents on a conversation: catch-up, then live
                      for 0.2-2 s, then cancelled
    read_events    1  ReadEvents of a conversation (50 events)
    get            1  GetConversation
    list           1  ListConversations (20)

--conversations conversations take the turns; one that has had
--turns-per-conversation turns is archived and replaced by a new one
(`archive`, `create`). --long-subscriptions subscriptions to every
conversation stay open for the whole run. Calls go round robin over
--channels channels; each channel is replaced by a new one (a new
connection) after --reconnect-every calls, the old one closed once its calls
are done, so connections open and close all the time.

Phases: a warm-up of the same load (--warmup-s), drained; the `before`
reading; the load for --duration seconds, read every --sample-interval-s;
the drain (in-flight operations finish, every call and channel is closed,
serve's running turns reach 0); the `after` reading.

Readings of serve (memory.ServeProbe): RSS, open file descriptors, threads,
client and worker TCP connections, database connections, running turns
(its `turnlog_turns_running` gauge). Serve has no debug endpoint, so there
is no asyncio task count: descriptors, connections, threads and running
turns are the leak signals (a leaked task usually holds one of them: a
stream, a database connection, a running turn).

Verdict, against the tolerances (options):

- after the drain no client connection is open and no turn runs;
- file descriptors other than database connections: after <= before
  + --fd-tolerance (the database pool grows and shrinks by itself, up to 20
  connections plus a listener and a lock connection: database connections
  must stay <= DATABASE_CONNECTIONS_MAX);
- threads: after <= before + --thread-tolerance;
- RSS: the least-squares slope over the second half of the load's samples
  <= --max-rss-slope (MiB per minute; `none` to report only, as short runs
  do: their slope is noise), and after - before <= --max-rss-growth-mib
  when given;
- no operation failed.

Serve's two LRU caches (`ServiceDefaults`) grow with the load until they are
full: the state cache (1,024 conversations' folded states) and the
token-count cache (100,000 messages, two per turn). Shipped as they are,
neither is full within 10 minutes at the default rate, and their filling
is an RSS slope that says nothing about leaks. So by default this bench
starts serve with them shrunk (--serve-caches, default 8 states and 4,096
messages: patched into the `ServiceDefaults` that `turnlog serve` builds, in
this bench's serve process only): the state cache is full at once, the
token-count cache within ~3 minutes, and the second half of the run sees
them full. 4,096 messages is more than the conversations in use hold (32 x
40), so only messages of archived conversations are evicted. `--serve-caches
shipped` runs serve unmodified; `kib_per_turn` in the JSON divides the
load's RSS growth by its turns. When a run fails, the worker's and serve's
logs are kept, and the JSON says where (`logs`).

Usage:
    python bench/soak.py [--duration 600] [--dsn URL] [--json out.json]   # the long run
    python bench/soak.py --serve-caches shipped [--max-rss-slope none] ...  # serve as shipped
    python bench/soak.py --quick --json out.json        # ~30 s, small load (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from memory import (
    CLIENT_OPTIONS,
    SYSTEM_PROMPT,
    Reading,
    Served,
    ServeProbe,
    cancel,
    database,
    print_log_tails,
    serving,
)

from turnlog.auth.channel import credentialed_channel
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

#: `--quick`: the CI variant, about 30 s in all (explicit options still win).
QUICK: dict[str, Any] = {
    "duration": 20.0,
    "warmup_s": 3.0,
    "rate": 12.0,
    "concurrency": 6,
    "sample_interval_s": 1.0,
    "conversations": 8,
    "turns_per_conversation": 6,
    "long_subscriptions": 2,
    "channels": 2,
    "reconnect_every": 25,
    "max_rss_slope": None,
}
OPERATIONS = {
    "send": 3,
    "stream": 3,
    "stream_resume": 1,
    "subscribe": 2,
    "read_events": 1,
    "get": 1,
    "list": 1,
}
REPLY = "The quick brown fox jumps over it."
#: serve's database connections at most: its pool (20), the subscription
#: listener and the replica lock.
DATABASE_CONNECTIONS_MAX = 22
#: How long a replaced channel's calls get before its close cancels them.
RETIRE_GRACE_S = 30.0


#: serve's LRUs (`ServiceDefaults`) in a soak, unless --serve-caches says otherwise:
#: a state cache of 8 conversations (full at once) and a token-count cache of
#: 4,096 messages, full after ~3 minutes at the default rate, and large enough
#: that only messages of archived conversations are evicted (see --serve-caches).
SOAK_CACHES = (8, 4096)
#: Runs `turnlog` with the cache sizes patched into the `ServiceDefaults` that
#: `turnlog serve` builds (this bench's serve process only; nothing else changes).
CACHES_LAUNCHER = """
import functools, sys
import turnlog.api.server as server
from turnlog import cli
server.ServiceDefaults = functools.partial(
    server.ServiceDefaults, state_cache_size={state}, token_count_cache_size={tokens}
)
sys.exit(cli.main(sys.argv[1:]))
"""


def cache_sizes(text: str) -> tuple[int, int] | None:
    """--serve-caches: "STATE,TOKENS" sizes, or "shipped" (None)."""
    if text == "shipped":
        return None
    state, tokens = (int(part) for part in text.split(","))
    if state < 0 or tokens < 0:
        raise ValueError(text)
    return state, tokens


def turnlog_command(caches: tuple[int, int] | None) -> list[str] | None:
    """How to start `turnlog` for serve: as installed, or with these cache sizes."""
    if caches is None:
        return None
    state, tokens = caches
    return [sys.executable, "-c", CACHES_LAUNCHER.format(state=state, tokens=tokens)]


def soak_script(token_delay_ms: float) -> dict[str, Any]:
    return {"model": "scripted-soak", "default": {"text": REPLY, "token_delay_ms": token_delay_ms}}


def optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


# -- the client side ----------------------------------------------------------------


class ChannelPool:
    """`size` channels used round robin, each replaced after `calls_each` calls.

    A replaced channel is closed in the background with RETIRE_GRACE_S for
    the calls it still carries. Every channel has its own connection.
    """

    def __init__(self, target: str, token: str, size: int, calls_each: int) -> None:
        self.target, self.token, self.calls_each = target, token, calls_each
        self.slots = [self._open() for _ in range(size)]
        self.next = 0
        self.opened = size
        self.closing: set[asyncio.Task[None]] = set()

    def _open(self) -> tuple[grpc.aio.Channel, sgrpc.ConversationServiceAsyncStub, list[int]]:
        channel = credentialed_channel(self.target, self.token, options=CLIENT_OPTIONS)
        return channel, sgrpc.ConversationServiceStub(channel), [0]

    def stub(self) -> sgrpc.ConversationServiceAsyncStub:
        i = self.next = (self.next + 1) % len(self.slots)
        channel, _, used = self.slots[i]
        used[0] += 1
        if used[0] >= self.calls_each:
            # This call goes on the new channel: a call made on the old one
            # now would start after its close began, and fail.
            self.slots[i] = self._open()
            self.opened += 1
            task = asyncio.create_task(channel.close(grace=RETIRE_GRACE_S))
            self.closing.add(task)
            task.add_done_callback(self.closing.discard)
        return self.slots[i][1]

    async def close(self) -> None:
        """Closes every channel (the retiring ones too) and collects their calls."""
        await asyncio.gather(*(channel.close(None) for channel, _, _ in self.slots))
        await asyncio.gather(*self.closing)
        self.slots.clear()
        gc.collect()


class Conversations:
    """The conversations turns are taken on: one turn at a time each, replaced when full."""

    def __init__(self, turns_each: int) -> None:
        self.turns_each = turns_each
        self.free: asyncio.Queue[str] = asyncio.Queue()
        self.names: list[str] = []
        self.turns: dict[str, int] = {}

    async def create(self, stub: sgrpc.ConversationServiceAsyncStub) -> None:
        created = await stub.CreateConversation(
            spb.CreateConversationRequest(request_id=uuid.uuid4().hex, system_prompt=SYSTEM_PROMPT)
        )
        name = str(created.conversation.name)
        self.names.append(name)
        self.turns[name] = 0
        self.free.put_nowait(name)

    async def take(self) -> str:
        return await self.free.get()

    async def give_back(self, name: str, pool: ChannelPool, ops: Counter[str]) -> None:
        """Returns `name` after a turn; archives and replaces it once it is full."""
        self.turns[name] += 1
        if self.turns[name] < self.turns_each:
            self.free.put_nowait(name)
            return
        self.names.remove(name)
        del self.turns[name]
        await pool.stub().ArchiveConversation(spb.ArchiveConversationRequest(name=name))
        ops["archive"] += 1
        await self.create(pool.stub())
        ops["create"] += 1


@dataclass
class Load:
    """The mixed load: its operations, counts and failures."""

    pool: ChannelPool
    conversations: Conversations
    rng: random.Random
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    turns: int = 0
    skipped: int = 0
    inflight: set[asyncio.Task[None]] = field(default_factory=set)

    def turn_input(self, name: str) -> spb.TurnInput:
        return spb.TurnInput(
            conversation=name,
            request_id=uuid.uuid4().hex,
            content=f"Soak message {self.rng.randrange(10**6)}.",
        )

    def ended(self, turn: pb.Turn) -> None:
        if turn.status != pb.TURN_STATUS_COMPLETED:
            raise RuntimeError(f"turn ended {pb.TurnStatus.Name(turn.status)}")
        self.turns += 1

    async def turn(self, run: Callable[[str], Awaitable[None]]) -> None:
        name = await self.conversations.take()
        try:
            await run(name)
        finally:
            await self.conversations.give_back(name, self.pool, self.ops)

    # Each call takes its stub just before it starts: a channel may be
    # replaced (and closed to new calls) while an operation waits.
    async def send(self, name: str) -> None:
        response = await self.pool.stub().SendMessage(
            spb.SendMessageRequest(input=self.turn_input(name))
        )
        self.ended(response.turn)

    async def stream(self, name: str) -> None:
        async for response in self.pool.stub().StreamTurn(
            spb.StreamTurnRequest(start=self.turn_input(name))
        ):
            if response.event.WhichOneof("kind") == "turn_ended":
                self.ended(response.event.turn_ended.turn)
                return
        raise RuntimeError("StreamTurn ended without TurnEnded")

    async def stream_resume(self, name: str) -> None:
        call = self.pool.stub().StreamTurn(spb.StreamTurnRequest(start=self.turn_input(name)))
        turn_id, sequence = "", 0
        async for response in call:
            turn_id, sequence = response.event.turn_id, response.event.sequence
            kind = response.event.WhichOneof("kind")
            if kind == "turn_ended":  # (ended before any text: nothing to resume)
                self.ended(response.event.turn_ended.turn)
                return
            if kind == "text_delta":
                break
        cancel(call)
        del call
        resume = spb.ResumeTurn(conversation=name, turn_id=turn_id, after_sequence=sequence)
        async for response in self.pool.stub().StreamTurn(spb.StreamTurnRequest(resume=resume)):
            if response.event.sequence <= sequence:
                raise RuntimeError("a resumed stream repeated an event")
            if response.event.WhichOneof("kind") == "turn_ended":
                self.ended(response.event.turn_ended.turn)
                return
        raise RuntimeError("resumed StreamTurn ended without TurnEnded")

    def any_conversation(self) -> str:
        return self.rng.choice(self.conversations.names)

    async def subscribe(self) -> None:
        live_s = self.rng.uniform(0.2, 2.0)
        call = self.pool.stub().SubscribeEvents(
            spb.SubscribeEventsRequest(conversation=self.any_conversation())
        )
        try:
            async for response in call:
                if response.HasField("caught_up"):
                    break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(live_s):
                    async for _ in call:
                        pass
        finally:
            cancel(call)

    async def operation(self, kind: str) -> None:
        stub = self.pool.stub
        if kind == "send":
            await self.turn(self.send)
        elif kind == "stream":
            await self.turn(self.stream)
        elif kind == "stream_resume":
            await self.turn(self.stream_resume)
        elif kind == "subscribe":
            await self.subscribe()
        elif kind == "read_events":
            await stub().ReadEvents(
                spb.ReadEventsRequest(conversation=self.any_conversation(), page_size=50)
            )
        elif kind == "get":
            await stub().GetConversation(spb.GetConversationRequest(name=self.any_conversation()))
        elif kind == "list":
            await stub().ListConversations(spb.ListConversationsRequest(page_size=20))
        else:
            raise ValueError(kind)

    async def guarded(self, kind: str) -> None:
        try:
            await self.operation(kind)
            self.ops[kind] += 1
        except grpc.aio.AioRpcError as e:
            self.failed(kind, f"{e.code().name}: {e.details()}")
        except Exception as e:
            self.failed(kind, f"{type(e).__name__}: {e}")

    def failed(self, kind: str, what: str) -> None:
        self.errors[f"{kind}: {what.split(':')[0]}"] += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(f"{kind}: {what}")

    async def run(self, duration_s: float, rate: float, concurrency: int) -> None:
        """Starts one operation every 1/`rate` s for `duration_s`, `concurrency` at most."""
        kinds, weights = list(OPERATIONS), list(OPERATIONS.values())
        loop = asyncio.get_running_loop()
        end = loop.time() + duration_s
        next_at = loop.time()
        while next_at < end:
            if len(self.inflight) < concurrency:
                task = asyncio.create_task(self.guarded(self.rng.choices(kinds, weights)[0]))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
            else:
                self.skipped += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def finish(self, timeout_s: float) -> None:
        """Waits for the operations in flight; cancels what is left after `timeout_s`."""
        if self.inflight:
            _, pending = await asyncio.wait(set(self.inflight), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def follow_all(stub: sgrpc.ConversationServiceAsyncStub, received: Counter[str]) -> None:
    """A subscription to every conversation, read until cancelled."""
    try:
        async for response in stub.SubscribeEvents(spb.SubscribeEventsRequest()):
            received["events"] += len(response.events)
    except grpc.aio.AioRpcError as e:
        received[f"error {e.code().name}"] += 1


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancels `tasks` and forgets them: a cancelled task's traceback holds its call,
    and a call keeps its channel's connection open, closed or not."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


# -- the run --------------------------------------------------------------------------


def least_squares_slope(points: list[tuple[float, float]]) -> float | None:
    """The slope of the least-squares line through `points` (x, y); None under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


async def drain(load: Load, probe: ServeProbe, timeout_s: float) -> tuple[Reading, bool]:
    """Finishes the load's operations and closes its channels; waits until serve has no
    client connection and no running turn. Returns the last reading and whether it got there."""
    await load.finish(timeout_s)
    await load.pool.close()
    deadline = time.monotonic() + timeout_s
    while True:
        reading = await probe.read()
        drained = reading.client_connections == 0 and reading.turns_running == 0
        if drained or time.monotonic() > deadline:
            return reading, drained
        await asyncio.sleep(0.5)


def new_load(args: argparse.Namespace, served: Served, rng: random.Random) -> Load:
    pool = ChannelPool(served.target, served.token, args.channels, args.reconnect_every)
    return Load(pool=pool, conversations=Conversations(args.turns_per_conversation), rng=rng)


async def soak(args: argparse.Namespace, served: Served, dsn: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        probe = ServeProbe(served, db)
        started = await probe.read()

        warm = new_load(args, served, rng)
        for _ in range(args.conversations):
            await warm.conversations.create(warm.pool.stub())
        await warm.run(args.warmup_s, args.rate, args.concurrency)
        _, warm_drained = await drain(warm, probe, args.drain_timeout_s)
        await asyncio.sleep(2.0)
        before = await probe.read()

        load = new_load(args, served, rng)
        load.conversations = warm.conversations  # (the same conversations, on new channels)
        # The warm-up's failures count as the load's.
        load.errors.update({f"warm-up {k}": v for k, v in warm.errors.items()})
        load.error_examples += [f"warm-up {e}" for e in warm.error_examples]
        followers = Counter[str]()
        follow_pool = ChannelPool(served.target, served.token, 1, 10**9)
        follow = [
            asyncio.create_task(follow_all(follow_pool.stub(), followers))
            for _ in range(args.long_subscriptions)
        ]
        samples: list[Reading] = []

        async def sample() -> None:
            while True:
                samples.append(await probe.read())
                await asyncio.sleep(args.sample_interval_s)

        sampler = asyncio.create_task(sample())
        t0 = time.monotonic()
        try:
            await load.run(args.duration, args.rate, args.concurrency)
            load_s = time.monotonic() - t0
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        samples.append(await probe.read())
        await cancel_all(follow)
        await follow_pool.close()
        end_reading, drained = await drain(load, probe, args.drain_timeout_s)
        await asyncio.sleep(2.0)
        after = await probe.read()

    return summarise(
        args,
        started,
        before,
        samples,
        after,
        load,
        followers,
        drained=drained and warm_drained,
        load_s=load_s,
        end_reading=end_reading,
    )


def summarise(
    args: argparse.Namespace,
    started: Reading,
    before: Reading,
    samples: list[Reading],
    after: Reading,
    load: Load,
    followers: Counter[str],
    *,
    drained: bool,
    load_s: float,
    end_reading: Reading,
) -> dict[str, Any]:
    t0 = samples[0].at_s
    series = [((r.at_s - t0) / 60, r.rss_kib / 1024) for r in samples]
    second_half = [p for p in series if p[0] >= series[-1][0] / 2]
    slope_half, slope_all = least_squares_slope(second_half), least_squares_slope(series)
    start, end = samples[0], samples[-1]
    turns = max(1, load.turns)

    def row(r: Reading) -> dict[str, Any]:
        out = {k: v for k, v in asdict(r).items() if k != "at_s"}
        return out | {"rss_mib": round(r.rss_kib / 1024, 1), "non_database_fds": r.non_database_fds}

    leaks: list[str] = []
    if after.client_connections:
        leaks.append(f"{after.client_connections} client connection(s) open after the drain")
    if after.turns_running != 0:
        leaks.append(f"{after.turns_running} turn(s) running after the drain")
    if after.non_database_fds > before.non_database_fds + args.fd_tolerance:
        leaks.append(
            f"fds other than database connections {before.non_database_fds} -> "
            f"{after.non_database_fds} (tolerance +{args.fd_tolerance})"
        )
    if max(r.database_connections for r in [*samples, after]) > DATABASE_CONNECTIONS_MAX:
        leaks.append(f"database connections above {DATABASE_CONNECTIONS_MAX}")
    if after.threads > before.threads + args.thread_tolerance:
        leaks.append(
            f"threads {before.threads} -> {after.threads} (tolerance +{args.thread_tolerance})"
        )
    if args.max_rss_slope is not None and (slope_half is None or slope_half > args.max_rss_slope):
        leaks.append(
            f"RSS slope {slope_half} MiB/min over the second half (tolerance {args.max_rss_slope})"
        )
    growth_mib = (after.rss_kib - before.rss_kib) / 1024
    if args.max_rss_growth_mib is not None and growth_mib > args.max_rss_growth_mib:
        leaks.append(f"RSS grew {growth_mib:.1f} MiB (tolerance {args.max_rss_growth_mib})")
    if load.errors:
        leaks.append(f"{sum(load.errors.values())} operation(s) failed: {dict(load.errors)}")
    if not drained:
        leaks.append("the drain did not finish in time")

    return {
        "readings": {
            "started": row(started),
            "before": row(before),
            "load_start": row(start),
            "load_end": row(end),
            "drained": row(end_reading),
            "after": row(after),
        },
        "rss_mib": {
            "before": round(before.rss_kib / 1024, 1),
            "load_start": round(start.rss_kib / 1024, 1),
            "load_end": round(end.rss_kib / 1024, 1),
            "after": round(after.rss_kib / 1024, 1),
            "peak": round(max(r.rss_kib for r in samples) / 1024, 1),
        },
        "rss_slope_mib_per_min": {
            "second_half": None if slope_half is None else round(slope_half, 3),
            "all": None if slope_all is None else round(slope_all, 3),
        },
        "kib_per_turn": round((end.rss_kib - start.rss_kib) / turns, 3),
        "fds": {
            "before": before.fds,
            "after": after.fds,
            "non_database_before": before.non_database_fds,
            "non_database_after": after.non_database_fds,
            "max_during_load": max(r.fds for r in samples),
        },
        "threads": {
            "before": before.threads,
            "after": after.threads,
            "max_during_load": max(r.threads for r in samples),
        },
        "connections": {
            "client_before": before.client_connections,
            "client_after": after.client_connections,
            "client_max_during_load": max(r.client_connections for r in samples),
            "database_before": before.database_connections,
            "database_after": after.database_connections,
            "database_max": max(r.database_connections for r in samples),
        },
        "samples": [
            {
                "t_s": round(r.at_s - t0, 1),
                "rss_kib": r.rss_kib,
                "fds": r.fds,
                "threads": r.threads,
                "client_connections": r.client_connections,
                "database_connections": r.database_connections,
                "turns_running": r.turns_running,
            }
            for r in samples
        ],
        "load": {
            "seconds": round(load_s, 1),
            "operations": dict(sorted(load.ops.items())),
            "operations_per_s": round(sum(load.ops.values()) / load_s, 2),
            "turns": load.turns,
            "skipped_ticks": load.skipped,
            "channels_opened": load.pool.opened,
            "long_subscription_events": followers["events"],
            "errors": dict(load.errors),
            "error_examples": load.error_examples,
        },
        "asyncio_tasks": None,  # (serve has no debug endpoint to ask)
        "leaks": leaks,
        "passed": not leaks,
    }


def print_summary(result: dict[str, Any]) -> None:
    s, rss, slope = result["settings"], result["rss_mib"], result["rss_slope_mib_per_min"]
    load, fds, conns, threads = (
        result["load"],
        result["fds"],
        result["connections"],
        result["threads"],
    )
    print(
        f"\nturnlog serve soak: {load['seconds']} s, {load['operations_per_s']} operations/s "
        f"(rate {s['rate']}, {load['skipped_ticks']} ticks skipped), {load['turns']} turns, "
        f"{load['channels_opened']} channels opened"
    )
    print("operations: " + ", ".join(f"{k} {v}" for k, v in load["operations"].items()))
    print(
        f"RSS MiB: before {rss['before']}, load start {rss['load_start']}, load end "
        f"{rss['load_end']}, after the drain {rss['after']}, peak {rss['peak']}"
    )
    print(
        f"RSS slope MiB/min: second half {slope['second_half']}, whole load {slope['all']} "
        f"(tolerance {s['max_rss_slope']}); {result['kib_per_turn']} KiB per turn"
    )
    print(
        f"fds: before {fds['before']}, after {fds['after']} (without database connections "
        f"{fds['non_database_before']} -> {fds['non_database_after']}, tolerance "
        f"+{s['fd_tolerance']}); max during load {fds['max_during_load']}"
    )
    print(
        f"threads: before {threads['before']}, after {threads['after']}; client connections: "
        f"before {conns['client_before']}, after {conns['client_after']}, max "
        f"{conns['client_max_during_load']}; database connections {conns['database_before']} "
        f"-> {conns['database_after']} (max {conns['database_max']})"
    )
    print(
        "asyncio tasks: not measured (serve has no debug endpoint); the leak signals are "
        "fds, connections, threads and running turns"
    )
    if load["errors"]:
        print(f"errors: {load['errors']}; e.g. {load['error_examples'][:3]}")
    print(
        "PASSED: no leak beyond the tolerances"
        if result["passed"]
        else "FAILED:\n  " + "\n  ".join(result["leaks"])
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="use this (migrated or empty) database, not an embedded one")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="seconds of warm-up load")
    parser.add_argument("--rate", type=float, default=20.0, help="operations started per second")
    parser.add_argument("--concurrency", type=int, default=16, help="operations in flight at most")
    parser.add_argument("--conversations", type=int, default=32, help="conversations taking turns")
    parser.add_argument(
        "--turns-per-conversation",
        type=int,
        default=20,
        help="turns before a conversation is archived and replaced",
    )
    parser.add_argument(
        "--long-subscriptions",
        type=int,
        default=4,
        help="subscriptions to every conversation, open for the whole load",
    )
    parser.add_argument("--channels", type=int, default=8, help="client channels in use at once")
    parser.add_argument(
        "--reconnect-every",
        type=int,
        default=200,
        help="calls after which a channel is replaced by a new one",
    )
    parser.add_argument(
        "--token-delay-ms",
        type=float,
        default=2.0,
        help="the scripted reply's delay between tokens",
    )
    parser.add_argument("--sample-interval-s", type=float, default=5.0)
    parser.add_argument("--drain-timeout-s", type=float, default=60.0)
    parser.add_argument(
        "--fd-tolerance",
        type=int,
        default=8,
        help="fds (other than database connections) after may exceed before by",
    )
    parser.add_argument(
        "--thread-tolerance", type=int, default=4, help="threads after may exceed before by"
    )
    parser.add_argument(
        "--max-rss-slope",
        type=optional_float,
        default=1.0,
        help="MiB per minute over the second half of the load ('none': report only)",
    )
    parser.add_argument(
        "--max-rss-growth-mib",
        type=optional_float,
        default=None,
        help="RSS after - before, MiB (default: not judged)",
    )
    parser.add_argument(
        "--serve-caches",
        type=cache_sizes,
        default=SOAK_CACHES,
        metavar="STATE,TOKENS",
        help="serve's state and token-count LRU sizes (default %(default)s: full early in the "
        "run, so RSS growth left is not them), or 'shipped' for serve's own (1024,100000)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the CI variant: a short run with a small load (see QUICK)",
    )
    parser.add_argument("--json", type=Path, help="write results here")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if (
        min(
            args.rate,
            args.concurrency,
            args.conversations,
            args.turns_per_conversation,
            args.channels,
            args.reconnect_every,
            args.sample_interval_s,
        )
        <= 0
    ):
        parser.error("sizes, rates and intervals must be positive")

    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="turnlog-bench-soak-"))
    try:
        with (
            database(args.dsn) as dsn,
            serving(
                soak_script(args.token_delay_ms),
                dsn,
                folder,
                {},
                turnlog_command(args.serve_caches),
            ) as served,
        ):
            try:
                figures = asyncio.run(soak(args, served, dsn))
            except BaseException:
                print_log_tails(folder)
                raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if figures["passed"]:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        # What failed is in serve's log (a traceback for INTERNAL errors).
        shutil.rmtree(folder / "data", ignore_errors=True)
        figures["logs"] = str(folder)

    settings = {k: v for k, v in vars(args).items() if k not in ("dsn", "json")}
    settings |= {
        "operation_weights": OPERATIONS,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "database_connections_max": DATABASE_CONNECTIONS_MAX,
    }
    result = {"settings": settings, **figures, "wall_s": round(time.perf_counter() - started, 1)}
    print_summary(result)
    if "logs" in result:
        print(f"the worker's and serve's logs are kept in {result['logs']}")
    print(f"wall time {result['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
