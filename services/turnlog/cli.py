"""The `turnlog` command line: one entry point for every process.

    turnlog serve      the conversation service (embedded PostgreSQL by default)
    turnlog migrate    apply the event log's schema migrations and exit
    turnlog worker     an engine worker (vLLM, or the scripted test double)
    turnlog export     conversations from the event log as JSONL or ATIF files
    turnlog import     JSONL export files into the event log
    turnlog verify     conversations' hash chains and folds (in the log, or files)
    turnlog replay     a conversation's transcript from the log or a file; --regenerate
    turnlog token      a token signed by the local key (TURNLOG_DATA_DIR)
    turnlog api-key    new API keys and their entries for the keys file
    turnlog dev ...    developer tools (tiny local model)

Subcommands import their modules lazily, so `turnlog migrate` does not pay
for importing vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _add_service_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the conversation service",
        description="Run the conversation service. With no TURNLOG_DATABASE_URL it starts an "
        "embedded PostgreSQL server in TURNLOG_DATA_DIR (default ~/.local/share/turnlog).",
    )
    serve.add_argument(
        "--listen", help="host:port to bind (default $TURNLOG_LISTEN or 127.0.0.1:50051)"
    )
    serve.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="an engine worker address; repeat for several",
    )
    serve.add_argument(
        "--spawn-worker",
        action="append",
        default=[],
        metavar='"WORKER ARGS"',
        help="start `turnlog worker WORKER ARGS` as a child process on a free loopback port "
        'and use it, e.g. --spawn-worker "--model /models/tiny --enforce-eager"; repeatable',
    )
    serve.add_argument(
        "--metrics-listen",
        type=_listen_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: a free port); "
        "default $TURNLOG_METRICS_LISTEN, else no endpoint (docs/metrics.md)",
    )
    serve.add_argument(
        "--config",
        dest="config_file",
        type=Path,
        metavar="FILE",
        help="TOML configuration; its [auth] table says which credentials to accept "
        "(docs/security.md). Default $TURNLOG_CONFIG; with none, on loopback, the data "
        "folder's local signing key (a token is printed)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve WITHOUT authentication (every caller is tenant 'default'); needed to "
        "listen beyond loopback with no [auth] configured. Logged loudly",
    )
    serve.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="the port's certificate chain (PEM); reloaded when it changes (docs/tls.md)",
    )
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="CA bundle of client certificates: requires mTLS",
    )
    serve.add_argument(
        "--worker-tls-ca",
        type=Path,
        metavar="FILE",
        help="CA bundle of --worker certificates (TLS to workers)",
    )
    serve.add_argument(
        "--worker-tls-cert",
        type=Path,
        metavar="FILE",
        help="client certificate towards workers (mTLS)",
    )
    serve.add_argument("--worker-tls-key", type=Path, metavar="FILE", help="its private key")
    serve.set_defaults(func=_serve)

    migrate = subparsers.add_parser("migrate", help="apply the event log's migrations and exit")
    migrate.set_defaults(func=_migrate)


def _listen_address(text: str) -> str:
    """argparse type of HOST:PORT options: the text, once it parses."""
    from turnlog.metrics import parse_listen

    try:
        parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _serve(args: argparse.Namespace) -> int:
    from turnlog.api.server import run_server
    from turnlog.config import Settings

    settings = Settings.from_env()
    overrides = {
        name: getattr(args, name)
        for name in (
            "config_file",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "worker_tls_ca",
            "worker_tls_cert",
            "worker_tls_key",
        )
        if getattr(args, name, None) is not None
    }
    settings = dataclasses.replace(settings, insecure=args.insecure, **overrides)
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        return runner.run(
            run_server(
                settings,
                listen=args.listen,
                metrics_listen=args.metrics_listen,
                worker_addresses=args.worker,
                spawn_workers=args.spawn_worker,
            )
        )


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (less CPU per wake-up), else asyncio's."""
    if os.environ.get("TURNLOG_EVENT_LOOP", "uvloop") != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _migrate(args: argparse.Namespace) -> int:
    from turnlog.api.server import migrate_only
    from turnlog.config import Settings

    return asyncio.run(migrate_only(Settings.from_env()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnlog", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_service_commands(subparsers)
    from turnlog.worker.cli import add_worker_commands

    add_worker_commands(subparsers)
    from turnlog.history.cli import add_history_commands

    add_history_commands(subparsers)
    from turnlog.auth.cli import add_auth_commands

    add_auth_commands(subparsers)
    _add_chat_command(subparsers)
    return parser


def _add_chat_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`turnlog chat`: the client distribution's terminal chat, from the server's CLI.

    The chat lives in turnlog-client (`turnlog_client.chat`, also installed as
    `turnlog-chat`); this only delegates to it, adding one thing a client
    cannot do: with no token given, it mints one from this machine's local
    signing key (the data folder's, as `turnlog token` does), so the README's
    quick start is `make serve`, then `turnlog chat`.
    """
    chat = subparsers.add_parser(
        "chat", help="chat with the service in the terminal (turnlog-client's turnlog-chat)"
    )
    try:
        from turnlog_client.chat import add_arguments
    except ImportError:
        chat.set_defaults(func=_chat_missing)
        return
    add_arguments(chat)
    chat.set_defaults(func=_chat)


def _chat_missing(args: argparse.Namespace) -> int:
    print(
        "turnlog chat needs turnlog-client: pip install -e 'clients/python[chat]'",
        file=sys.stderr,
    )
    return 2


def _chat(args: argparse.Namespace) -> int:
    from turnlog_client.chat import chat

    if args.token is None:
        args.token = _local_token()
    return asyncio.run(chat(args))


def _local_token() -> str | None:
    """A token of the default tenant signed by this machine's local key, if it has one."""
    from turnlog.auth.local import AUTH_FOLDER, KEY_FILE, LocalSigningKey
    from turnlog.auth.principal import DEFAULT_TENANT, Scope
    from turnlog.config import Settings

    data_dir = Settings.from_env().data_dir
    if not (data_dir / AUTH_FOLDER / KEY_FILE).exists():
        return None  # never make a key here: that is `turnlog serve`'s job
    try:
        key = LocalSigningKey.load_or_create(data_dir)
    except (OSError, ValueError):
        return None
    scopes = (Scope.READ, Scope.WRITE, Scope.HISTORY)
    return key.mint_token(DEFAULT_TENANT, scopes, subject="turnlog-chat", ttl_s=12 * 3600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
