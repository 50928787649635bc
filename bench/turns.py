"""Benchmark: turns through `ConversationService` vs the engine worker called directly.

A program, not a test. Everything runs on loopback, as separate processes:
an embedded PostgreSQL (unless --dsn), `turnlog worker`, `turnlog serve
--worker ...` (the service under test) and this process, the client.
Every service authenticates, as `turnlog serve` does by default on loopback:
each has a data folder of its own in this run's temp dir (TURNLOG_DATA_DIR,
its local signing key), and every call carries the token it printed
(`turnlog.auth.channel.credentialed_channel`); only phase 3's `noauth`
side runs `--insecure`.

1. Scripted worker (replies at once, no delays). For each concurrency level
   (default 1, 16, 64 conversations in flight, each sending --turns turns one
   after another) and each guardrail profile (default "none" and "default"):
   - direct: `EngineClient.generate` on the worker with the chat the service
     would send (system prompt, the history so far, the new user message);
   - service: `SendMessage` through the conversation service.
   Both sides run once per repetition, --reps times, taking turns going
   first; turns/s is the median over the repetitions, p50/p99 latency is over
   every measured turn. "Added" is service minus direct at p50 and p99: what
   the service and the log cost. `service_vs_direct_turns_P_C` is the paired
   ratio of turns/s (see "Ratios").
2. Database work per turn, between readings taken before the first level and
   after each level (warm-up turns included in the count). Statistics are
   flushed by backends asynchronously: an idle backend that flushed less than
   1 s earlier flushes only after 10 s, so each reading waits
   --stats-settle-s (11 s) of idleness first:
   - xact_commit: pg_stat_database.xact_commit delta of the service's
     database: every committed transaction, read-only ones (loads) included;
   - write_xacts: transaction ids assigned (delta of
     pg_snapshot_xmax(pg_current_snapshot())): transactions that wrote, so
     wrote a commit record to the WAL (appends, and the NOTIFY the store sends
     after appends: NOTIFY takes an xid). Target: at most 2 per turn without
     tools, i.e. the two appends, plus NOTIFYs where they are not coalesced;
   - appends: distinct turnlog.events.transaction_id among the new events
     (exact: the append transactions themselves); other = write_xacts - appends;
   - wal_fsyncs: pg_stat_io fsyncs of object 'wal' (group commit can merge
     several commits into one flush; None before PostgreSQL 16); wal_bytes: pg_current_wal_lsn() delta.
   This program's own statistics query is one transaction per reading and is
   subtracted; autovacuum/autoanalyze may add a few, rollbacks are reported.
3. Authentication on against off (--auth-levels, default 16 and 64
   conversations in flight; --auth-only runs this phase alone). Two services
   on one scripted worker and one database, started one after the other:
   `auth`, checking the token every call carries (the default), and
   `noauth`, `--insecure`. Both admit calls through the same interceptor
   (scope, the tenant's rate limit) and, for a stream, the same expiry
   watch, so what differs is the credential's verification (first, a call
   with no token must be refused by `auth` and answered by `noauth`:
   `without_token` in the JSON). For each kind of turn (--auth-modes:
   `unary`, SendMessage; `stream`, StreamTurn, every event read) and
   level, a warm-up round per side, then --auth-reps
   repetitions, each running both sides once in rotated order, on new
   conversations (at least --auth-min-turns turns per run, --turns per
   conversation) created just before the run, outside its timing; guardrail
   profile "none". Turns/s per side (median of runs), p50/p99 over every
   turn and each run's p99, CPU ms per turn (median of runs) of the side's
   service and of this process, the client (`cpu_seconds`: each process's
   own CPU clock, to the nanosecond on Linux), and paired ratios per mode
   and level: `auth_vs_noauth_turns_M_C`, auth's turns/s over noauth's, and
   `auth_vs_noauth_p99_M_C`, noauth's p99 over auth's (so that above 1
   still means auth is faster); in the JSON's `auth` section (`compared`)
   beside them, the CPU per turn ratios (noauth's over auth's) of the
   service and the client, `serve_cpu_ratio` and `bench_cpu_ratio`: on a
   shared machine they move far less than wall-clock figures.
4. vLLM CPU worker on the tiny model (built on the fly unless --model), same
   engine settings and thread settings as bench/engine.py (whose launch code
   is imported): output tokens/s, counted from usage, of --vllm-concurrency
   conversations at a time, each sending --vllm-turns turns (max_tokens
   --max-tokens; greedy unless --temperature, then seeded per conversation
   alike on every side; the service has no ignore_eos, and the random tiny
   model's greedy replies run to max_tokens). Every side sends the same chats
   (system prompt + history + new message). Two groups, each doing one kind
   of work on all its sides:
   - streamed, every token delivered and read as it comes:
     `service_stream_P`: `StreamTurn` through the service (guardrail profile
     P, "none" unless --vllm-profiles), reading every `TurnEvent`;
     `vllm_http_stream`: vLLM's own OpenAI-compatible server with
     `stream: true` and `stream_options.include_usage`, parsing every chunk;
     `worker_direct_stream`: `EngineClient.generate` straight to the worker
     over gRPC (no service), every delta;
   - unary, one reply per turn:
     `service_unary_P`: `SendMessage` (the service asks the worker for deltas
     merged every `ServiceDefaults.unwatched_delta_interval_s`, 50 ms);
     `vllm_http_unary`: the same server with `stream: false`;
     `worker_direct_unary`: the worker with `min_delta_interval`
     --unary-delta-interval-s (default 0.05 s, the service's own).
   The worker_direct sides split the gap between the worker and the service.
   Both servers run at once. Every side runs once per repetition
   (--vllm-reps), in an order that rotates from repetition to repetition.
   The service runs with `--metrics-listen`; its Prometheus endpoint is
   scraped before and after each measured service run, and the deltas of
   `turnlog_turn_stage_seconds` (sum and count per stage) and of
   `turnlog_turn_appends_total` (per kind) over all of them say where the
   service's time per turn goes (docs/metrics.md), per service side: mean ms
   per observation (per turn; per generation for first_token and generation,
   per tool round for tools), ms per turn, and commits per turn
   (`vllm_service_stages`, `vllm_service_appends_per_turn`,
   `vllm_service_turns`). The client's own first-token and generation times
   are recorded for every side that receives deltas (`vllm_client_stages`).
   CPU: each side's runs are bracketed by readings of the CPU time (user +
   system, psutil) of every process tree: vLLM's HTTP server, the worker, the
   service (each with its children), PostgreSQL (embedded only) and this
   process; printed as CPU ms per 1,000 output tokens of that side
   (`vllm_cpu_ms_per_1k_tokens`). On a machine with few cores, CPU spent
   beside the engine core slows it, so this says what each path costs.

Ratios are paired (bench/paired.py): within each repetition, one side's
throughput over the other's, then the median, min and max of those per-run
ratios, with every run: {"median", "min", "max", "runs"}; never a ratio of
medians. vLLM ratios, C the concurrency, P a suffix `_P` for profiles other
than "none": `vllm_stream_service_vs_vllm_http_C`,
`vllm_stream_service_vs_worker_direct_C`, `vllm_stream_worker_direct_vs_vllm_http_C`,
the same three with `vllm_unary_`, and `vllm_service_unary_vs_stream_C` (what
the coarser deltas of a unary turn buy).

Smoke run (CI, tests/bench/test_bench_turns.py): `--quick --worker
HOST:PORT` shrinks every size (the authentication phase: 2 conversations in
flight, two runs of 4 turns per side and mode), waits 1 s instead of 11
before each counter reading (so xact_commit may be stale; appends,
write_xacts and WAL bytes are exact) and uses an already running vLLM worker
instead of starting one, and so starts no vLLM HTTP server either (it would
need an engine of its own). Only a full run produces the vllm_http_* sides,
every ratio against them, and the CPU of the worker and of vLLM's HTTP
server (an external worker is not counted).

Usage:
    python bench/turns.py [--json out.json] [--dsn URL] [--levels 1 16 64] [--no-vllm]
    python bench/turns.py --auth-only [--auth-reps 30] [--json out.json]   # auth on vs off
    python bench/turns.py --quick --worker HOST:PORT --json out.json   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil  # type: ignore[import-untyped]  # (no types-psutil in the lock)
import psycopg
from engine import (
    ENGINE_SETTINGS,
    build_model,
    free_port,
    http_command,
    start_process,
    stop_process,
    wait_for,
    wait_for_logged_port,
    wait_for_worker_port,
)
from paired import format_paired, paired_ratio, rotated
from prometheus_client.parser import text_string_to_metric_families

from turnlog.auth.channel import credentialed_channel
from turnlog.engine.v1 import engine_pb2 as epb
from turnlog.metrics import STAGES
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient

SYSTEM_PROMPT = "You are a helpful assistant. Be brief."
#: The service's `ServiceDefaults.unwatched_delta_interval_s` (the smoke test
#: checks they agree): how far apart a `SendMessage` turn's deltas may come.
UNARY_DELTA_INTERVAL_S = 0.05
#: `--quick`: a smoke run of seconds (explicit options still win).
QUICK: dict[str, Any] = {
    "levels": [1], "profiles": ["none"], "turns": 2, "min_turns": 4, "reps": 2,
    "stats_settle_s": 1.0, "vllm_concurrency": [2], "vllm_turns": 2, "vllm_reps": 2,
    "max_tokens": 16, "auth_levels": [2], "auth_min_turns": 4, "auth_reps": 2,
}  # fmt: skip
SCRIPT = {"model": "scripted-bench", "default": {"text": "The quick brown fox jumps over it."}}
USER_TEXTS = [
    "Explain the difference between a list and a tuple.",
    "What does the with statement do in Python?",
    "Describe how a hash table resolves collisions.",
    "How do I reverse a linked list in place?",
]


# vLLM's HTTP server (uvicorn) closes a keep-alive connection after 5 s idle; a
# client that reuses one as the server closes it fails with "Can not write
# request body". Idle connections are dropped on this side first.
HTTP_KEEPALIVE_S = 2.0


def user_text(conversation: int, turn: int) -> str:
    return f"{USER_TEXTS[(conversation + turn) % len(USER_TEXTS)]} (conversation {conversation}, turn {turn})"


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Run:
    """One measured run: per-turn latencies (s), wall time, output tokens."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    tokens: int = 0


async def drive(
    send: Callable[[int, int], Awaitable[int]], conversations: int, turns: int, concurrency: int
) -> Run:
    """`conversations` conversations, `concurrency` at a time, each `turns` turns in order.

    `send(conversation, turn)` runs one turn and returns its output tokens.
    """
    run = Run()
    sem = asyncio.Semaphore(concurrency)

    async def conversation(i: int) -> None:
        async with sem:
            for t in range(turns):
                t0 = time.perf_counter()
                tokens = await send(i, t)  # (not `+= await`: tasks interleave)
                run.tokens += tokens
                run.latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(i) for i in range(conversations)))
    run.wall_s = time.perf_counter() - t0
    return run


# -- the sides --------------------------------------------------------------------


class ClientStages:
    """Client-side seconds per turn of a side that receives deltas: request sent ->
    first text, first text -> done (for comparison with the service's stages)."""

    def __init__(self) -> None:
        self.first_token_s: list[float] = []
        self.generation_s: list[float] = []

    def add(self, sent: float, first: float) -> None:
        if first:
            self.first_token_s.append(first - sent)
            self.generation_s.append(time.perf_counter() - first)

    def clear(self) -> None:
        self.first_token_s.clear()
        self.generation_s.clear()

    def results(self) -> dict[str, dict[str, float]]:
        return {
            name: {"count": len(values), "mean_ms": round(statistics.fmean(values) * 1000, 3)}
            for name, values in (
                ("first_token", self.first_token_s),
                ("generation", self.generation_s),
            )
            if values
        }


class Direct:
    """Chats sent straight to the worker; keeps each conversation's history.

    `held_interval_s` > 0 asks the worker to hold deltas that long
    (`StartGeneration.min_delta_interval`), as the service does for a
    `SendMessage` turn; 0 takes every delta as the engine makes it.
    """

    def __init__(
        self,
        client: EngineClient,
        max_tokens: int | None,
        temperature: float = 0.0,
        held_interval_s: float = 0.0,
    ) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.held_interval_s = held_interval_s
        self.histories: dict[int, list[epb.ChatMessage]] = {}
        self.stages = ClientStages()

    def reset(self, conversations: int) -> None:
        self.histories = {
            i: [epb.ChatMessage(role=epb.CHAT_ROLE_SYSTEM, content=SYSTEM_PROMPT)]
            for i in range(conversations)
        }

    async def send(self, i: int, t: int) -> int:
        history = self.histories[i]
        history.append(epb.ChatMessage(role=epb.CHAT_ROLE_USER, content=user_text(i, t)))
        sampling = epb.SamplingParams(temperature=self.temperature)
        if self.temperature > 0:
            sampling.seed = i
        if self.max_tokens is not None:
            sampling.max_tokens = self.max_tokens
        start = epb.StartGeneration(
            chat=epb.ChatPrompt(messages=history, add_generation_prompt=True), sampling=sampling
        )
        if self.held_interval_s > 0:
            start.min_delta_interval.FromNanoseconds(round(self.held_interval_s * 1e9))
        text: list[str] = []
        sent, first = time.perf_counter(), 0.0
        async for event in self.client.generate(start):
            if isinstance(event, epb.GenerationDelta):
                if not first:
                    first = time.perf_counter()
                text.append(event.text)
            else:
                self.stages.add(sent, first)
                content = event.content if event.tool_calls else "".join(text)
                history.append(epb.ChatMessage(role=epb.CHAT_ROLE_ASSISTANT, content=content))
                return int(event.usage.completion_tokens)
        raise RuntimeError("generation ended without GenerationDone")


class Service:
    """Conversations on the service; `prepare` creates them outside the timing.

    `send` is a `SendMessage` turn (one reply); `send_stream` a `StreamTurn`
    turn, every event read as it comes.
    """

    def __init__(
        self,
        stub: sgrpc.ConversationServiceAsyncStub,
        max_tokens: int | None,
        temperature: float = 0.0,
        seeded: bool = False,
    ) -> None:
        self.stub = stub
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seeded = seeded
        self.names: list[str] = []
        self.turns_sent = 0
        self.stream_stages = ClientStages()

    async def prepare(self, conversations: int, profile: str) -> None:
        sem = asyncio.Semaphore(16)

        async def create(i: int) -> str:
            defaults = pb.TurnDefaults(temperature=self.temperature)
            if self.max_tokens is not None:
                defaults.max_tokens = self.max_tokens
            if self.seeded:
                defaults.seed = i
            async with sem:
                created = await self.stub.CreateConversation(
                    spb.CreateConversationRequest(
                        request_id=os.urandom(16).hex(),
                        system_prompt=SYSTEM_PROMPT,
                        defaults=defaults,
                        guardrail_profile=profile,
                    )
                )
                return str(created.conversation.name)

        self.names = list(await asyncio.gather(*(create(i) for i in range(conversations))))

    def _input(self, i: int, t: int) -> spb.TurnInput:
        return spb.TurnInput(conversation=self.names[i], request_id=f"turn-{t}",
                             content=user_text(i, t))  # fmt: skip

    async def send(self, i: int, t: int) -> int:
        response = await self.stub.SendMessage(spb.SendMessageRequest(input=self._input(i, t)))
        self.turns_sent += 1
        if response.turn.status != pb.TURN_STATUS_COMPLETED:
            raise RuntimeError(f"turn did not complete: {response.turn}")
        return int(response.turn.usage.completion_tokens)

    async def send_stream(self, i: int, t: int) -> int:
        text: list[str] = []
        sent, first = time.perf_counter(), 0.0
        async for response in self.stub.StreamTurn(spb.StreamTurnRequest(start=self._input(i, t))):
            event = response.event
            kind = event.WhichOneof("kind")
            if kind == "text_delta":
                if not first:
                    first = time.perf_counter()
                text.append(event.text_delta.text)
            elif kind == "turn_ended":
                self.stream_stages.add(sent, first)
                self.turns_sent += 1
                turn = event.turn_ended.turn
                if turn.status != pb.TURN_STATUS_COMPLETED:
                    raise RuntimeError(f"turn did not complete: {turn}")
                return int(turn.usage.completion_tokens)
        raise RuntimeError("StreamTurn ended without TurnEnded")


class VllmHttp:
    """The same chats through vLLM's OpenAI-compatible server, streamed (every
    chunk parsed) or not (one JSON reply)."""

    def __init__(
        self, session: Any, url: str, max_tokens: int, temperature: float, *, stream: bool
    ) -> None:
        self.session = session
        self.url = url
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stream = stream
        self.histories: dict[int, list[dict[str, str]]] = {}
        self.stages = ClientStages()

    def reset(self, conversations: int) -> None:
        self.histories = {
            i: [{"role": "system", "content": SYSTEM_PROMPT}] for i in range(conversations)
        }

    async def send(self, i: int, t: int) -> int:
        history = self.histories[i]
        history.append({"role": "user", "content": user_text(i, t)})
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": history,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.temperature > 0:
            body["seed"] = i
        usage = 0
        text: list[str] = []
        sent, first = time.perf_counter(), 0.0
        async with self.session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            if not self.stream:
                reply = await resp.json()
                history.append(
                    {"role": "assistant", "content": reply["choices"][0]["message"]["content"]}
                )
                return int(reply["usage"]["completion_tokens"])
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or ():
                    content = choice.get("delta", {}).get("content") or ""
                    if content and not first:
                        first = time.perf_counter()
                    text.append(content)
        self.stages.add(sent, first)
        history.append({"role": "assistant", "content": "".join(text)})
        return int(usage)


# -- database counters ------------------------------------------------------------

STATS_QUERY = """
SELECT d.xact_commit, d.xact_rollback,
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
       (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint,
       {wal_fsyncs},
       (SELECT count(DISTINCT transaction_id) FROM turnlog.events
         WHERE global_position > %(after)s),
       (SELECT coalesce(max(global_position), 0) FROM turnlog.events)
  FROM pg_stat_database d WHERE d.datname = current_database()
"""
#: WAL fsyncs where pg_stat_io exists (PostgreSQL 16+); -1 (reported as None) before.
WAL_FSYNCS = "(SELECT coalesce(sum(fsyncs), 0) FROM pg_stat_io WHERE object = 'wal')::bigint"
COUNTERS = ("xact_commit", "xact_rollback", "write_xacts", "wal_bytes", "wal_fsyncs")


class Counters:
    """Cumulative database counters, read after the service's backends flushed them."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], settle_s: float) -> None:
        self.conn = conn
        self.settle_s = settle_s
        self.last: dict[str, int] = {}
        self.query = STATS_QUERY

    async def detect(self) -> None:
        """Reads the server's version once, before the first reading's settle time."""
        cur = await self.conn.execute("SELECT to_regclass('pg_catalog.pg_stat_io') IS NOT NULL")
        has_io = (await cur.fetchone()) == (True,)
        self.query = STATS_QUERY.replace("{wal_fsyncs}", WAL_FSYNCS if has_io else "-1")

    async def read(self) -> dict[str, int]:
        """Waits `settle_s`, reads; `append_xacts` counts since the previous reading."""
        await asyncio.sleep(self.settle_s)
        cur = await self.conn.execute(self.query, {"after": self.last.get("last_position", 0)})
        row = await cur.fetchone()
        assert row is not None
        values = [int(v) for v in row]
        self.last = dict(zip(COUNTERS, values, strict=False))
        self.last["at"] = int(time.monotonic() * 1000)
        self.last["append_xacts"], self.last["last_position"] = values[-2:]
        return self.last


def per_turn(
    before: dict[str, int], after: dict[str, int], turns: int, idle_xacts_per_s: float
) -> dict[str, float | None]:
    delta: dict[str, float] = {k: after[k] - before[k] for k in COUNTERS}
    delta["xact_commit"] -= 1  # this program's own reading (`before`)
    # Transactions the service runs on its own (recovery rounds, pings), as
    # measured while idle, over this interval.
    idle = idle_xacts_per_s * (after["at"] - before["at"]) / 1000
    delta["xact_commit_net"] = delta["xact_commit"] - idle
    delta["append_xacts"] = after["append_xacts"]
    delta["other_write_xacts"] = delta["write_xacts"] - delta["append_xacts"]
    out: dict[str, float | None] = {"turns": turns,
                                    "interval_s": (after["at"] - before["at"]) / 1000}  # fmt: skip
    out.update({f"{k}_per_turn": round(v / turns, 3) for k, v in delta.items()})
    if after["wal_fsyncs"] < 0:  # no pg_stat_io
        out["wal_fsyncs_per_turn"] = None
    return out


# -- service metrics --------------------------------------------------------------

#: What a stage's mean is per, where not per turn.
STAGE_PER = {"first_token": "generation", "generation": "generation", "tools": "tool round"}


def scrape_service(url: str) -> dict[tuple[str, str], float] | None:
    """The service's stage seconds ("sum", stage), stage observations ("count", stage)
    and turn commits ("appends", kind); None (and a warning) if the scrape fails."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError as e:
        print(f"  service metrics scrape failed ({e}): run not counted", file=sys.stderr)
        return None
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "turnlog_turn_stage_seconds_sum":
                out["sum", sample.labels["stage"]] = sample.value
            elif sample.name == "turnlog_turn_stage_seconds_count":
                out["count", sample.labels["stage"]] = sample.value
            elif sample.name == "turnlog_turn_appends_total":
                out["appends", sample.labels["kind"]] = sample.value
    return out


class ServiceStages:
    """Deltas of the service's turn metrics, summed over measured runs."""

    def __init__(self) -> None:
        self.turns = 0
        self.delta: dict[tuple[str, str], float] = {}

    def add(
        self,
        before: dict[tuple[str, str], float] | None,
        after: dict[tuple[str, str], float] | None,
        turns: int,
    ) -> None:
        if before is None or after is None:
            return
        self.turns += turns
        for key, value in after.items():
            self.delta[key] = self.delta.get(key, 0.0) + value - before.get(key, 0.0)

    def results(self) -> tuple[dict[str, Any], dict[str, float | None], int]:
        """Per stage (mean ms, ms per turn), commits per turn by kind, and the turns."""
        names = {stage for what, stage in self.delta if what == "count"}
        stages: dict[str, dict[str, Any]] = {}
        for stage in [s for s in STAGES if s in names] + sorted(names - set(STAGES)):
            count, seconds = self.delta["count", stage], self.delta.get(("sum", stage), 0.0)
            stages[stage] = {
                "count": int(count),
                "mean_ms": round(seconds / count * 1000, 3) if count else None,
                "per": STAGE_PER.get(stage, "turn"),
                "ms_per_turn": round(seconds / self.turns * 1000, 3) if self.turns else None,
            }
        appends = {
            kind: round(value / self.turns, 3) if self.turns else None
            for (what, kind), value in self.delta.items()
            if what == "appends"
        }
        return stages, appends, self.turns


class CpuMeter:
    """CPU seconds (user + system) of named process trees, summed per side over its runs.

    Trees are read whole (a server and all its children: vLLM's engine core,
    PostgreSQL's backends), except "bench": this process alone (the servers
    are its children too); read before and after each run; `results` gives each
    tree's CPU milliseconds per 1,000 output tokens of that side (children that
    exited and were reaped meanwhile count through their parent). Processes
    that are idle during a side (the other servers) still count their idle
    cost, which is small.
    """

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.cpu: dict[str, dict[str, float]] = {}
        self.tokens: dict[str, int] = {}

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.roots.items():
            total = 0.0
            try:
                root = psutil.Process(pid)
                tree = [root] if name == "bench" else [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in tree:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    times = proc.cpu_times()
                    total += times.user + times.system
                    if name != "bench":
                        # Children that exited and were reaped (PostgreSQL
                        # backends of closed connections) leave the tree, and
                        # their CPU moves here: without it a reading can drop.
                        total += times.children_user + times.children_system
            out[name] = total
        return out

    async def run(self, side: str, work: Awaitable[Run]) -> Run:
        """Awaits `work` (one run of `side`) between two readings; adds its CPU."""
        before = self.read()
        run = await work
        self.add(side, before, self.read(), run.tokens)
        return run

    def add(
        self, side: str, before: dict[str, float], after: dict[str, float], tokens: int
    ) -> None:
        spent = self.cpu.setdefault(side, {})
        for name, value in after.items():
            spent[name] = spent.get(name, 0.0) + value - before.get(name, value)
        self.tokens[side] = self.tokens.get(side, 0) + tokens

    def results(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for side, spent in self.cpu.items():
            per_k = 1000 / max(1, self.tokens[side])
            row = {name: round(seconds * 1000 * per_k, 2) for name, seconds in spent.items()}
            row["total"] = round(sum(spent.values()) * 1000 * per_k, 2)
            out[side] = row
        return out


# -- phases -----------------------------------------------------------------------


def worker_command(*backend: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "turnlog.cli",
        "worker",
        "--listen",
        "127.0.0.1:0",
        *backend,
    ]


def start_worker(backend: list[str], env: dict[str, str], log: Path) -> tuple[Any, int]:
    """Starts a worker on a port of its own choosing; returns the process and the port."""
    proc = start_process(worker_command(*backend), log, env)
    return proc, wait_for_worker_port(proc, log)


#: The line `turnlog serve` prints with the token of its local signing key, before
#: its "serving" line (the same pattern as tests/worker_processes.py's SERVE_TOKEN).
SERVE_TOKEN = re.compile(r"turnlog token for tenant '[^']+' \([^)]*\): (\S+)")


@dataclass
class ServiceProcess:
    """A running `turnlog serve`: its process, address, log, and the token its calls carry."""

    proc: Any
    target: str
    log: Path
    token: str | None

    def channel(self) -> grpc.aio.Channel:
        """A channel whose every call carries the token (none with `--insecure`)."""
        return credentialed_channel(self.target, self.token)


def start_service(
    name: str,
    worker: str,
    dsn: str,
    env: dict[str, str],
    tmp: Path,
    *,
    metrics: bool = False,
    insecure: bool = False,
) -> ServiceProcess:
    """Starts `turnlog serve`, logging to `tmp/<name>.log`, with `tmp/<name>-data` as its
    data folder (TURNLOG_DATA_DIR: the local signing key of the token it prints).

    Authentication is on, with that printed token, unless `insecure`. With
    `metrics`, a metrics port of its own choosing (`service_metrics_port` reads it).
    """
    target = f"127.0.0.1:{free_port()}"
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "turnlog.cli", "serve", "--listen", target,
           "--worker", worker]  # fmt: skip
    if metrics:
        cmd += ["--metrics-listen", "127.0.0.1:0"]
    if insecure:
        cmd.append("--insecure")
    proc = start_process(cmd, log, {**env, "TURNLOG_DATABASE_URL": dsn,
                                    "TURNLOG_DATA_DIR": str(tmp / f"{name}-data")})  # fmt: skip
    wait_for(lambda: "turnlog serving gRPC" in log.read_text(errors="replace"), proc, log)
    token = None
    if not insecure:
        found = SERVE_TOKEN.findall(log.read_text(errors="replace"))
        if not found:
            stop_process(proc)
            raise RuntimeError(f"turnlog serve printed no token:\n{log.read_text()[-3000:]}")
        token = str(found[-1])
    return ServiceProcess(proc=proc, target=target, log=log, token=token)


def service_metrics_port(service: ServiceProcess) -> int:
    """The port a service started with `metrics=True` serves its metrics on."""
    port: int = wait_for_logged_port(service.proc, service.log, r"turnlog metrics on port (\d+)")
    return port


def print_log_tails(folder: Path, pattern: str) -> None:
    for log in sorted(folder.glob(pattern)):
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"--- {log.name}:", *tail, sep="\n", file=sys.stderr)


def latency_row(side: str, profile: str, c: int, runs: list[Run]) -> dict[str, Any]:
    lat = [x for r in runs for x in r.latencies]
    return {
        "side": side,
        "profile": profile,
        "concurrency": c,
        "turns": len(lat),
        "turns_per_s": round(statistics.median(len(r.latencies) / r.wall_s for r in runs), 1),
        "runs_turns_per_s": [round(len(r.latencies) / r.wall_s, 1) for r in runs],
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
    }


async def phase_scripted(
    args: argparse.Namespace, dsn: str, env: dict[str, str], tmp: Path
) -> dict[str, Any]:
    script = tmp / "script.json"
    script.write_text(json.dumps(SCRIPT))
    worker, wport = start_worker(["--backend", "scripted", "--script", str(script)], env,
                                 tmp / "scripted-worker.log")  # fmt: skip
    service = None
    rows: list[dict[str, Any]] = []
    added: list[dict[str, Any]] = []
    commits: list[dict[str, Any]] = []
    try:
        service = start_service("scripted-service", f"127.0.0.1:{wport}", dsn, env, tmp)
        async with (
            EngineClient([f"127.0.0.1:{wport}"], load_poll_interval_s=0) as client,
            service.channel() as channel,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as stats,
        ):
            direct = Direct(client, None)
            svc = Service(sgrpc.ConversationServiceStub(channel), None)
            plan = [(p, c, max(c, math.ceil(args.min_turns / args.turns))) for p in args.profiles
                    for c in args.levels]  # fmt: skip
            # Every conversation is created before the first counter reading.
            prepared: dict[tuple[str, int], list[list[str]]] = {}
            for p, c, n in plan:
                prepared[p, c] = []
                for size in [c] + [n] * args.reps:
                    await svc.prepare(size, p)
                    prepared[p, c].append(svc.names)
            counters = Counters(stats, args.stats_settle_s)
            await counters.detect()
            idle_start = await counters.read()
            before = await counters.read()
            idle_xacts_per_s = max(0.0, (before["xact_commit"] - idle_start["xact_commit"] - 1)
                                   / ((before["at"] - idle_start["at"]) / 1000))  # fmt: skip
            for p, c, n in plan:
                # Warm-up round at this level: not timed, but its turns are counted.
                direct.reset(c)
                await drive(direct.send, c, 1, c)
                svc.names = prepared[p, c][0]
                await drive(svc.send, c, 1, c)
                d_runs: list[Run] = []
                s_runs: list[Run] = []
                # The sides take turns going first.
                for rep in range(args.reps):
                    for side in rotated(["direct", "service"], rep):
                        if side == "direct":
                            direct.reset(n)
                            d_runs.append(await drive(direct.send, n, args.turns, c))
                        else:
                            svc.names = prepared[p, c][rep + 1]
                            s_runs.append(await drive(svc.send, n, args.turns, c))
                after = await counters.read()
                d, s = latency_row("direct", p, c, d_runs), latency_row("service", p, c, s_runs)
                rows += [d, s]
                added.append({
                    "profile": p, "concurrency": c,
                    "added_p50_ms": round(s["p50_ms"] - d["p50_ms"], 2),
                    "added_p99_ms": round(s["p99_ms"] - d["p99_ms"], 2),
                    "turns_per_s_ratio": paired_ratio(
                        [len(r.latencies) / r.wall_s for r in s_runs],
                        [len(r.latencies) / r.wall_s for r in d_runs],
                    ),
                })  # fmt: skip
                commits.append(
                    {"profile": p, "concurrency": c}
                    | per_turn(before, after, c + args.reps * n * args.turns, idle_xacts_per_s)
                )
                before = after
                print(f"  scripted {p:<8} c={c:<3} direct {d['turns_per_s']:>8} t/s,"
                      f" service {s['turns_per_s']:>8} t/s", file=sys.stderr)  # fmt: skip
    finally:
        if service is not None:
            stop_process(service.proc)
        stop_process(worker)
    return {"rows": rows, "added": added, "commits": commits,
            "idle_xacts_per_s": round(idle_xacts_per_s, 3)}  # fmt: skip


#: The authentication phase's sides, in their first repetition's order: the same
#: service with authentication on (the local token) and off (`--insecure`).
AUTH_SIDES = ["auth", "noauth"]
#: Its kinds of turn: a `SendMessage` (one reply) or a `StreamTurn` (every event read).
AUTH_MODES = {"unary": "SendMessage", "stream": "StreamTurn"}
#: Its guardrail profile, the same on both sides.
AUTH_PROFILE = "none"


def auth_ratio_names(mode: str, c: int) -> tuple[str, str]:
    """The names in `ratios` of a mode and concurrency's turns/s and p99 ratios."""
    return f"auth_vs_noauth_turns_{mode}_{c}", f"auth_vs_noauth_p99_{mode}_{c}"


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system, all threads) process `pid` has used so far.

    On Linux to the nanosecond, from the process's CPU-time clock (the id
    clock_getcpuclockid(3) gives: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED));
    psutil's figure, in 10 ms clock ticks, reads zero for a short run.
    Elsewhere, psutil's.
    """
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)


async def answer_without_token(service: ServiceProcess) -> str:
    """What `service` answers a call that carries no token: "OK" or the status code's name."""
    async with credentialed_channel(service.target, None) as channel:
        try:
            await sgrpc.ConversationServiceStub(channel).ListConversations(
                spb.ListConversationsRequest(page_size=1)
            )
        except grpc.aio.AioRpcError as e:
            return str(e.code().name)
    return "OK"


async def phase_auth(
    args: argparse.Namespace, dsn: str, env: dict[str, str], tmp: Path
) -> dict[str, Any]:
    """Authentication on against off: rows per side, mode and level, and paired ratios.

    Two services on one scripted worker and one database, one verifying the
    token every call carries, the other `--insecure`; both pass the same
    admission (scope, tenant rate limit, a stream's expiry watch), so the
    difference is the credential's verification. Each run sends
    new conversations' turns, created just before it, outside the timing.
    """
    script = tmp / "auth-script.json"
    script.write_text(json.dumps(SCRIPT))
    worker, wport = start_worker(["--backend", "scripted", "--script", str(script)], env,
                                 tmp / "auth-worker.log")  # fmt: skip
    services: dict[str, ServiceProcess] = {}
    rows: list[dict[str, Any]] = []
    compared: list[dict[str, Any]] = []
    try:
        # One after the other: the first migrates an empty database.
        for side in AUTH_SIDES:
            services[side] = start_service(f"auth-{side}-service", f"127.0.0.1:{wport}", dsn,
                                           env, tmp, insecure=side == "noauth")  # fmt: skip
        # The comparison is only one if the sides differ: a call with no token is
        # refused by one, answered by the other.
        without_token = {side: await answer_without_token(s) for side, s in services.items()}
        if without_token != {"auth": "UNAUTHENTICATED", "noauth": "OK"}:
            raise RuntimeError(f"a call without a token: {without_token}")
        async with contextlib.AsyncExitStack() as stack:
            clients: dict[str, Service] = {}
            for side, service in services.items():
                channel = await stack.enter_async_context(service.channel())
                clients[side] = Service(sgrpc.ConversationServiceStub(channel), None)

            async def run_side(side: str, mode: str, conversations: int, turns: int,
                               c: int) -> tuple[Run, dict[str, float]]:  # fmt: skip
                """One run of `side`, and the CPU seconds spent in it by its service and by
                this process, the client (whose interceptors add the token to every call
                of the auth side)."""
                svc = clients[side]
                await svc.prepare(conversations, AUTH_PROFILE)
                send = svc.send_stream if mode == "stream" else svc.send
                pids = {"serve": services[side].proc.pid, "bench": os.getpid()}
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                run = await drive(send, conversations, turns, c)
                return run, {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}

            for mode in args.auth_modes:
                for c in args.auth_levels:
                    n = max(c, math.ceil(args.auth_min_turns / args.turns))
                    for side in AUTH_SIDES:  # a warm-up round, not measured
                        await run_side(side, mode, c, 1, c)
                    runs: dict[str, list[Run]] = {side: [] for side in AUTH_SIDES}
                    #: Per side, per run: CPU seconds per turn of "serve" and "bench".
                    cpu: dict[str, list[dict[str, float]]] = {side: [] for side in AUTH_SIDES}
                    for rep in range(args.auth_reps):
                        for side in rotated(AUTH_SIDES, rep):
                            run, spent = await run_side(side, mode, n, args.turns, c)
                            runs[side].append(run)
                            cpu[side].append({k: v / len(run.latencies)
                                              for k, v in spent.items()})  # fmt: skip
                    for side, side_runs in runs.items():
                        row = {"side": side, "mode": mode}
                        row |= latency_row(side, AUTH_PROFILE, c, side_runs)
                        row["runs_p99_ms"] = [round(percentile(r.latencies, 99) * 1000, 2)
                                              for r in side_runs]  # fmt: skip
                        for name in ("serve", "bench"):
                            row[f"{name}_cpu_ms_per_turn"] = round(
                                statistics.median(x[name] for x in cpu[side]) * 1000, 3)  # fmt: skip
                        rows.append(row)
                    auth, noauth = runs["auth"], runs["noauth"]
                    compared.append({
                        "mode": mode, "concurrency": c,
                        "turns_per_s_ratio": paired_ratio(
                            [len(r.latencies) / r.wall_s for r in auth],
                            [len(r.latencies) / r.wall_s for r in noauth]),
                        # noauth's p99 over auth's: above 1, auth is faster (as for turns/s).
                        "p99_ratio": paired_ratio(
                            [percentile(r.latencies, 99) for r in noauth],
                            [percentile(r.latencies, 99) for r in auth]),
                        # CPU per turn, noauth's over auth's: above 1, auth is cheaper.
                        **{f"{name}_cpu_ratio": paired_ratio(
                            [x[name] for x in cpu["noauth"]], [x[name] for x in cpu["auth"]])
                           for name in ("serve", "bench")},
                    })  # fmt: skip
                    a, b = rows[-2], rows[-1]
                    print(f"  auth {mode:<6} c={c:<3} auth {a['turns_per_s']:>8} t/s,"
                          f" noauth {b['turns_per_s']:>8} t/s", file=sys.stderr)  # fmt: skip
    except BaseException:
        print_log_tails(tmp, "auth-*.log")
        raise
    finally:
        for service in services.values():
            stop_process(service.proc)
        stop_process(worker)
    return {"profile": AUTH_PROFILE, "without_token": without_token, "rows": rows,
            "compared": compared}  # fmt: skip


#: The vLLM phase's sides in their first repetition's order (service sides per profile).
VLLM_SIDES = [
    "vllm_http_stream", "worker_direct_stream", "service_stream",
    "vllm_http_unary", "worker_direct_unary", "service_unary",
]  # fmt: skip


def vllm_ratio_pairs(profiles: list[str], http: bool, c: int) -> dict[str, tuple[str, str]]:
    """Ratio name -> (numerator side, denominator side), at concurrency `c`."""
    pairs: dict[str, tuple[str, str]] = {}
    for mode in ("stream", "unary"):
        if http:
            pairs[f"vllm_{mode}_worker_direct_vs_vllm_http_{c}"] = (
                f"worker_direct_{mode}", f"vllm_http_{mode}")  # fmt: skip
        for p in profiles:
            suffix = "" if p == "none" else f"_{p}"
            if http:
                pairs[f"vllm_{mode}_service_vs_vllm_http_{c}{suffix}"] = (
                    f"service_{mode}_{p}", f"vllm_http_{mode}")  # fmt: skip
            pairs[f"vllm_{mode}_service_vs_worker_direct_{c}{suffix}"] = (
                f"service_{mode}_{p}", f"worker_direct_{mode}")  # fmt: skip
    for p in profiles:
        suffix = "" if p == "none" else f"_{p}"
        pairs[f"vllm_service_unary_vs_stream_{c}{suffix}"] = (
            f"service_unary_{p}", f"service_stream_{p}")  # fmt: skip
    return pairs


async def phase_vllm(
    args: argparse.Namespace, dsn: str, env: dict[str, str], tmp: Path
) -> dict[str, Any]:
    """Rows per side and concurrency, paired ratios, and the per-side stages and CPU."""
    import aiohttp

    http_on = args.worker is None
    procs: list[Any] = []
    rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, Any]] = {}
    stages: dict[str, ServiceStages] = {}
    try:
        roots = {"bench": os.getpid()}
        if args.pg_pid:
            roots["postgres"] = args.pg_pid
        worker_address = args.worker
        url, http, http_log = "", None, tmp / "vllm-http.log"
        if worker_address is None:
            model = args.model or build_model(tmp, env)
            hport = free_port()
            url = f"http://127.0.0.1:{hport}"
            http_cmd = [*http_command(model, hport), "--stream-interval", str(args.stream_interval)]
            http = start_process(http_cmd, http_log, env)
            procs.append(http)
            roots["vllm_http"] = http.pid
            engine = [
                "--model", model,
                "--max-model-len", str(ENGINE_SETTINGS["max_model_len"]),
                "--kv-cache-bytes", str(ENGINE_SETTINGS["kv_cache_bytes"]),
                "--block-size", str(ENGINE_SETTINGS["block_size"]),
                "--enforce-eager",
                "--stream-interval", str(args.worker_stream_interval or args.stream_interval),
            ]  # fmt: skip
            worker, wport = start_worker(engine, env, tmp / "vllm-worker.log")
            procs.append(worker)
            roots["worker"] = worker.pid
            worker_address = f"127.0.0.1:{wport}"
        service = start_service("vllm-service", worker_address, dsn, env, tmp, metrics=True)
        procs.append(service.proc)
        roots["serve"] = service.proc.pid
        cpu = CpuMeter(roots)
        metrics_url = f"http://127.0.0.1:{service_metrics_port(service)}/metrics"
        if http is not None:
            wait_for(lambda: http_ready(url), http, http_log)
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=HTTP_KEEPALIVE_S)
            ) as session,
            service.channel() as channel,
            EngineClient([worker_address], load_poll_interval_s=0) as client,
        ):
            stub = sgrpc.ConversationServiceStub(channel)
            services = {
                p: Service(stub, args.max_tokens, temperature=args.temperature,
                           seeded=args.temperature > 0)
                for p in args.vllm_profiles
            }  # fmt: skip
            # The sides that keep histories here, with their client-side stages.
            clients: dict[str, Direct | VllmHttp] = {
                "worker_direct_stream": Direct(client, args.max_tokens, args.temperature),
                "worker_direct_unary": Direct(client, args.max_tokens, args.temperature,
                                              held_interval_s=args.unary_delta_interval_s),
            }  # fmt: skip
            if http_on:
                clients["vllm_http_stream"] = VllmHttp(
                    session, url, args.max_tokens, args.temperature, stream=True)  # fmt: skip
                clients["vllm_http_unary"] = VllmHttp(
                    session, url, args.max_tokens, args.temperature, stream=False)  # fmt: skip
            order: list[str] = []
            for side in VLLM_SIDES:
                if side.startswith("service_"):
                    order += [f"{side}_{p}" for p in args.vllm_profiles]
                elif side in clients:
                    order.append(side)

            async def run_side(side: str, conversations: int, turns: int, c: int,
                               measured: bool) -> Run:  # fmt: skip
                """One run of `side`: `conversations` new conversations of `turns` turns."""
                if side in clients:
                    one = clients[side]
                    one.reset(conversations)
                    work = drive(one.send, conversations, turns, c)
                    return await (cpu.run(side, work) if measured else work)
                profile = side.split("_", 2)[2]
                svc = services[profile]
                send = svc.send_stream if side.startswith("service_stream_") else svc.send
                await svc.prepare(conversations, profile)
                if not measured:
                    return await drive(send, conversations, turns, c)
                scraped = await asyncio.to_thread(scrape_service, metrics_url)
                run = await cpu.run(side, drive(send, conversations, turns, c))
                stages.setdefault(side, ServiceStages()).add(
                    scraped, await asyncio.to_thread(scrape_service, metrics_url),
                    len(run.latencies),
                )  # fmt: skip
                return run

            for c in args.vllm_concurrency:
                n = 2 * c
                runs: dict[str, list[Run]] = {side: [] for side in order}
                for side in order:  # a warm-up round, not measured
                    await run_side(side, c, 1, c, measured=False)
                for one in clients.values():
                    one.stages.clear()
                for svc in services.values():
                    svc.stream_stages.clear()
                for rep in range(args.vllm_reps):
                    for side in rotated(order, rep):
                        runs[side].append(await run_side(side, n, args.vllm_turns, c, True))
                for side, side_runs in runs.items():
                    lat = [x for r in side_runs for x in r.latencies]
                    rows.append({
                        "side": side, "mode": "unary" if "_unary" in side else "stream",
                        "concurrency": c, "turns": len(lat),
                        "output_tokens": sum(r.tokens for r in side_runs),
                        "tokens_per_s": round(
                            statistics.median(r.tokens / r.wall_s for r in side_runs), 1),
                        "runs_tokens_per_s": [round(r.tokens / r.wall_s, 1) for r in side_runs],
                        "p50_ms": round(percentile(lat, 50) * 1000, 1),
                        "p99_ms": round(percentile(lat, 99) * 1000, 1),
                    })  # fmt: skip
                    print(f"  vllm {side:<22} c={c:<3} {rows[-1]['tokens_per_s']:>8} tok/s",
                          file=sys.stderr)  # fmt: skip
                for name, (a, b) in vllm_ratio_pairs(args.vllm_profiles, http_on, c).items():
                    ratios[name] = paired_ratio(
                        [r.tokens / r.wall_s for r in runs[a]],
                        [r.tokens / r.wall_s for r in runs[b]],
                    )
            client_stages = {side: one.stages.results() for side, one in clients.items()}
            for p, svc in services.items():
                client_stages[f"service_stream_{p}"] = svc.stream_stages.results()
    except BaseException:
        print_log_tails(tmp, "vllm-*.log")
        raise
    finally:
        for proc in reversed(procs):
            stop_process(proc)
    per_side = {side: s.results() for side, s in stages.items()}
    return {
        "rows": rows,
        "ratios": ratios,
        "vllm_service_stages": {side: r[0] for side, r in per_side.items()},
        "vllm_service_appends_per_turn": {side: r[1] for side, r in per_side.items()},
        "vllm_service_turns": {side: r[2] for side, r in per_side.items()},
        "vllm_client_stages": {side: v for side, v in client_stages.items() if v},
        "vllm_cpu_ms_per_1k_tokens": cpu.results(),
    }


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


# -- main -------------------------------------------------------------------------


async def run_all(
    args: argparse.Namespace, dsn: str, env: dict[str, str]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The results of the phases that run, and every paired ratio."""
    out: dict[str, Any] = {}
    ratios: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="turnlog-bench-turns-") as tmp_name:
        tmp = Path(tmp_name)
        if args.levels:
            out["scripted"] = scripted = await phase_scripted(args, dsn, env, tmp)
            for a in scripted["added"]:
                name = f"service_vs_direct_turns_{a['profile']}_{a['concurrency']}"
                ratios[name] = a["turns_per_s_ratio"]
        if args.auth_levels:
            out["auth"] = auth = await phase_auth(args, dsn, env, tmp)
            for one in auth["compared"]:
                turns, p99 = auth_ratio_names(one["mode"], one["concurrency"])
                ratios[turns], ratios[p99] = one["turns_per_s_ratio"], one["p99_ratio"]
        if args.vllm:
            vllm = await phase_vllm(args, dsn, env, tmp)
            out["vllm"] = vllm.pop("rows")
            ratios.update(vllm.pop("ratios"))
            out.update(vllm)
    return out, ratios


def print_cpu(results: dict[str, Any]) -> None:
    cpu: dict[str, dict[str, float]] = results.get("vllm_cpu_ms_per_1k_tokens") or {}
    if not cpu:
        return
    names = [*sorted({name for row in cpu.values() for name in row} - {"total"}), "total"]
    print("\nCPU ms per 1,000 output tokens, by process tree (measured runs of each side)")
    print(f"{'side':<22}" + "".join(f"{name:>11}" for name in names))
    for side, row in cpu.items():
        print(f"{side:<22}" + "".join(f"{row.get(name, 0.0):>11}" for name in names))


def print_service_stages(results: dict[str, Any]) -> None:
    stages: dict[str, dict[str, Any]] = results.get("vllm_service_stages") or {}
    if not any(stages.values()):
        print("\nservice stages: none recorded (no stage metrics in the service's scrapes)")
    for side, side_stages in stages.items():
        print(f"\n{side}: service stages, mean ms per turn (or per generation), over "
              f"{results['vllm_service_turns'][side]} measured turns")  # fmt: skip
        print(f"{'stage':<20} {'count':>7} {'mean ms':>9} {'per':<11} {'ms/turn':>9}")
        for stage, s in side_stages.items():
            print(f"{stage:<20} {s['count']:>7} "
                  f"{s['mean_ms'] if s['mean_ms'] is not None else '-':>9} {s['per']:<11} "
                  f"{s['ms_per_turn'] if s['ms_per_turn'] is not None else '-':>9}")  # fmt: skip
        appends = results["vllm_service_appends_per_turn"][side]
        print("turn appends per turn:", ", ".join(f"{k} {v}" for k, v in appends.items()))
    client: dict[str, dict[str, Any]] = results.get("vllm_client_stages") or {}
    if client:
        print("\nat the client, mean ms (first_token: request -> first text; generation: "
              "first text -> done)")  # fmt: skip
        for side, values in client.items():
            print(f"  {side:<22}", ", ".join(f"{k} {v['mean_ms']}" for k, v in values.items()))


def print_auth(auth: dict[str, Any]) -> None:
    print("\nAuthentication on (the local token) against off (--insecure), scripted worker, "
          f"profile {auth['profile']}: turns/s median of reps, latency over all turns; "
          + ", ".join(f"{mode} = {rpc}" for mode, rpc in AUTH_MODES.items()))  # fmt: skip
    print("CPU ms per turn (median of runs): the side's service; this process, the client")
    print(f"{'mode':<7} {'conc':>4} {'side':<7} {'turns':>6} {'turns/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'serve cpu':>10} {'bench cpu':>10}")  # fmt: skip
    for r in auth["rows"]:
        print(f"{r['mode']:<7} {r['concurrency']:>4} {r['side']:<7} {r['turns']:>6} "
              f"{r['turns_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} "
              f"{r['serve_cpu_ms_per_turn']:>10} {r['bench_cpu_ms_per_turn']:>10}")  # fmt: skip
    print("\nauth vs noauth, paired per repetition (above 1: auth faster or cheaper): turns/s "
          "auth/noauth; p99 (each run's) and CPU per turn noauth/auth")  # fmt: skip
    for one in auth["compared"]:
        print(f"{one['mode']:<7} {one['concurrency']:>4}")
        for what in ("turns_per_s", "p99", "serve_cpu", "bench_cpu"):
            print(f"    {what:<12} {format_paired(one[f'{what}_ratio'])}")


def print_ratios(ratios: dict[str, dict[str, Any]]) -> None:
    print("\npaired ratios: median (min-max) of the per-repetition ratios")
    for name, value in ratios.items():
        print(f"  {name:<44} {format_paired(value)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="use this (migrated or empty) database, not an embedded one")
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 16, 64],
                        help="concurrent conversations, scripted worker (none: skip)")  # fmt: skip
    parser.add_argument("--profiles", nargs="+", default=["none", "default"],
                        help="guardrail profiles for the scripted runs")  # fmt: skip
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--min-turns", type=int, default=160,
                        help="at least this many turns per run (more conversations)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=3, help="repetitions per level")
    parser.add_argument("--stats-settle-s", type=float, default=11.0,
                        help="idle seconds before reading counters (backends flush <= 10 s)")  # fmt: skip
    parser.add_argument("--auth-levels", type=int, nargs="*", default=[16, 64],
                        help="concurrent conversations of the authentication on/off "
                        "comparison, scripted worker (none: skip)")  # fmt: skip
    parser.add_argument("--auth-modes", nargs="+", choices=list(AUTH_MODES),
                        default=list(AUTH_MODES),
                        help="its turns: unary (SendMessage), stream (StreamTurn)")  # fmt: skip
    parser.add_argument("--auth-reps", type=int, default=16,
                        help="its repetitions per mode and level (each side once, "
                        "rotating)")  # fmt: skip
    parser.add_argument("--auth-min-turns", type=int, default=240,
                        help="at least this many turns per run of it "
                        "(more conversations)")  # fmt: skip
    parser.add_argument("--auth-only", action="store_true",
                        help="run only the authentication comparison (no scripted levels, "
                        "no vLLM phase)")  # fmt: skip
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True,
                        help="run the vLLM comparison (default on)")  # fmt: skip
    parser.add_argument("--model", help="model folder (default: build the tiny model)")
    parser.add_argument("--vllm-concurrency", type=int, nargs="+", default=[16])
    parser.add_argument("--vllm-turns", type=int, default=2, help="turns per conversation")
    parser.add_argument("--vllm-reps", type=int, default=6,
                        help="repetitions (each side once per repetition, rotating)")  # fmt: skip
    parser.add_argument("--vllm-profiles", nargs="+", default=["none"],
                        help="guardrail profiles of the service side (ratio uses 'none')")  # fmt: skip
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="vLLM stream interval on both sides (tokens per delta)",
    )
    parser.add_argument(
        "--worker-stream-interval",
        type=int,
        help="the turnlog worker's stream interval, if other than --stream-interval",
    )
    parser.add_argument("--unary-delta-interval-s", type=float, default=UNARY_DELTA_INTERVAL_S,
                        help="worker_direct_unary's min_delta_interval: the service's for "
                        "SendMessage turns (ServiceDefaults.unwatched_delta_interval_s)")  # fmt: skip
    parser.add_argument("--worker", metavar="HOST:PORT",
                        help="vLLM phase: use this running vLLM worker; start no worker and "
                        "no vLLM HTTP server (no vllm_http sides)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny sizes unless given (see QUICK)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="vLLM runs (default greedy; >0: seeded per conversation)")  # fmt: skip
    parser.add_argument("--omp-threads", default="1")
    parser.add_argument("--json", type=Path, help="write results here")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if args.auth_only:
        args.levels, args.vllm = [], False

    env = {
        **os.environ,
        "OMP_NUM_THREADS": args.omp_threads,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    server: EmbeddedPostgres | None = None
    pg_dir: Path | None = None
    dsn = args.dsn
    args.pg_pid = None
    started = time.perf_counter()
    try:
        if dsn is None:
            pg_dir = Path(tempfile.mkdtemp(prefix="turnlog-bench-pg-"))
            server = EmbeddedPostgres(pg_dir / "pg")
            dsn = server.start()
            # The postmaster's pid, for CPU accounting of the whole server.
            args.pg_pid = int((pg_dir / "pg" / "postmaster.pid").read_text().split()[0])
        results, ratios = asyncio.run(run_all(args, dsn, env))
    finally:
        if server is not None:
            server.stop()
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)

    scripted = results.get("scripted")
    vllm_rows = results.get("vllm") or []
    settings = {
        **ENGINE_SETTINGS,
        "OMP_NUM_THREADS": args.omp_threads,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "levels": args.levels,
        "turns_per_conversation": args.turns,
        "min_turns": args.min_turns,
        "reps": args.reps,
        "scripted_reply_tokens": len(SCRIPT["default"]["text"].encode()),  # type: ignore[index]
        "auth_levels": args.auth_levels,
        "auth_modes": args.auth_modes,
        "auth_reps": args.auth_reps,
        "auth_min_turns": args.auth_min_turns,
        "auth_profile": AUTH_PROFILE,
        "vllm_concurrency": args.vllm_concurrency,
        "vllm_turns": args.vllm_turns,
        "vllm_reps": args.vllm_reps,
        "vllm_profiles": args.vllm_profiles,
        "vllm_worker": "--worker (already running)" if args.worker else "started here",
        "vllm_http": args.worker is None,
        "unary_delta_interval_s": args.unary_delta_interval_s,
        "ratios": "paired: per repetition, then median/min/max over repetitions",
        "quick": args.quick,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "database": "embedded PostgreSQL" if args.dsn is None else "--dsn",
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print("settings:", json.dumps(settings))
    if scripted:
        print("\nScripted worker (instant replies): turns/s median of reps, latency over all turns")
        print(f"{'profile':<8} {'conc':>4} {'side':<8} {'turns':>6} {'turns/s':>9} "
              f"{'p50 ms':>8} {'p99 ms':>8}")  # fmt: skip
        for r in scripted["rows"]:
            print(f"{r['profile']:<8} {r['concurrency']:>4} {r['side']:<8} {r['turns']:>6} "
                  f"{r['turns_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8}")  # fmt: skip
        print("\nAdded by the service and the log (service - direct)")
        print(f"{'profile':<8} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8}  turns/s ratio (paired)")
        for a in scripted["added"]:
            print(f"{a['profile']:<8} {a['concurrency']:>4} {a['added_p50_ms']:>8} "
                  f"{a['added_p99_ms']:>8}  {format_paired(a['turns_per_s_ratio'])}")  # fmt: skip
        print("\nDatabase work per turn (no tools); service transactions while idle: "
              f"{scripted['idle_xacts_per_s']}/s, subtracted in 'net'")  # fmt: skip
        print(f"{'profile':<8} {'conc':>4} {'turns':>6} {'xact_commit':>12} {'net':>6} "
              f"{'write_xacts':>12} "
              f"{'appends':>8} {'other_w':>8} {'wal_fsyncs':>11} {'wal_bytes':>10} "
              f"{'rollbacks':>10}")  # fmt: skip
        for m in scripted["commits"]:
            print(f"{m['profile']:<8} {m['concurrency']:>4} {m['turns']:>6} "
                  f"{m['xact_commit_per_turn']:>12} {m['xact_commit_net_per_turn']:>6} "
                  f"{m['write_xacts_per_turn']:>12} "
                  f"{m['append_xacts_per_turn']:>8} {m['other_write_xacts_per_turn']:>8} "
                  f"{m['wal_fsyncs_per_turn'] or '-':>11} {m['wal_bytes_per_turn']:>10} "
                  f"{m['xact_rollback_per_turn']:>10}")  # fmt: skip
    if results.get("auth"):
        print_auth(results["auth"])
    if vllm_rows:
        print("\nvLLM CPU worker, tiny model: output tokens/s (usage), median of reps")
        print(f"{'side':<22} {'conc':>4} {'turns':>6} {'tokens':>7} {'tokens/s':>9} "
              f"{'p50 ms':>8} {'p99 ms':>8}  runs")  # fmt: skip
        for r in vllm_rows:
            print(f"{r['side']:<22} {r['concurrency']:>4} {r['turns']:>6} {r['output_tokens']:>7} "
                  f"{r['tokens_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8}  "
                  f"{r['runs_tokens_per_s']}")  # fmt: skip
        print_service_stages(results)
        print_cpu(results)
    print_ratios(ratios)
    print("\nratios (medians):", json.dumps({k: v["median"] for k, v in ratios.items()}))
    if args.json:
        args.json.write_text(
            json.dumps({"settings": settings, "results": results, "ratios": ratios}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
