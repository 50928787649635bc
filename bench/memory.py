"""Benchmark: the memory of one `turnlog serve` holding many open streams and subscriptions.

A program, not a test. Everything runs on loopback, as separate processes:
an embedded PostgreSQL (unless --dsn), a scripted `turnlog worker`, one
`turnlog serve` (the process measured, with a TURNLOG_DATA_DIR of its own)
and this process, the client, which sends the token serve prints with every
call (`turnlog.auth.channel.credentialed_channel`).

States, measured in one run, in this order:

1. `started`: serve has just started; nothing done yet.
2. `idle`, the baseline: N conversations created, a few ordinary turns and
   one subscription run and closed (first-use costs: code paths, database
   pool connections, threads), nothing open.
3. `streams`: N `StreamTurn` streams open, each watching its own turn, which
   runs on the worker: the scripted reply waits --hold-s before its first
   token (`first_token_delay_ms`), so each turn is begun (`TurnStarted`
   recorded and streamed) and then quiet, appending nothing while it waits.
   A reply that trickled tokens instead (`token_delay_ms`) would record the
   streamed text every 0.25 s per turn (`text_flush_interval_s`), and every
   append wakes every subscriber of the process: that is load, not memory.
4. `streams_and_subscriptions`: the same, plus M idle `SubscribeEvents`
   subscriptions (one per conversation, round robin), each caught up.
5. `closed`: every call cancelled, every channel closed, and the held turns
   ended (serve's `turnlog_turns_running` gauge back to 0): what serve keeps.

Per state: serve's RSS (the median of --samples readings one second apart,
taken after --settle-s), its open file descriptors and threads, its TCP
connections from clients and to the worker, its database connections
(pg_stat_activity), its running turns (the Prometheus gauge of
`--metrics-listen`), its CPU share over the readings, the database's committed
transactions a second over the readings (approximate: backends report them
about once a second while busy), and the worker's RSS.
Costs: (streams - idle) / N KiB per stream, (streams_and_subscriptions -
streams) / M KiB per subscription, and closed - idle retained.

Calls are spread over channels of --per-channel calls each (default 100:
many HTTP/2 servers and proxies allow 100 concurrent streams per connection;
gRPC's own server allows any number), each with a connection of its own
(`grpc.use_local_subchannel_pool`); the client connection counts show it.

Serve's per-tenant limits would refuse this load (one tenant here), so the
bench sets, for serve only: TURNLOG_TENANT_MAX_RUNNING_TURNS = N + 16 (the
default is 128) and TURNLOG_TENANT_REQUESTS_PER_S=0 (no rate limit; the
opening is a burst of thousands of calls). Both are in the JSON's settings.

A caught-up subscription is not free of work: it reads the log again every
second (`PostgresEventStore`'s poll interval) and on every append, so the
CPU and database columns of `streams_and_subscriptions` show M reads a second.

bench/soak.py imports the process handling and readings from here.

Usage:
    python bench/memory.py [--streams 1000] [--subscriptions 1000] [--dsn URL] [--json out.json]
    python bench/memory.py --quick --json out.json    # smoke run: 50 streams, 50 subscriptions
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil  # type: ignore[import-untyped]  # (no stubs in the lock)
import psycopg
from engine import start_process, stop_process, wait_for_logged_port
from prometheus_client.parser import text_string_to_metric_families

from turnlog.auth.channel import credentialed_channel
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

#: `--quick`: a smoke run of seconds (explicit options still win).
QUICK: dict[str, Any] = {
    "streams": 50,
    "subscriptions": 50,
    "hold_s": 20.0,
    "settle_s": 1.0,
    "samples": 2,
    "per_channel": 20,
}
#: Scripted replies: a user message containing HOLD_MARK is answered after the
#: hold (see `memory_script`); any other at once.
HOLD_MARK = "[hold]"
FAST_REPLY = {"text": "The quick brown fox jumps over it."}
SYSTEM_PROMPT = "You are a helpful assistant. Be brief."
#: Extra running turns serve admits beyond the held ones (warm-up turns).
RUNNING_TURNS_MARGIN = 16
#: The printed lines of `turnlog serve` (api/server.py).
SERVE_TOKEN = re.compile(r"turnlog token for tenant '[^']+' \([^)]*\): (\S+)")
SERVE_LISTENING = re.compile(r"turnlog serving gRPC on \S+:(\d+)")
SERVE_METRICS = r"turnlog metrics on port (\d+)"
#: Client channel options: a connection per channel (channels with equal
#: options otherwise share one subchannel, so one connection).
CLIENT_OPTIONS: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
#: serve's connections to its database (ours aside), and the database's
#: committed transactions (as reported by the backends: about once a second
#: while they are busy, up to 10 s late when idle).
DATABASE_QUERY = """
SELECT (SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND backend_type = 'client backend'),
       (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())
"""
STATES = ["started", "idle", "streams", "streams_and_subscriptions", "closed"]


def memory_script(hold_s: float) -> dict[str, Any]:
    """The worker's script: HOLD_MARK messages are answered after `hold_s`, others at once."""
    held = {"match": HOLD_MARK, "text": "Held.", "first_token_delay_ms": round(hold_s * 1000)}
    return {"model": "scripted-memory", "replies": [held], "default": FAST_REPLY}


# -- the processes ------------------------------------------------------------------


def serve_env(data_dir: Path, dsn: str, extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without TURNLOG_* settings, plus serve's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNLOG_")}
    return env | {"TURNLOG_DATA_DIR": str(data_dir), "TURNLOG_DATABASE_URL": dsn} | extra


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """A running `turnlog serve` over a scripted worker, as this bench started them."""

    serve: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    port: int
    worker_port: int
    metrics_url: str
    token: str
    logs: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def serving(
    script: dict[str, Any],
    dsn: str,
    folder: Path,
    serve_extra_env: dict[str, str],
    turnlog_command: list[str] | None = None,
) -> Iterator[Served]:
    """A scripted worker and `turnlog serve` (port 0, metrics on port 0) for the block.

    Serve gets a data folder of its own in `folder` (its local signing key,
    hence the token it prints) and `serve_extra_env` on top of this process's
    environment less every TURNLOG_* variable; `turnlog_command` runs it
    instead of `python -m turnlog.cli` (given the same arguments). Both stop
    (SIGTERM, then SIGKILL after 30 s) when the block ends.
    """
    script_path = folder / "script.json"
    script_path.write_text(json.dumps(script))
    worker_log, serve_log = folder / "worker.log", folder / "serve.log"
    worker = start_process(
        [
            sys.executable,
            "-m",
            "turnlog.cli",
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "scripted",
            "--script",
            str(script_path),
            "--grace",
            "1",
        ],
        worker_log,
        dict(os.environ),
    )
    serve = None
    try:
        worker_port = wait_for_logged_port(worker, worker_log, r"serving on port (\d+)")
        serve = start_process(
            [
                *(turnlog_command or [sys.executable, "-m", "turnlog.cli"]),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--worker",
                f"127.0.0.1:{worker_port}",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            serve_log,
            serve_env(folder / "data", dsn, serve_extra_env),
        )
        port = wait_for_logged_port(serve, serve_log, SERVE_LISTENING.pattern)
        metrics_port = wait_for_logged_port(serve, serve_log, SERVE_METRICS)
        tokens = SERVE_TOKEN.findall(serve_log.read_text(errors="replace"))
        if not tokens:
            raise RuntimeError(f"turnlog serve printed no token:\n{serve_log.read_text()[-3000:]}")
        yield Served(
            serve=serve,
            worker=worker,
            port=port,
            worker_port=worker_port,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            token=tokens[-1],
            logs=folder,
        )
    finally:
        if serve is not None:
            stop_process(serve)
        stop_process(worker)


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """`dsn` as given, or an embedded server's database in a temporary folder."""
    if dsn is not None:
        yield dsn
        return
    folder = Path(tempfile.mkdtemp(prefix="turnlog-bench-pg-"))
    server = EmbeddedPostgres(folder / "pg")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def print_log_tails(folder: Path) -> None:
    for log in sorted(folder.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"--- {log.name}:", *tail, sep="\n", file=sys.stderr)


# -- readings -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """One look at the serve process (and the worker's RSS).

    Attributes:
        at_s: monotonic seconds.
        rss_kib: serve's resident set size.
        fds: serve's open file descriptors (sockets included).
        threads: serve's threads.
        client_connections: established TCP connections to serve's port.
        worker_connections: serve's TCP connections to the worker.
        database_connections: client backends of serve's database, but ours.
        database_xacts: the database's committed transactions so far (reported late).
        turns_running: serve's `turnlog_turns_running` gauge (None: no scrape).
        cpu_s: serve's user + system CPU seconds so far.
        worker_rss_kib: the scripted worker's resident set size.
    """

    at_s: float
    rss_kib: int
    fds: int
    threads: int
    client_connections: int
    worker_connections: int
    database_connections: int
    database_xacts: int
    turns_running: int | None
    cpu_s: float
    worker_rss_kib: int

    @property
    def non_database_fds(self) -> int:
        """Open fds less the database connections (the pool grows and shrinks by itself)."""
        return self.fds - self.database_connections


def scrape_turns_running(url: str) -> int | None:
    """serve's `turnlog_turns_running` gauge; None if the scrape fails."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError as e:
        print(f"  metrics scrape failed: {e}", file=sys.stderr)
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "turnlog_turns_running":
                return round(sample.value)
    return None


class ServeProbe:
    """Reads a `Served` process's figures: psutil, its metrics and the database.

    `db` is a connection of this bench to serve's database, excluded from
    the database count. There is no asyncio task count: serve has no debug
    endpoint to ask, so file descriptors, connections, threads and running
    turns are the leak signals.
    """

    def __init__(self, served: Served, db: psycopg.AsyncConnection[Any]) -> None:
        self.served = served
        self.db = db
        self.process = psutil.Process(served.serve.pid)
        self.worker = psutil.Process(served.worker.pid)

    def _process_figures(self) -> dict[str, Any]:
        p = self.process
        with p.oneshot():
            times = p.cpu_times()
            figures = {
                "rss_kib": p.memory_info().rss // 1024,
                "fds": p.num_fds(),
                "threads": p.num_threads(),
                "cpu_s": times.user + times.system,
            }
        clients = workers = 0
        for c in p.net_connections(kind="tcp"):
            if c.status != psutil.CONN_ESTABLISHED or not c.raddr:
                continue
            if c.laddr.port == self.served.port:
                clients += 1
            elif c.raddr.port == self.served.worker_port:
                workers += 1
        figures |= {
            "client_connections": clients,
            "worker_connections": workers,
            "worker_rss_kib": self.worker.memory_info().rss // 1024,
        }
        return figures

    async def read(self) -> Reading:
        figures = await asyncio.to_thread(self._process_figures)
        running = await asyncio.to_thread(scrape_turns_running, self.served.metrics_url)
        row = await (await self.db.execute(DATABASE_QUERY)).fetchone()
        assert row is not None
        return Reading(
            at_s=time.monotonic(),
            database_connections=int(row[0]),
            database_xacts=int(row[1]),
            turns_running=running,
            **figures,
        )


def state_row(name: str, readings: list[Reading], **extra: Any) -> dict[str, Any]:
    """A state's figures: median RSS of its readings, the last reading's counts, serve's
    CPU share and the database's transactions a second (less this bench's one per reading)."""
    last = readings[-1]
    elapsed = last.at_s - readings[0].at_s
    cpu = xacts = None
    if elapsed > 0:
        cpu = (last.cpu_s - readings[0].cpu_s) / elapsed * 100
        own = len(readings) - 1
        xacts = max(0, last.database_xacts - readings[0].database_xacts - own) / elapsed
    rss = round(statistics.median(r.rss_kib for r in readings))
    row: dict[str, Any] = {
        "state": name,
        "rss_kib": rss,
        "rss_mib": round(rss / 1024, 1),
        "rss_kib_samples": [r.rss_kib for r in readings],
    }
    skip = ("at_s", "rss_kib", "cpu_s", "database_xacts")
    row |= {k: v for k, v in asdict(last).items() if k not in skip}
    row["serve_cpu_percent"] = None if cpu is None else round(cpu, 1)
    row["database_xacts_per_s"] = None if xacts is None else round(xacts, 1)
    return row | extra


async def settle_and_read(probe: ServeProbe, settle_s: float, samples: int) -> list[Reading]:
    """Waits `settle_s`, then takes `samples` readings one second apart."""
    await asyncio.sleep(settle_s)
    readings = [await probe.read()]
    for _ in range(samples - 1):
        await asyncio.sleep(1.0)
        readings.append(await probe.read())
    return readings


async def wait_until(
    probe: ServeProbe, done: Any, timeout_s: float, what: str, interval_s: float = 0.5
) -> Reading:
    """Reads until `done(reading)`; raises after `timeout_s` saying `what` was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        reading = await probe.read()
        if done(reading):
            return reading
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached in {timeout_s:.0f} s ({reading})")
        await asyncio.sleep(interval_s)


# -- the client ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def channels(target: str, token: str, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    """`count` credentialed channels to `target`, each on a connection of its own.

    On exit the channels are closed and garbage collected: a closed grpc.aio
    channel keeps its connection while call objects of it are alive, and a
    cancelled streaming call can sit in a reference cycle until a collection.
    """
    opened = [credentialed_channel(target, token, options=CLIENT_OPTIONS) for _ in range(count)]
    try:
        yield opened
    finally:
        await asyncio.gather(*(c.close(None) for c in opened))
        opened.clear()
        gc.collect()


async def create_conversations(stub: sgrpc.ConversationServiceAsyncStub, count: int) -> list[str]:
    sem = asyncio.Semaphore(32)

    async def create() -> str:
        async with sem:
            created = await stub.CreateConversation(
                spb.CreateConversationRequest(
                    request_id=os.urandom(16).hex(), system_prompt=SYSTEM_PROMPT
                )
            )
            return str(created.conversation.name)

    return list(await asyncio.gather(*(create() for _ in range(count))))


@dataclass
class OpenCalls:
    """Long calls this bench holds open: how many got their first message, how many ended."""

    opened: int = 0
    ended: int = 0
    errors: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    all_opened: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def open(self) -> int:
        return self.opened - self.ended

    def first_message(self, wanted: int) -> None:
        self.opened += 1
        if self.opened >= wanted:
            self.all_opened.set()

    async def wait_opened(self, timeout_s: float, what: str) -> None:
        try:
            await asyncio.wait_for(self.all_opened.wait(), timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"{what}: {self.opened} opened in {timeout_s:.0f} s; errors: {self.errors[:5]}"
            ) from None

    async def close(self) -> None:
        """Cancels every call and forgets its task (whose traceback holds the call)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()


def fail(calls: OpenCalls, e: grpc.aio.AioRpcError) -> None:
    calls.errors.append(f"{e.code().name}: {e.details()}")
    calls.all_opened.set()  # (the waiter sees the error rather than a timeout)


async def hold_stream(
    stub: sgrpc.ConversationServiceAsyncStub,
    name: str,
    calls: OpenCalls,
    wanted: int,
    gate: asyncio.Semaphore,
) -> None:
    """Starts a held turn on `name` and reads its stream until it ends or is cancelled."""
    request = spb.StreamTurnRequest(
        start=spb.TurnInput(
            conversation=name, request_id="held", content=f"{HOLD_MARK} Keep this stream open."
        )
    )
    first = True
    await gate.acquire()
    try:
        async for response in stub.StreamTurn(request):
            if first:
                first = False
                gate.release()
                calls.first_message(wanted)
            if response.event.WhichOneof("kind") == "turn_ended":
                calls.ended += 1
    except grpc.aio.AioRpcError as e:
        fail(calls, e)
    finally:
        if first:
            gate.release()


async def hold_subscription(
    stub: sgrpc.ConversationServiceAsyncStub,
    name: str,
    calls: OpenCalls,
    wanted: int,
    gate: asyncio.Semaphore,
) -> None:
    """Subscribes to `name` from its start and reads until cancelled."""
    caught_up = False
    await gate.acquire()
    try:
        async for response in stub.SubscribeEvents(spb.SubscribeEventsRequest(conversation=name)):
            if response.HasField("caught_up") and not caught_up:
                caught_up = True
                gate.release()
                calls.first_message(wanted)
        calls.ended += 1  # (a subscription never ends by itself)
    except grpc.aio.AioRpcError as e:
        fail(calls, e)
    finally:
        if not caught_up:
            gate.release()


def cancel(call: Any) -> None:
    """Cancels a grpc.aio call (grpc-stubs leaves `cancel` unannotated)."""
    call.cancel()


def spread_over(count: int, per_channel: int) -> int:
    """Channels needed for `count` calls, `per_channel` at most on each."""
    return max(1, math.ceil(count / per_channel))


async def warm_up(stub: sgrpc.ConversationServiceAsyncStub, names: list[str]) -> None:
    """A few ordinary turns (streamed and unary) and one subscription, all ended."""
    for i, name in enumerate(names[:4]):
        turn = spb.TurnInput(conversation=name, request_id="warm-up", content="Hello there.")
        if i % 2:
            await stub.SendMessage(spb.SendMessageRequest(input=turn))
        else:
            async for _ in stub.StreamTurn(spb.StreamTurnRequest(start=turn)):
                pass
    subscription = stub.SubscribeEvents(spb.SubscribeEventsRequest(conversation=names[0]))
    async for response in subscription:
        if response.HasField("caught_up"):
            break
    cancel(subscription)


async def measure(args: argparse.Namespace, served: Served, dsn: str) -> dict[str, Any]:
    states: list[dict[str, Any]] = []
    n, m = args.streams, args.subscriptions
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        probe = ServeProbe(served, db)
        states.append(
            state_row("started", await settle_and_read(probe, args.settle_s, args.samples))
        )
        async with channels(served.target, served.token, 1) as (control,):
            stub = sgrpc.ConversationServiceStub(control)
            names = await create_conversations(stub, max(n, 4))
            await warm_up(stub, names)
        await wait_until(
            probe,
            lambda r: r.turns_running == 0 and r.client_connections == 0,
            30,
            "warm-up turns ended",
        )
        states.append(
            state_row(
                "idle",
                await settle_and_read(probe, args.settle_s, args.samples),
                open_streams=0,
                open_subscriptions=0,
            )
        )

        n_channels, m_channels = spread_over(n, args.per_channel), spread_over(m, args.per_channel)
        streams, subscriptions = OpenCalls(), OpenCalls()
        gate = asyncio.Semaphore(args.opening)
        async with (
            channels(served.target, served.token, n_channels) as stream_channels,
            channels(served.target, served.token, m_channels) as subscription_channels,
        ):
            t0 = time.monotonic()
            stubs = [sgrpc.ConversationServiceStub(c) for c in stream_channels]
            streams.tasks = [
                asyncio.create_task(hold_stream(stubs[i % n_channels], names[i], streams, n, gate))
                for i in range(n)
            ]
            await streams.wait_opened(args.hold_s / 2, f"opening {n} streams")
            if streams.errors:
                raise RuntimeError(f"streams failed: {streams.errors[:5]}")
            opened_streams_s = time.monotonic() - t0
            readings = await settle_and_read(probe, args.settle_s, args.samples)
            states.append(
                state_row("streams", readings, open_streams=streams.open, open_subscriptions=0)
            )

            t0 = time.monotonic()
            stubs = [sgrpc.ConversationServiceStub(c) for c in subscription_channels]
            subscriptions.tasks = [
                asyncio.create_task(
                    hold_subscription(stubs[i % m_channels], names[i % n], subscriptions, m, gate)
                )
                for i in range(m)
            ]
            await subscriptions.wait_opened(args.hold_s / 2, f"opening {m} subscriptions")
            if subscriptions.errors:
                raise RuntimeError(f"subscriptions failed: {subscriptions.errors[:5]}")
            opened_subscriptions_s = time.monotonic() - t0
            readings = await settle_and_read(probe, args.settle_s, args.samples)
            states.append(
                state_row(
                    "streams_and_subscriptions",
                    readings,
                    open_streams=streams.open,
                    open_subscriptions=subscriptions.open,
                )
            )
            # Every reading above was taken with every call still open.
            if streams.open != n or subscriptions.open != m:
                raise RuntimeError(
                    f"calls ended during the readings ({streams.open} of {n} streams, "
                    f"{subscriptions.open} of {m} subscriptions open): raise --hold-s"
                )
            await subscriptions.close()
            await streams.close()
        # The held turns run on to their end, with no one watching.
        await wait_until(
            probe,
            lambda r: r.turns_running == 0 and r.client_connections == 0,
            args.hold_s + 60,
            "held turns ended",
        )
        states.append(
            state_row(
                "closed",
                await settle_and_read(probe, args.settle_s, args.samples),
                open_streams=0,
                open_subscriptions=0,
            )
        )

    by_state = {s["state"]: s for s in states}
    idle, held = by_state["idle"]["rss_kib"], by_state["streams"]["rss_kib"]
    both = by_state["streams_and_subscriptions"]["rss_kib"]
    return {
        "states": states,
        "costs": {
            "kib_per_stream": round((held - idle) / n, 2),
            "kib_per_subscription": round((both - held) / m, 2),
            "retained_kib_after_close": by_state["closed"]["rss_kib"] - idle,
        },
        "channels": {"streams": n_channels, "subscriptions": m_channels},
        "opening_s": {
            "streams": round(opened_streams_s, 2),
            "subscriptions": round(opened_subscriptions_s, 2),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nturnlog serve memory ({result['settings']['streams']} streams, "
        f"{result['settings']['subscriptions']} subscriptions)"
    )
    print(
        f"{'state':<26} {'RSS MiB':>8} {'fds':>5} {'thr':>4} {'clients':>7} {'db':>3} "
        f"{'turns':>5} {'cpu %':>6} {'db tx/s':>7} {'worker MiB':>10}"
    )
    for s in result["states"]:
        cpu = "-" if s["serve_cpu_percent"] is None else s["serve_cpu_percent"]
        xacts = "-" if s["database_xacts_per_s"] is None else s["database_xacts_per_s"]
        print(
            f"{s['state']:<26} {s['rss_mib']:>8} {s['fds']:>5} {s['threads']:>4} "
            f"{s['client_connections']:>7} {s['database_connections']:>3} "
            f"{s['turns_running']!s:>5} {cpu!s:>6} {xacts!s:>7} {s['worker_rss_kib'] / 1024:>10.1f}"
        )
    costs = result["costs"]
    print(
        f"\nper stream: {costs['kib_per_stream']} KiB; per subscription: "
        f"{costs['kib_per_subscription']} KiB; kept after closing: "
        f"{costs['retained_kib_after_close'] / 1024:.1f} MiB (against idle)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="use this (migrated or empty) database, not an embedded one")
    parser.add_argument("--streams", type=int, default=1000, help="StreamTurn streams held open")
    parser.add_argument(
        "--subscriptions", type=int, default=1000, help="SubscribeEvents subscriptions held open"
    )
    parser.add_argument(
        "--per-channel",
        type=int,
        default=100,
        help="calls per client channel (each its own connection)",
    )
    parser.add_argument(
        "--opening",
        type=int,
        default=64,
        help="calls being opened at once (until their first message)",
    )
    parser.add_argument(
        "--hold-s",
        type=float,
        default=150.0,
        help="how long each held turn waits for its first token",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=5.0,
        help="seconds between reaching a state and its readings",
    )
    parser.add_argument("--samples", type=int, default=5, help="readings per state, 1 s apart")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny sizes unless given (see QUICK)"
    )
    parser.add_argument("--json", type=Path, help="write results here")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if min(args.streams, args.subscriptions, args.per_channel, args.samples) < 1:
        parser.error("--streams, --subscriptions, --per-channel and --samples must be positive")

    serve_limits = {
        "TURNLOG_TENANT_MAX_RUNNING_TURNS": str(args.streams + RUNNING_TURNS_MARGIN),
        "TURNLOG_TENANT_REQUESTS_PER_S": "0",
    }
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="turnlog-bench-memory-"))
    try:
        with (
            database(args.dsn) as dsn,
            serving(memory_script(args.hold_s), dsn, folder, serve_limits) as served,
        ):
            try:
                figures = asyncio.run(measure(args, served, dsn))
            except BaseException:
                print_log_tails(folder)
                raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    result = {
        "settings": {
            "streams": args.streams,
            "subscriptions": args.subscriptions,
            "per_channel": args.per_channel,
            "opening": args.opening,
            "hold_s": args.hold_s,
            "settle_s": args.settle_s,
            "samples": args.samples,
            "serve_env": serve_limits,
            "quick": args.quick,
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "cpus": os.cpu_count(),
        },
        **figures,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    result["settings"]["channels"] = result.pop("channels")
    print_table(result)
    print(f"\nwall time {result['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
