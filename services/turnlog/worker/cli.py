"""CLI commands of the engine worker: `turnlog worker` and `turnlog dev tiny-model`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from turnlog.loopback import is_loopback_address
from turnlog.worker.backend import EngineBackend

if TYPE_CHECKING:
    import grpc


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def add_worker_commands(subparsers: Any) -> None:
    """Register `worker` and `dev tiny-model` on an argparse subparsers object.

    Each registered parser sets `func(args) -> int` as its default.
    """
    worker = subparsers.add_parser(
        "worker",
        help="run an engine worker (EngineService over gRPC)",
        description=(
            "Serve turnlog.engine.v1.EngineService. The vLLM backend needs --model; the "
            "scripted backend (tests and demos only) needs --backend scripted --script FILE."
        ),
    )
    worker.add_argument("--backend", choices=("vllm", "scripted"), default="vllm")
    worker.add_argument("--model", help="model folder or name (vLLM backend)")
    worker.add_argument("--script", type=Path, help="reply script (scripted backend only)")
    worker.add_argument("--listen", default="127.0.0.1:50061", help="host:port to bind")
    worker.add_argument(
        "--grace", type=float, default=30.0, help="seconds in-flight requests get on shutdown"
    )
    tls = worker.add_argument_group(
        "TLS",
        "Without --tls-cert the worker serves plaintext: only for loopback or a network "
        "that is already private. The files are read again when they change (docs/tls.md).",
    )
    tls.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="PEM certificate chain: serve TLS"
    )
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA bundle: require a client certificate signed by it (mTLS)",
    )
    vllm = worker.add_argument_group("vLLM engine options")
    vllm.add_argument("--dtype", default="auto")
    vllm.add_argument("--max-model-len", type=int, default=None)
    vllm.add_argument(
        "--kv-cache-bytes", type=int, default=None, help="KV cache size in bytes (default: vLLM's)"
    )
    vllm.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV blocks of shared prompt prefixes (default on)",
    )
    vllm.add_argument("--block-size", type=int, default=None)
    vllm.add_argument("--tensor-parallel-size", type=int, default=1)
    vllm.add_argument("--tool-call-parser", default=None, help="vLLM tool parser name, e.g. hermes")
    vllm.add_argument("--seed", type=int, default=0, help="engine seed")
    vllm.add_argument(
        "--enforce-eager",
        action="store_true",
        help="skip graph capture/compilation (faster start; use on CPU)",
    )
    vllm.add_argument(
        "--stream-interval",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="send a request's tokens every N tokens (the first at once; vLLM's stream "
        "interval): fewer, larger deltas cost the host less per token (default 1)",
    )
    vllm.add_argument(
        "--scheduler-stats",
        action="store_true",
        help="collect vLLM's per-step statistics, so that GetLoad reports waiting requests "
        "and KV cache usage (costs the front end CPU on every engine step)",
    )
    worker.set_defaults(func=_run_worker)

    dev = subparsers.add_parser("dev", help="developer tools")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    tiny = dev_sub.add_parser(
        "tiny-model", help="build a tiny random-weight Llama + tokenizer (no network)"
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_run_tiny_model)


def _check_worker_args(args: argparse.Namespace) -> str | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        return "--tls-cert and --tls-key go together"
    if args.tls_client_ca is not None and args.tls_cert is None:
        return "--tls-client-ca (mTLS) needs --tls-cert and --tls-key"
    if args.backend == "scripted":
        if args.model:
            return "--model serves a real model; the scripted backend takes only --script"
        if args.script is None:
            return "--backend scripted needs --script FILE"
    else:
        if args.script is not None:
            return "--script is for --backend scripted only; a model worker never runs a script"
        if not args.model:
            return "--model is required for the vLLM backend"
    return None


def _run_worker(args: argparse.Namespace) -> int:
    problem = _check_worker_args(args)
    if problem:
        raise SystemExit(f"turnlog worker: {problem}")
    logging.basicConfig(
        level=os.environ.get("TURNLOG_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from turnlog.worker.server import serve
    from turnlog.worker.spawn import exit_with_parent

    exit_with_parent()  # a worker that `turnlog serve --spawn-worker` started

    credentials = _server_credentials(args)
    if credentials is None and not is_loopback_address(args.listen):
        logging.getLogger("turnlog.worker").warning(
            "serving plaintext on %s: anyone who can reach it can generate; "
            "use --tls-cert, --tls-key and --tls-client-ca (docs/tls.md)",
            args.listen,
        )

    async def make_backend() -> EngineBackend:
        if args.backend == "scripted":
            from turnlog.worker.scripted import Script, ScriptedEngine

            return ScriptedEngine(Script.load(args.script))
        from turnlog.worker.vllm_engine import VllmEngine, VllmOptions

        return await VllmEngine.start(
            VllmOptions(
                model=args.model,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                kv_cache_bytes=args.kv_cache_bytes,
                enable_prefix_caching=args.prefix_caching,
                block_size=args.block_size,
                tensor_parallel_size=args.tensor_parallel_size,
                tool_call_parser=args.tool_call_parser,
                seed=args.seed,
                enforce_eager=args.enforce_eager,
                stream_interval=args.stream_interval,
                scheduler_stats=args.scheduler_stats,
            )
        )

    asyncio.run(
        serve(make_backend, listen=args.listen, grace_s=args.grace, credentials=credentials)
    )
    return 0


def _server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """The worker's TLS credentials from its flags, checked before the model loads."""
    if args.tls_cert is None:
        return None
    from turnlog.tls import TlsFiles, TlsFilesError, server_credentials

    files = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_client_ca)
    try:
        return server_credentials(files, require_client_cert=args.tls_client_ca is not None)
    except TlsFilesError as e:
        raise SystemExit(f"turnlog worker: {e}") from None


def _run_tiny_model(args: argparse.Namespace) -> int:
    from turnlog.worker.tiny_model import build_tiny_model

    path = build_tiny_model(args.dir, seed=args.seed)
    print(path)
    return 0
