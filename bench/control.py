"""Benchmark: turn control on the turn's own replica against through the turn mailbox.

A program, not a test. `CancelTurn` and `SubmitToolResults` reach a turn
directly when it runs on the replica that received the call, and as a
letter in the turn mailbox (a row in `turnlog.turn_mailbox` and a
`NOTIFY turnlog_turn_control`) when it runs on another one
(docs/conversation.md, "Turn control"). This measures what that hop costs.

Everything runs in this process, on loopback, as
tests/conversation/test_turn_control.py builds it: an embedded PostgreSQL
(unless --dsn), an in-process scripted engine worker, and replicas that
share the database, each as `turnlog serve` wires one (its own event store,
replica lock, `PostgresTurnMailbox` with its own listening connection,
`ConversationApplication`, and gRPC server with authentication on; each
replica has its own local signing key and the client a token of each).
Every turn runs on replica A and is started with `StreamTurn` on A; the
control call goes to A ("same") or to B ("other"), on a channel of its own.

Figures, each the median and p90 of --reps runs (after one warm-up run of
each side, not counted), every run on a new conversation created outside
its timing; within a repetition both sides run once, in an order that
rotates from repetition to repetition (bench/paired.py):

(a) cancel: the turn streams slowly (a scripted reply of about 10 s,
    tokens --token-delay-ms apart); once its first text delta has been
    read, `CancelTurn` is sent; the figure is call sent -> response
    received (the service answers once the turn has ended, so the response
    says CANCELLED; checked, as is the stream's own end).
(b) tool_results: the conversation has a client-side tool and the scripted
    model asks for it; once `tool_execution_started` has been read,
    `SubmitToolResults` is sent; call sent -> response received (the
    service answers once the result is recorded in the log; the stream's
    `tool_execution_finished` and COMPLETED end are checked after).
    For the other side, `other_delivery`: from the moment B starts posting
    the letter to the moment A's turn control applies it (the hop itself;
    the rest of "other" is B's load of the conversation and B following
    the log until the outcome is recorded there).
(c) ratios other/same, paired: within each repetition, other's latency
    over same's; the median, min and max of those per-run ratios
    (`cancel_other_vs_same`, `tool_results_other_vs_same`).
(d) lost_notify_cancel (--lost-reps runs, 0 to skip): a third replica C
    whose letters are inserted without their NOTIFY, as if the
    notification were lost; A finds the letter only at its next poll of
    the mailbox (`TurnControl.poll_interval_s`, 2 s by default): `CancelTurn`
    through C, call -> response. A's receiver polls once it has had no
    notification for the poll interval; here each letter is posted just
    after the poll that took the previous one, so expect close to a whole
    interval (the worst case while the channel is quiet).

--pause-ms waits that long between seeing the turn run and sending the
control call. With 0 (the default) the call comes within milliseconds of
the turn's latest append, inside the event store's 50 ms NOTIFY coalescing
window (storage/postgres.py), which B then waits out; 100 shows the hop
without it.

The path each side took is checked, not assumed: every replica's mailbox
counts the letters it posts, and the JSON's `letters_posted` must show none
for "same" and one per run for "other" and "lost_notify".

Machine noise: on a shared machine, run-to-run drift is larger than the
difference measured; compare medians of several runs of this program, and
the paired ratios rather than absolute milliseconds.

Usage:
    python bench/control.py [--dsn URL] [--reps 30] [--lost-reps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from paired import format_paired, paired_ratio, rotated

from turnlog.api.server import grpc_server
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.channel import credentialed_channel
from turnlog.auth.principal import Scope
from turnlog.auth.settings import AuthSettings
from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.conversation.control import POLL_INTERVAL_S
from turnlog.engine.v1 import engine_pb2_grpc
from turnlog.storage import Letter, PostgresEventStore, PostgresReplicaLock, PostgresTurnMailbox
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.migrations import migrate
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer

SLOW = "long story"
TOOL = "ask the client"
#: The sides of (a) and (b): which replica receives the control call.
SIDES = ("same", "other")
#: The letter insert of `PostgresTurnMailbox.post` without its `pg_notify`.
_POST_WITHOUT_NOTIFY = (
    "INSERT INTO turnlog.turn_mailbox (turn_id, body) VALUES (%s, %s) RETURNING letter_id"
)


def script(token_delay_ms: int) -> dict[str, Any]:
    """A slow reply (so a turn is still running when cancelled), and a client tool call.

    The slow reply is cut at the service's default max_tokens: about 500
    tokens, so about 10 s at the default 20 ms a token; a cancel comes
    within milliseconds of the first one, or within the 2 s poll in (d).
    """
    return {
        "model": "scripted-bench-control",
        "replies": [
            {"match": TOOL, "tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]},
            {"match": SLOW, "text": "Once upon a time " * 2000, "token_delay_ms": token_delay_ms},
        ],
        "default": {"text": "Done."},
    }


class CountingMailbox(PostgresTurnMailbox):
    """`PostgresTurnMailbox` counting the letters it posts (which path a call took).

    `post_started` is when the latest post began (perf_counter), the start
    of the letter's delivery.
    """

    posted = 0
    post_started = 0.0

    async def post(self, turn_id: str, body: str) -> int:
        self.posted += 1
        self.post_started = time.perf_counter()
        return await super().post(turn_id, body)


class NotifylessMailbox(CountingMailbox):
    """Posts letters without their NOTIFY: the receiver finds them only by its poll."""

    async def post(self, turn_id: str, body: str) -> int:
        self.posted += 1
        self.post_started = time.perf_counter()
        # (`_run` is the pool helper of the parent: the same statement minus pg_notify.)
        rows = await self._run(_POST_WITHOUT_NOTIFY, (turn_id, body))
        return int(rows[0][0])


@dataclass
class Replica:
    """One replica on the shared database: its application, mailbox and a client stub.

    `applied` holds when (perf_counter) this replica's turn control applied
    each letter it took, the end of a letter's delivery.
    """

    name: str
    app: ConversationApplication
    mailbox: CountingMailbox
    stub: sgrpc.ConversationServiceAsyncStub
    applied: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        control = self.app.control
        apply = control.apply

        def timed_apply(letter: Letter) -> None:
            self.applied.append(time.perf_counter())
            apply(letter)

        # (An instance attribute shadows the method: the receiver calls self.apply.)
        control.apply = timed_apply  # type: ignore[method-assign]


@dataclass
class Timing:
    """One control call: call sent -> response; post -> letter applied (None: no letter)."""

    call_s: float
    delivery_s: float | None


def _timing(runner: Replica, via: Replica, t0: float, t1: float) -> Timing:
    if via is runner:
        return Timing(t1 - t0, None)
    if not runner.applied or runner.applied[-1] < via.mailbox.post_started:
        raise RuntimeError(f"replica {runner.name} applied no letter from {via.name}")
    return Timing(t1 - t0, runner.applied[-1] - via.mailbox.post_started)


@contextlib.asynccontextmanager
async def engine_worker(token_delay_ms: int) -> AsyncIterator[EngineClient]:
    """An in-process scripted EngineService on loopback, and a client of it."""
    server = grpc.aio.server()
    engine = ScriptedEngine(Script.from_json(script(token_delay_ms)))
    engine_pb2_grpc.add_EngineServiceServicer_to_server(EngineServicer(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with EngineClient([f"127.0.0.1:{port}"]) as client:
            yield client
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def replica(
    dsn: str, engine: EngineClient, name: str, mailbox_type: type[CountingMailbox]
) -> AsyncIterator[Replica]:
    """One `turnlog serve` replica (as `api.server.run_server` wires it) and a stub of it."""
    async with contextlib.AsyncExitStack() as stack:
        store = await PostgresEventStore.open(dsn)
        stack.push_async_callback(store.close)
        lock = await PostgresReplicaLock.open(dsn, f"bench-{name}")
        stack.push_async_callback(lock.close)
        mailbox = await mailbox_type.open(dsn)
        stack.push_async_callback(mailbox.close)
        assert isinstance(mailbox, CountingMailbox)
        app = ConversationApplication(
            store,
            engine,
            ownership=lock,
            mailbox=mailbox,
            defaults=ServiceDefaults(max_tool_round_trips=1),
        )
        stack.push_async_callback(app.shutdown)
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="turnlog-bench-auth-"))
        authenticator = Authenticator(AuthSettings.local_default(Path(data_dir)))
        stack.push_async_callback(authenticator.aclose)
        assert authenticator.local_key is not None
        server, _ = grpc_server(app, authenticator=authenticator)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stack.push_async_callback(server.stop, 0)
        token = authenticator.local_key.mint_token(
            scopes=(Scope.READ, Scope.WRITE), subject="bench", ttl_s=3600
        )
        channel = await stack.enter_async_context(credentialed_channel(f"127.0.0.1:{port}", token))
        await asyncio.wait_for(mailbox.listening.wait(), 10)
        yield Replica(name, app, mailbox, sgrpc.ConversationServiceStub(channel))


# -- one measured call ------------------------------------------------------------------


async def _conversation(stub: sgrpc.ConversationServiceAsyncStub, *, client_tool: bool) -> str:
    tools = [pb.ToolDefinition(name="lookup", client_side=True)] if client_tool else []
    created = await stub.CreateConversation(spb.CreateConversationRequest(tools=tools))
    return str(created.conversation.name)


async def _started(
    stub: sgrpc.ConversationServiceAsyncStub, name: str, content: str, until: str
) -> tuple[Any, spb.TurnEvent]:
    """A StreamTurn, read up to its first event of kind `until` (returned)."""
    call = stub.StreamTurn(
        spb.StreamTurnRequest(start=spb.TurnInput(conversation=name, content=content))
    )
    async for response in call:
        if response.event.WhichOneof("kind") == until:
            return call, response.event
    raise RuntimeError(f"the turn ended before {until}")


async def _rest(call: Any) -> list[spb.TurnEvent]:
    return [r.event async for r in call]


async def cancel_once(runner: Replica, via: Replica, pause_s: float = 0.0) -> Timing:
    """A slow turn on `runner`, cancelled through `via`: seconds from call to response."""
    name = await _conversation(runner.stub, client_tool=False)
    stream, first = await _started(runner.stub, name, SLOW, "text_delta")
    request = spb.CancelTurnRequest(conversation=name, turn_id=first.turn_id, reason="bench")
    await asyncio.sleep(pause_s)
    t0 = time.perf_counter()
    answered = await via.stub.CancelTurn(request, timeout=60)
    elapsed = _timing(runner, via, t0, time.perf_counter())
    if answered.turn.status != pb.TURN_STATUS_CANCELLED:
        raise RuntimeError(f"CancelTurn answered {answered.turn.status}")
    rest = await _rest(stream)
    if rest[-1].turn_ended.turn.status != pb.TURN_STATUS_CANCELLED:
        raise RuntimeError("the stream did not end CANCELLED")
    return elapsed


async def tool_result_once(runner: Replica, via: Replica, pause_s: float = 0.0) -> Timing:
    """A turn on `runner` awaiting a client tool, answered through `via`: call to response."""
    name = await _conversation(runner.stub, client_tool=True)
    stream, started = await _started(runner.stub, name, TOOL, "tool_execution_started")
    call_id = started.tool_execution_started.call.call_id
    request = spb.SubmitToolResultsRequest(
        conversation=name,
        turn_id=started.turn_id,
        results=[spb.ToolResult(call_id=call_id, result='{"found": 1}')],
    )
    await asyncio.sleep(pause_s)
    t0 = time.perf_counter()
    answered = await via.stub.SubmitToolResults(request, timeout=60)
    elapsed = _timing(runner, via, t0, time.perf_counter())
    if list(answered.call_ids) != [call_id]:
        raise RuntimeError(f"SubmitToolResults answered {list(answered.call_ids)}")
    rest = await _rest(stream)
    finished = [e for e in rest if e.HasField("tool_execution_finished")]
    if [f.tool_execution_finished.execution.result for f in finished] != ['{"found": 1}']:
        raise RuntimeError("the turn did not record the result")
    if rest[-1].turn_ended.turn.status != pb.TURN_STATUS_COMPLETED:
        raise RuntimeError("the turn did not complete")
    return elapsed


# -- figures ------------------------------------------------------------------------------


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summary(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(p90(ms), 3),
        "runs_ms": [round(v, 3) for v in ms],
    }


async def paired_sides(
    reps: int, once: Callable[[Replica, Replica], Awaitable[Timing]], a: Replica, b: Replica
) -> dict[str, list[Timing]]:
    """`reps` repetitions of both sides in rotated order (the turn runs on A each time)."""
    via = {"same": a, "other": b}
    runs: dict[str, list[Timing]] = {side: [] for side in SIDES}
    for rep in range(reps):
        for side in rotated(SIDES, rep):
            runs[side].append(await once(a, via[side]))
    return runs


def delivery(runs: list[Timing]) -> list[float]:
    return [t.delivery_s for t in runs if t.delivery_s is not None]


async def bench(
    dsn: str, reps: int, lost_reps: int, token_delay_ms: int, pause_s: float
) -> dict[str, Any]:
    await migrate(dsn)
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    posted: dict[str, dict[str, int]] = {}
    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(engine_worker(token_delay_ms))
        a = await stack.enter_async_context(replica(dsn, engine, "a", CountingMailbox))
        b = await stack.enter_async_context(replica(dsn, engine, "b", CountingMailbox))
        for kind, control in (("cancel", cancel_once), ("tool_results", tool_result_once)):
            once = functools.partial(control, pause_s=pause_s)
            for via in (a, b):
                await once(a, via)  # warm-up, not counted
            before = (a.mailbox.posted, b.mailbox.posted)
            runs = await paired_sides(reps, once, a, b)
            posted[kind] = {
                "same": a.mailbox.posted - before[0],
                "other": b.mailbox.posted - before[1],
            }
            results[kind] = {side: summary([t.call_s for t in runs[side]]) for side in SIDES}
            results[kind]["other_delivery"] = summary(delivery(runs["other"]))
            ratios[f"{kind}_other_vs_same"] = paired_ratio(
                [t.call_s for t in runs["other"]], [t.call_s for t in runs["same"]]
            )
        if lost_reps > 0:
            c = await stack.enter_async_context(replica(dsn, engine, "c", NotifylessMailbox))
            await cancel_once(a, c, pause_s)  # warm-up
            before_c = c.mailbox.posted
            lost = [await cancel_once(a, c, pause_s) for _ in range(lost_reps)]
            posted["lost_notify_cancel"] = {"other": c.mailbox.posted - before_c}
            results["lost_notify_cancel"] = {
                "other": summary([t.call_s for t in lost]),
                "other_delivery": summary(delivery(lost)),
            }
    async with await psycopg.AsyncConnection.connect(dsn) as db:
        row = await (await db.execute("SELECT count(*) FROM turnlog.turn_mailbox")).fetchone()
        assert row is not None
        left = int(row[0])
    return {"results": results, "ratios": ratios, "letters_posted": posted, "letters_left": left}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an empty or migrated database (default: embedded)")
    parser.add_argument("--reps", type=int, default=30, help="repetitions of (a) and (b)")
    parser.add_argument(
        "--lost-reps", type=int, default=10, help="runs of (d), lost NOTIFY (0: skip)"
    )
    parser.add_argument(
        "--token-delay-ms", type=int, default=20, help="the slow reply's delay between tokens"
    )
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="wait this long after the turn is seen running before the control call",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.reps < 1 or args.lost_reps < 0:
        parser.error("--reps must be at least 1, --lost-reps at least 0")
    server: EmbeddedPostgres | None = None
    pg_dir: Path | None = None
    dsn = args.dsn
    try:
        if dsn is None:
            pg_dir = Path(tempfile.mkdtemp(prefix="turnlog-bench-control-"))
            server = EmbeddedPostgres(pg_dir / "pg")
            dsn = server.start()
        out = asyncio.run(
            bench(dsn, args.reps, args.lost_reps, args.token_delay_ms, args.pause_ms / 1000)
        )
    finally:
        if server is not None:
            server.stop()
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)
    out["settings"] = {
        "reps": args.reps,
        "lost_reps": args.lost_reps,
        "token_delay_ms": args.token_delay_ms,
        "pause_ms": args.pause_ms,
        "poll_interval_s": POLL_INTERVAL_S,
        "database": "dsn" if args.dsn else "embedded",
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
    }
    results, ratios = out["results"], out["ratios"]
    print(f"turn control, median (p90) ms of {args.reps} runs; the turn runs on A")
    print(f"{'':22s} {'same (A)':>18s} {'other (B)':>18s} {'of which delivery':>18s}")

    def cell(figure: dict[str, Any]) -> str:
        return f"{figure['median_ms']:>9.2f} ({figure['p90_ms']:>6.2f})"

    for kind in ("cancel", "tool_results"):
        row = results[kind]
        print(f"{kind:22s} {cell(row['same'])} {cell(row['other'])} {cell(row['other_delivery'])}")
    if "lost_notify_cancel" in results:
        row = results["lost_notify_cancel"]
        print(
            f"{'cancel, NOTIFY lost':22s} {'':18s} {cell(row['other'])} {cell(row['other_delivery'])}"
            f"  ({args.lost_reps} runs; A polls every {POLL_INTERVAL_S} s)"
        )
    print("paired ratios (other/same):")
    for name, ratio in ratios.items():
        print(f"  {name:32s} {format_paired(ratio)}")
    print(f"letters posted: {out['letters_posted']}; left in the table: {out['letters_left']}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
