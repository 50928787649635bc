"""Long conversations: prompt size, time to first token and the cost of deciding the window, by turn.

One conversation of `--turns` turns (default 200) on a vLLM worker with a
1,024-token context, under the `truncate` policy, twice over the same
messages and seeded sampling: once with the stepped window (the service
default, `context_keep_fraction` 0.6) and once with a window that drops just
enough each turn (keep fraction 1.0: once full, it moves every turn). For
turns 1, 10, 50 and 200 it prints the prompt's tokens, the time to the first
streamed text and the time the service spent deciding the window, each beside
turn 1 of the same run (the baseline), and for each side the prefix-cache hit
rate (cached prompt tokens / prompt tokens, from vLLM's own usage counts)
over the turns after the window first moved.

Everything is real and on loopback: PostgreSQL (embedded unless --dsn), the
conversation application in this process, the worker as its own process
(started on the tiny model unless --worker names a running one).

    python bench/context.py [--quick] [--turns N] [--worker HOST:PORT] [--dsn URL] [--json PATH]

`--quick` runs 12 turns (checkpoints 1 and 10): a smoke run, not figures.
A third run uses the `compact` policy (stepped window, summaries of the
turns it leaves out): same checkpoints; a compacting turn's time to first
token includes its summary's generation, and the medians of compacting and
other turns are printed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from turnlog.conversation import context
from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    ServiceDefaults,
    TurnInput,
    TurnOptions,
)
from turnlog.conversation.projection import TextPiece
from turnlog.domain import events as ev
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.migrations import migrate
from turnlog.storage.postgres import PostgresEventStore
from turnlog.worker.client import EngineClient

CHECKPOINTS = (1, 10, 50, 200)
SYSTEM = "You are a patient assistant. Keep every answer on topic."
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class DecideTimer:
    """Times every `context.decide_window` call (the turn module calls it through the module)."""

    def __init__(self) -> None:
        self.last_s = 0.0
        self._original = context.decide_window

    def install(self) -> None:
        original = self._original

        async def timed(*args: Any, **kwargs: Any) -> ev.ContextWindow:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.last_s = time.perf_counter() - started

        context.decide_window = timed  # type: ignore[assignment]


async def one_side(
    store: PostgresEventStore,
    engine: EngineClient,
    *,
    side: str,
    keep_fraction: float,
    turns: int,
    max_tokens: int,
    timer: DecideTimer,
    policy: ev.ContextPolicy = ev.ContextPolicy.TRUNCATE,
) -> list[dict[str, Any]]:
    app = ConversationApplication(
        store,
        engine,
        defaults=ServiceDefaults(context_keep_fraction=keep_fraction),
        instance=f"bench-{side}",
    )
    rows: list[dict[str, Any]] = []
    try:
        state = await app.create(
            CreateConversation(
                request_id=f"context-{side}",
                system_prompt=SYSTEM,
                defaults=TurnOptions(
                    sampling=ev.SamplingParams(temperature=0.8, seed=7, max_tokens=max_tokens),
                    context_policy=policy,
                ),
            )
        )
        cid = state.conversation_id
        for n in range(1, turns + 1):
            started = time.perf_counter()
            turn_id = await app.start_turn(
                TurnInput(
                    conversation_id=cid,
                    request_id=f"t{n}",
                    content=f"Turn {n}: tell me more about the history of the sea.",
                ),
                streamed=True,
            )
            first = 0.0
            async for update in app.watch(cid, turn_id):
                if not first and isinstance(update.payload, TextPiece):
                    first = time.perf_counter() - started
            state = await app.load(cid)
            turn = state.turn(turn_id)
            window = state.context_window
            assert turn is not None
            assert window is not None
            if turn.status.value != "completed":
                raise SystemExit(
                    f"{side}: turn {n} ended {turn.status.value}: {turn.outcome_reason}"
                )
            rows.append(
                {
                    "turn": n,
                    "ttft_ms": first * 1000,
                    "decide_ms": timer.last_s * 1000,
                    "prompt_tokens": window.prompt_tokens,
                    "engine_prompt_tokens": turn.usage.prompt_tokens,
                    "cached_prompt_tokens": turn.usage.cached_prompt_tokens,
                    "left_out_turns": window.left_out_turns,
                    "first_version": window.first_version,
                    # This turn summarized old turns first (its TTFT includes the summary).
                    "compacted": bool(state.compactions)
                    and state.compactions[-1].turn_id == turn_id,
                    "summary_in_prompt": bool(window.compaction_id),
                }
            )
    finally:
        await app.shutdown()
    return rows


def hit_rate(rows: list[dict[str, Any]]) -> tuple[float, int]:
    """Cached / prompt tokens over the turns after the window first moved; and how often it moved."""
    moved = [i for i, r in enumerate(rows) if r["left_out_turns"] > 0]
    tail = rows[moved[0] :] if moved else rows
    moves = sum(1 for a, b in itertools.pairwise(rows) if a["first_version"] != b["first_version"])
    prompt = sum(r["engine_prompt_tokens"] for r in tail)
    return (sum(r["cached_prompt_tokens"] for r in tail) / prompt if prompt else 0.0), moves


def start_worker(model: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [
        sys.executable, "-m", "turnlog.cli", "worker", "--model", str(model),
        "--listen", "127.0.0.1:0", "--max-model-len", "1024",
        "--kv-cache-bytes", str(64 * 1024 * 1024), "--block-size", "32", "--enforce-eager",
    ]  # fmt: skip
    out = log.open("wb")
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **WORKER_ENV}
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"serving on port (\d+)", log.read_text(errors="replace"))
        if found:
            return proc, f"127.0.0.1:{found.group(1)}"
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the worker did not start:\n" + log.read_text(errors="replace")[-3000:])


async def run(args: argparse.Namespace, dsn: str, target: str) -> dict[str, Any]:
    await migrate(dsn)
    store = await PostgresEventStore.open(dsn, max_size=8)
    timer = DecideTimer()
    timer.install()
    sides: dict[str, list[dict[str, Any]]] = {}
    try:
        async with EngineClient([target]) as engine:
            for side, keep, policy in (
                ("stepped", 0.6, ev.ContextPolicy.TRUNCATE),
                ("one_per_turn", 1.0, ev.ContextPolicy.TRUNCATE),
                ("compact", 0.6, ev.ContextPolicy.COMPACT),
            ):
                sides[side] = await one_side(
                    store, engine, side=side, keep_fraction=keep, turns=args.turns,
                    max_tokens=args.max_tokens, timer=timer, policy=policy,
                )  # fmt: skip
    finally:
        await store.close()
    return {"sides": sides}


def report(results: dict[str, Any], turns: int) -> dict[str, Any]:
    checkpoints = [c for c in CHECKPOINTS if c <= turns]
    figures: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    for side, rows in results["sides"].items():
        base = rows[0]
        policy = "compact" if side == "compact" else "truncate"
        print(f"\n{side} ({policy}, keep fraction {'1.0' if side == 'one_per_turn' else '0.6'})")
        print(
            f"{'turn':>5} {'prompt tok':>10} {'vs t1':>6} {'TTFT ms':>8} {'vs t1':>6} {'TTFT med5':>9} {'decide ms':>9} {'left out':>8}"
        )
        for c in checkpoints:
            r = rows[c - 1]
            p_ratio = r["prompt_tokens"] / base["prompt_tokens"]
            t_ratio = r["ttft_ms"] / base["ttft_ms"] if base["ttft_ms"] else 0.0
            # One turn is one sample: also the median of the five turns up to it.
            r["ttft_med5_ms"] = statistics.median(x["ttft_ms"] for x in rows[max(0, c - 5) : c])
            print(
                f"{c:>5} {r['prompt_tokens']:>10} {p_ratio:>6.2f} {r['ttft_ms']:>8.1f} "
                f"{t_ratio:>6.2f} {r['ttft_med5_ms']:>9.1f} {r['decide_ms']:>9.2f} {r['left_out_turns']:>8}"
            )
            figures[f"{side}_turn_{c}"] = {
                k: r[k] for k in ("prompt_tokens", "ttft_ms", "decide_ms", "left_out_turns")
            }
            ratios[f"{side}_prompt_tokens_turn_{c}_vs_turn_1"] = p_ratio
            ratios[f"{side}_ttft_turn_{c}_vs_turn_1"] = t_ratio
        rate, moves = hit_rate(rows)
        decide = [r["decide_ms"] for r in rows]
        print(f"prefix-cache hit rate after the first move: {rate:.3f}; window moves: {moves}; "
              f"decide ms median {statistics.median(decide):.2f}")  # fmt: skip
        figures[f"{side}_prefix_cache_hit_rate"] = rate
        figures[f"{side}_window_moves"] = moves
        figures[f"{side}_decide_ms_median"] = statistics.median(decide)
        if side == "compact":
            compacting = [r["ttft_ms"] for r in rows if r["compacted"]]
            others = [r["ttft_ms"] for r in rows[1:] if not r["compacted"]]
            figures["compact_compactions"] = len(compacting)
            figures["compact_ttft_ms_median_compacting_turns"] = (
                statistics.median(compacting) if compacting else 0.0
            )
            figures["compact_ttft_ms_median_other_turns"] = (
                statistics.median(others) if others else 0.0
            )
            print(
                f"compactions: {len(compacting)}; TTFT median of compacting turns "
                f"{figures['compact_ttft_ms_median_compacting_turns']:.1f} ms, of the others "
                f"{figures['compact_ttft_ms_median_other_turns']:.1f} ms"
            )
    if "stepped" in results["sides"] and "one_per_turn" in results["sides"]:
        one = figures["one_per_turn_prefix_cache_hit_rate"]
        ratios["hit_rate_stepped_vs_one_per_turn"] = (
            figures["stepped_prefix_cache_hit_rate"] / one if one else float("inf")
        )
    print("ratios:", json.dumps(ratios, indent=None))
    return {"figures": figures, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="12 turns: a smoke run")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--worker", help="HOST:PORT of a running worker (1,024-token context)")
    parser.add_argument("--model", type=Path, help="model folder (default: build the tiny model)")
    parser.add_argument("--dsn", help="a database URL (default: an embedded PostgreSQL)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.turns = 12
    scratch = Path(tempfile.mkdtemp(prefix="turnlog-bench-context-"))
    server: EmbeddedPostgres | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        target = args.worker
        if target is None:
            model = args.model
            if model is None:
                model = scratch / "tiny"
                subprocess.run(
                    [sys.executable, "-m", "turnlog.cli", "dev", "tiny-model", str(model)],
                    check=True, capture_output=True, env={**os.environ, **WORKER_ENV},
                )  # fmt: skip
            worker, target = start_worker(model, scratch / "worker.log")
        dsn = args.dsn
        if dsn is None:
            server = EmbeddedPostgres(scratch / "pg")
            dsn = server.start()
        started = time.perf_counter()
        results = asyncio.run(run(args, dsn, target))
        out = report(results, args.turns)
        out["settings"] = {
            "turns": args.turns,
            "max_tokens": args.max_tokens,
            "max_context_tokens": 1024,
            "checkpoints": [c for c in CHECKPOINTS if c <= args.turns],
            "seconds": time.perf_counter() - started,
        }
        out["turns"] = results["sides"]
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
