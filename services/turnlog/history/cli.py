"""CLI commands of the history features: `turnlog export`, `import`, `verify` and `replay`.

For operators working on the event log directly: the commands open the log
that `Settings.from_env()` names (TURNLOG_DATABASE_URL, or the embedded server
in TURNLOG_DATA_DIR) and need no running service. `verify --file` checks
export files with no database at all.

Exit codes: 0 when everything worked (and, for `verify`, is intact); 1 when
`verify` found something broken or `replay --regenerate` found a turn that
differs; 2 for usage errors and failures (a missing
conversation, a bad file, an unreachable database), each reported as one
line on stderr. Results go to stdout, one line each; progress bars go to
stderr, and only when stderr is a terminal.

Heavy modules (the store, the domain) are imported inside the commands, as
in `turnlog.cli`, so `turnlog --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Never

if TYPE_CHECKING:
    from tqdm import tqdm

    from turnlog.config import Settings
    from turnlog.history.audit import AuditReport
    from turnlog.history.service import HistoryService

#: What a conversation argument may start with: the API resource name form.
_NAME_PREFIX = "conversations/"
#: A progress bar appears only after this many seconds, so quick work shows none.
_PROGRESS_DELAY_S = 0.5


# -- shared helpers (also for `turnlog replay`) ----------------------------------------


@contextlib.asynccontextmanager
async def open_history(
    settings: Settings | None = None, *, max_connections: int = 4
) -> AsyncIterator[HistoryService]:
    """A `HistoryService` over the event log that `settings` (default: the environment) name.

    Opens (and migrates) the log with `turnlog.storage.open_event_store`: with
    no database URL that starts the embedded server, stopped again on exit.

    Raises:
        StorageUnavailableError: the database cannot be reached.
        IntegrityError: the database's schema is newer than this code, or edited.
    """
    from turnlog.config import Settings
    from turnlog.history.service import HistoryService
    from turnlog.storage.connect import open_event_store

    async with open_event_store(
        settings or Settings.from_env(), max_connections=max_connections
    ) as opened:
        yield HistoryService(opened.store, instance="turnlog-cli")


def progress_bar(
    *, total: float | None = None, desc: str | None = None, unit: str = "it", scale: bool = False
) -> tqdm[Never]:
    """A progress bar on stderr, shown only when stderr is a terminal; advance it with `update(n)`.

    Bars appear after half a second, so quick work prints nothing, and vanish
    when closed. Use as a context manager; print results with `emit` so that
    they do not tear a bar.

    Args:
        total: the expected amount of work, or None when unknown.
        desc: a short label in front of the bar.
        unit: what is counted ("conversation", "B", ...).
        scale: show the count with SI prefixes (for bytes).
    """
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        file=sys.stderr,
        disable=not _is_terminal(sys.stderr),
        leave=False,
        delay=_PROGRESS_DELAY_S,
        dynamic_ncols=True,
    )


def emit(line: str) -> None:
    """Prints one result line to stdout, clearing and redrawing any progress bar around it."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)


def quiet_logging() -> None:
    """Silences INFO logs (the embedded server's start and stop) unless -v asked for DEBUG.

    Call first in a command: its stdout is results and its stderr is errors.
    """
    root = logging.getLogger()
    if root.getEffectiveLevel() > logging.DEBUG:
        root.setLevel(logging.WARNING)


def complain(command: str, message: str) -> None:
    """Prints one error line, `turnlog COMMAND: MESSAGE`, to stderr (around any progress bar)."""
    from tqdm import tqdm

    tqdm.write(f"turnlog {command}: {message}", file=sys.stderr)


def conversation_id(argument: str) -> str:
    """A conversation id from a command-line argument (`ID` or `conversations/ID`)."""
    return argument.removeprefix(_NAME_PREFIX)


async def all_conversations(history: HistoryService) -> list[str]:
    """Every conversation in the log, by id (sorted).

    One query (`latest_events_of_types` over every known event type): one row
    per `conversation-` stream comes back, not every event. A stream holding
    only events of types this code does not know is not listed.
    """
    from turnlog.domain import codec
    from turnlog.eventlog import STREAM_PREFIX, conversation_of

    latest = await history.store.latest_events_of_types(
        codec.EVENT_CLASSES, stream_prefix=STREAM_PREFIX
    )
    return sorted(conversation_of(event.stream_id) for event in latest)


def read_input(path: str) -> bytes:
    """The bytes of a file, or of stdin for "-".

    Raises:
        OSError: the file cannot be read.
    """
    if path == "-":
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _exit_code(*, failed: bool, broken: bool = False) -> int:
    return 2 if failed else 1 if broken else 0


# -- registration ------------------------------------------------------------------


def add_history_commands(subparsers: Any) -> None:
    """Register `export`, `import`, `verify` and `replay` on an argparse subparsers object.

    Each registered parser sets `func(args) -> int` as its default.
    """
    export = subparsers.add_parser(
        "export",
        help="export conversations from the event log (JSONL or ATIF)",
        description=(
            "Export conversations from the event log. One conversation goes to stdout, or "
            "to the file -o names; several (or --all) go to the folder -o names, one file "
            "each: ID.jsonl, or ID.atif.json for --format atif."
        ),
    )
    export.add_argument(
        "conversations", nargs="*", metavar="CONVERSATION", help="conversation id(s)"
    )
    export.add_argument("--all", action="store_true", help="every conversation in the log")
    export.add_argument(
        "--format",
        choices=("jsonl", "atif"),
        default="jsonl",
        help="turnlog.events.jsonl (default; importable) or an ATIF trajectory",
    )
    export.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="a file (one conversation; default or '-': stdout) or a folder (several)",
    )
    export.add_argument(
        "--version",
        type=_positive,
        metavar="N",
        help="export versions 1..N only (one conversation)",
    )
    export.set_defaults(func=_export, usage_error=export.error)

    import_ = subparsers.add_parser(
        "import",
        help="import JSONL export files into the event log",
        description=(
            "Import JSONL export files (one conversation each, as `turnlog export` writes "
            "them). Each file is verified completely (hash chain and fold) before anything "
            "of it is written; events already stored are skipped. A rejected file is "
            "reported and the others are still imported."
        ),
    )
    import_.add_argument("files", nargs="+", metavar="FILE", help="export file(s); '-': stdin")
    import_.set_defaults(func=_import, usage_error=import_.error)

    verify = subparsers.add_parser(
        "verify",
        help="verify conversations' hash chains and folds (log or export files)",
        description=(
            "Verify conversations in the event log (hash chain and fold, as the "
            "VerifyConversation RPC), or export files with --file (no database needed). "
            "Prints one line per conversation. Exit code 0: all intact; 1: something is "
            "broken; 2: something could not be checked."
        ),
    )
    verify.add_argument(
        "conversations", nargs="*", metavar="CONVERSATION", help="conversation id(s)"
    )
    verify.add_argument("--all", action="store_true", help="every conversation in the log")
    verify.add_argument(
        "--file",
        dest="files",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATH",
        help="JSONL export file(s) to verify offline ('-': stdin); repeatable",
    )
    verify.set_defaults(func=_verify, usage_error=verify.error)

    replay = subparsers.add_parser(
        "replay",
        help="print a conversation's transcript rebuilt from the log, or regenerate its turns",
        description=(
            "Rebuild a conversation's transcript from the event log, or from a JSONL export "
            "file with no database (--file), and print it. --regenerate re-runs every "
            "finished turn with its recorded prompt and sampling (seed included) against "
            "the given worker and today's guardrails, and reports per turn what differs; "
            "the recorded conversation is never changed (each turn runs on an in-memory "
            "copy, or in a fork with --fork-prefix). Exit code 1 when a turn differs."
        ),
    )
    replay.add_argument(
        "conversation",
        nargs="?",
        metavar="CONVERSATION",
        help="conversation id (optional with --file holding one conversation)",
    )
    replay.add_argument("--file", metavar="PATH", help="a JSONL export file ('-': stdin)")
    replay.add_argument("--at", type=_positive, metavar="VERSION", help="stop at this version")
    replay.add_argument(
        "--regenerate", action="store_true", help="re-run every turn and report the differences"
    )
    replay.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="an engine worker to regenerate with; repeatable",
    )
    replay.add_argument(
        "--spawn-worker",
        metavar='"WORKER ARGS"',
        help="start `turnlog worker WORKER ARGS` as a child process and regenerate with it",
    )
    replay.add_argument(
        "--fork-prefix",
        metavar="PREFIX",
        help="write each regenerated turn to the fork PREFIX-<turn number> in the log",
    )
    replay.add_argument(
        "--json",
        metavar="PATH",
        help="also write the transcript (or with --regenerate, the report) as JSON here",
    )
    replay.set_defaults(func=_replay, usage_error=replay.error)


# -- export ----------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from turnlog import errors

    quiet_logging()
    names = [conversation_id(c) for c in args.conversations]
    if args.all and names:
        args.usage_error("give conversation ids or --all, not both")
    if not args.all and not names:
        args.usage_error("name at least one conversation, or --all")
    several = args.all or len(names) > 1
    if several and args.version is not None:
        args.usage_error("--version exports one conversation")
    if several and args.output in (None, "-"):
        args.usage_error("-o FOLDER is needed for several conversations or --all")
    # Where it goes: a folder (several), a file (one), or None for stdout.
    target: Path | None = None
    try:
        if several:
            target = Path(args.output)
            target.mkdir(parents=True, exist_ok=True)
        elif args.output not in (None, "-"):
            target = Path(args.output)
            if target.is_dir():
                target = target / _file_name(names[0], args.format)
            target.parent.mkdir(parents=True, exist_ok=True)
    except (errors.TurnlogError, OSError) as e:
        complain("export", _message(e))
        return 2
    return asyncio.run(_export_async(args, names, target, several=several))


async def _export_async(
    args: argparse.Namespace, names: list[str], target: Path | None, *, several: bool
) -> int:
    from turnlog import errors

    try:
        async with open_history() as history:
            if not several:
                chunks = _chunks(history, args, names[0])
                if target is None:
                    await _write_stdout(chunks)
                else:
                    size = await _write_file(chunks, target)
                    emit(f"{names[0]}: {target} ({size} bytes)")
                return 0
            assert target is not None
            if args.all:
                names = await all_conversations(history)
                if not names:
                    complain("export", "the log holds no conversations")
            failed = False
            with progress_bar(total=len(names), desc="export", unit="conversation") as bar:
                for name in names:
                    try:
                        path = target / _file_name(name, args.format)
                        size = await _write_file(_chunks(history, args, name), path)
                        emit(f"{name}: {path} ({size} bytes)")
                    except (errors.NotFoundError, errors.InvalidArgumentError, OSError) as e:
                        complain("export", f"{name}: {_message(e)}")
                        failed = True
                    bar.update(1)
            return _exit_code(failed=failed)
    except (errors.TurnlogError, OSError) as e:
        complain("export", _message(e))
        return 2


def _chunks(history: HistoryService, args: argparse.Namespace, name: str) -> AsyncIterator[bytes]:
    if args.format == "atif":
        return history.export_atif(name, version=args.version)
    return history.export_jsonl(name, version=args.version)


def _file_name(name: str, export_format: str) -> str:
    from turnlog import errors

    if not name or name.startswith(".") or Path(name).name != name or "\\" in name:
        raise errors.InvalidArgumentError(f"conversation id {name!r} is not usable as a file name")
    return f"{name}.atif.json" if export_format == "atif" else f"{name}.jsonl"


async def _write_file(chunks: AsyncIterator[bytes], path: Path) -> int:
    """Writes the chunks to `path` through a temporary file: no partial file is left behind."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    size = 0
    try:
        with (
            os.fdopen(descriptor, "wb") as out,
            progress_bar(desc=path.name, unit="B", scale=True) as bar,
        ):
            async for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return size


async def _write_stdout(chunks: AsyncIterator[bytes]) -> None:
    out = sys.stdout.buffer
    try:
        async for chunk in chunks:
            out.write(chunk)
        out.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's
        # final flush of stdout from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# -- import ----------------------------------------------------------------------


def _import(args: argparse.Namespace) -> int:
    quiet_logging()
    if args.files.count("-") > 1:
        args.usage_error("stdin ('-') can be read once")
    return asyncio.run(_import_async(args.files))


async def _import_async(files: Sequence[str]) -> int:
    from turnlog import errors

    failed = False
    try:
        async with open_history() as history:
            with progress_bar(total=len(files), desc="import", unit="file") as bar:
                for path in files:
                    try:
                        outcome = await history.import_jsonl(read_input(path))
                    except errors.StorageUnavailableError:
                        raise
                    except (errors.TurnlogError, OSError) as e:
                        complain("import", f"{path}: {_message(e, path=path)}")
                        failed = True
                    else:
                        emit(
                            f"{path}: conversation {outcome.state.conversation_id}: "
                            f"{outcome.written} events written, "
                            f"{outcome.already_present} already present"
                        )
                    bar.update(1)
    except (errors.TurnlogError, OSError) as e:
        complain("import", _message(e))
        return 2
    return _exit_code(failed=failed)


# -- verify ----------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    quiet_logging()
    names = [conversation_id(c) for c in args.conversations]
    if args.all and names:
        args.usage_error("give conversation ids or --all, not both")
    if not (args.all or names or args.files):
        args.usage_error("name conversations, --all, or --file PATH")
    if args.files.count("-") > 1:
        args.usage_error("stdin ('-') can be read once")
    failed = broken = False
    for path in args.files:
        file_failed, file_broken = _verify_file(path)
        failed |= file_failed
        broken |= file_broken
    if args.all or names:
        log_failed, log_broken = asyncio.run(_verify_log(names, every=args.all))
        failed |= log_failed
        broken |= log_broken
    return _exit_code(failed=failed, broken=broken)


def _verify_file(path: str) -> tuple[bool, bool]:
    """Verifies one export file offline; returns (could not check, something broken)."""
    from turnlog import errors
    from turnlog.eventlog import STREAM_PREFIX
    from turnlog.history import jsonl
    from turnlog.history.audit import audit_stream
    from turnlog.storage.hashchain import verify_chain
    from turnlog.storage.port import RecordedEvent

    try:
        lines = jsonl.split_lines(read_input(path))
        with progress_bar(total=len(lines), desc=Path(path).name, unit="line") as bar:
            events = jsonl.read_jsonl(_counted(lines, bar))
    except (errors.TurnlogError, OSError) as e:
        complain("verify", f"{path}: {_message(e, path=path)}")
        return True, False
    if not events:
        complain("verify", f"{path}: the file holds no events")
        return True, False
    streams: dict[str, list[RecordedEvent]] = {}
    for event in events:
        streams.setdefault(event.stream_id, []).append(event.to_recorded())
    broken = False
    for sid, recorded in streams.items():
        if sid.startswith(STREAM_PREFIX):
            # The same chain check as `jsonl.verify_exported`, plus the fold.
            report = audit_stream(sid, recorded)
            emit(f"{path}: {_describe(sid.removeprefix(STREAM_PREFIX), report)}")
            broken |= not report.ok
        else:
            chain = verify_chain(sid, recorded)
            if chain.ok:
                emit(f"{path}: stream {sid}: intact, version {chain.last_version}")
            else:
                emit(
                    f"{path}: stream {sid}: broken at version {chain.broken_at_version}: "
                    f"{chain.problem}"
                )
                broken = True
    return False, broken


def _counted(lines: Iterable[bytes], bar: tqdm[Never]) -> Iterator[bytes]:
    for line in lines:
        yield line
        bar.update(1)


async def _verify_log(names: list[str], *, every: bool) -> tuple[bool, bool]:
    """Verifies conversations in the log; returns (could not check, something broken)."""
    from turnlog import errors

    failed = broken = False
    try:
        async with open_history() as history:
            if every:
                names = await all_conversations(history)
                if not names:
                    complain("verify", "the log holds no conversations")
            with progress_bar(total=len(names), desc="verify", unit="conversation") as bar:
                for name in names:
                    try:
                        report = await history.verify(name)
                    except errors.NotFoundError as e:
                        complain("verify", _message(e))
                        failed = True
                    else:
                        emit(_describe(name, report))
                        broken |= not report.ok
                    bar.update(1)
    except (errors.TurnlogError, OSError) as e:
        complain("verify", _message(e))
        failed = True
    return failed, broken


def _describe(name: str, report: AuditReport) -> str:
    if report.ok:
        return f"{name}: intact, version {report.last_version}"
    kind = report.kind.value if report.kind is not None else "unknown"
    return f"{name}: broken at version {report.broken_at_version} ({kind}): {report.problem}"


def _message(error: BaseException, *, path: str | None = None) -> str:
    """One line for an error; an OSError names its file unless that is `path` (said already)."""
    from turnlog import errors

    if isinstance(error, errors.TurnlogError):
        return error.message
    if isinstance(error, OSError) and error.strerror:
        named = error.filename is not None and str(error.filename) != path
        return f"{error.strerror}: {error.filename}" if named else error.strerror
    return str(error) or type(error).__name__


# -- replay ----------------------------------------------------------------------


def _replay(args: argparse.Namespace) -> int:
    quiet_logging()
    if args.file is None and args.conversation is None:
        args.usage_error("name a conversation, or --file PATH")
    if not args.regenerate and (args.worker or args.spawn_worker or args.fork_prefix):
        args.usage_error("--worker, --spawn-worker and --fork-prefix need --regenerate")
    if args.regenerate and not (args.worker or args.spawn_worker):
        args.usage_error("--regenerate needs --worker HOST:PORT or --spawn-worker ARGS")
    if args.fork_prefix and args.file is not None:
        args.usage_error("--fork-prefix writes to the log: import the file, then replay by id")
    return asyncio.run(_replay_async(args))


async def _replay_async(args: argparse.Namespace) -> int:
    from turnlog import errors
    from turnlog.history.transcript import TranscriptError

    try:
        if args.file is not None:
            events = _events_of_file(args.file, args.conversation)
            return await _replay_events(args, events, history=None)
        async with open_history() as history:
            from turnlog.eventlog import stream_id

            name = conversation_id(args.conversation)
            events = list(await history.store.read_stream(stream_id(name)))
            if not events:
                raise errors.NotFoundError(f"conversation {name!r} not found")
            return await _replay_events(args, events, history=history)
    except TranscriptError as e:
        complain("replay", f"the log does not replay: {e}")
        return 2
    except (errors.TurnlogError, OSError) as e:
        complain("replay", _message(e, path=args.file))
        return 2


def _events_of_file(path: str, conversation: str | None) -> list[Any]:
    """The recorded events of one conversation of an export file."""
    from turnlog import errors
    from turnlog.eventlog import STREAM_PREFIX
    from turnlog.history import jsonl

    events = jsonl.read_jsonl(jsonl.split_lines(read_input(path)))
    streams: dict[str, list[Any]] = {}
    for event in events:
        if event.stream_id.startswith(STREAM_PREFIX):
            streams.setdefault(event.stream_id, []).append(event.to_recorded())
    if conversation is not None:
        wanted = STREAM_PREFIX + conversation_id(conversation)
        if wanted not in streams:
            raise errors.NotFoundError(f"the file holds no conversation {conversation!r}")
        return streams[wanted]
    if len(streams) != 1:
        raise errors.InvalidArgumentError(f"the file holds {len(streams)} conversations: name one")
    return next(iter(streams.values()))


async def _replay_events(
    args: argparse.Namespace, events: list[Any], *, history: HistoryService | None
) -> int:
    from turnlog.history.audit import audit_stream
    from turnlog.history.transcript import (
        TranscriptError,
        build_transcript,
        render_transcript,
        transcript_to_json,
    )

    # A transcript of a log that does not verify would present edited history as recorded.
    audit = audit_stream(events[0].stream_id, events)
    if not audit.ok:
        assert audit.broken_at_version is not None
        assert audit.kind is not None
        raise TranscriptError(audit.broken_at_version, f"{audit.kind.value}: {audit.problem}")
    if not args.regenerate:
        transcript = build_transcript(events, at=args.at)
        sys.stdout.write(render_transcript(transcript))
        if args.json:
            await _write_json(args.json, transcript_to_json(transcript))
        return 0
    return await _regenerate(args, events, history)


async def _regenerate(
    args: argparse.Namespace, events: list[Any], history: HistoryService | None
) -> int:

    from turnlog.conversation.tools import builtin_tools
    from turnlog.eventlog import wall_clock_us
    from turnlog.guardrails.registry import default_registry
    from turnlog.history.regenerate import ForkTarget, regenerate, render_report
    from turnlog.history.transcript import build_transcript
    from turnlog.worker.client import EngineClient
    from turnlog.worker.spawn import spawned_worker

    turns = len(build_transcript(events, at=args.at).turns)
    async with contextlib.AsyncExitStack() as stack:
        workers = list(args.worker)
        if args.spawn_worker:
            workers.append(await stack.enter_async_context(spawned_worker(args.spawn_worker)))
        engine = await stack.enter_async_context(EngineClient(workers))
        fork = None
        if args.fork_prefix:
            assert history is not None
            fork = ForkTarget(store=history.store, prefix=args.fork_prefix)
        with progress_bar(total=turns, desc="regenerate", unit="turn") as bar:
            report = await regenerate(
                events,
                engine=engine,
                # What `turnlog serve` runs with today.
                guardrails=default_registry(),
                tools=builtin_tools(wall_clock_us),
                at=args.at,
                fork=fork,
                progress=lambda _: bar.update(1),
            )
    sys.stdout.write(render_report(report))
    if args.json:
        await _write_json(args.json, report.to_json())
    return 0 if report.all_same else 1


async def _write_json(path: str, value: object) -> None:
    import json

    text = json.dumps(value, ensure_ascii=False, indent=2) + "\n"
    await asyncio.to_thread(Path(path).write_text, text, "utf-8")
