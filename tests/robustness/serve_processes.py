"""`turnlog serve` as a subprocess the fault tests can SIGKILL, and what it leaves behind.

`ServeProcess` runs `turnlog serve` in its own session on a loopback port
with its own data folder (so its local signing key, its printed token and,
without a database URL, its embedded PostgreSQL stay with the test).
`kill_alone` SIGKILLs the serve process only, as an out-of-memory kill or
`kill -9 PID` would, leaving its children to show whether they outlive it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
from worker_processes import TurnlogProcess, printed_token

from turnlog.auth.channel import credentialed_channel

SERVING = re.compile(r"turnlog serving gRPC on (\S+):(\d+)")
SPAWNED_WORKER = re.compile(r"spawned engine worker (\d+) serving")


class ServeProcess(TurnlogProcess):
    """A `turnlog serve` subprocess on a free loopback port.

    Args:
        log_path: Its output (several starts append to one file).
        data_dir: Its `TURNLOG_DATA_DIR` (local key; the embedded server's
            data when `database_url` is None).
        database_url: The event log; None: the embedded server.
        worker: `--worker` address, or None.
        spawn_worker: `--spawn-worker` arguments, or None.
    """

    def __init__(
        self,
        log_path: Path,
        data_dir: Path,
        *,
        database_url: str | None = None,
        worker: str | None = None,
        spawn_worker: str | None = None,
    ) -> None:
        args = ["serve"]
        if worker is not None:
            args += ["--worker", worker]
        if spawn_worker is not None:
            args += ["--spawn-worker", spawn_worker]
        super().__init__(args, log_path, SERVING)
        self.env = {"TURNLOG_LISTEN": "127.0.0.1:0", "TURNLOG_DATA_DIR": str(data_dir)}
        if database_url is not None:
            self.env["TURNLOG_DATABASE_URL"] = database_url
        self.target = ""
        self.token = ""

    def start(self, timeout_s: float = 90.0) -> ServeProcess:  # type: ignore[override]
        # The test's own settings (TURNLOG_TEST_DATABASE_URL …) are not the service's.
        for name in [n for n in os.environ if n.startswith("TURNLOG_")]:
            self.env.setdefault(name, "")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        found = super().start(timeout_s)
        self.target = f"{found[1]}:{found[2]}"
        self.token = printed_token(self.output(offset))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self, offset: int = 0) -> str:
        return self.log_path.read_bytes()[offset:].decode(errors="replace")

    def spawned_worker_pid(self) -> int:
        """The pid of the worker this start spawned (from its log)."""
        found = SPAWNED_WORKER.findall(self.output())
        assert found, "turnlog serve spawned no worker"
        return int(found[-1])

    def channel(self) -> grpc.aio.Channel:
        """A channel to the service sending its printed token."""
        return credentialed_channel(self.target, self.token)

    def kill_alone(self) -> None:
        """SIGKILL the serve process only (not its process group) and reap it."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful) and wait; SIGKILL if it hangs. Returns the exit code."""
        return self.terminate(timeout_s)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout_s: float) -> float | None:
    """Seconds until `pid` no longer runs, or None if it still runs after `timeout_s`."""
    started = time.monotonic()
    while alive(pid):
        if time.monotonic() - started > timeout_s:
            return None
        time.sleep(0.02)
    return time.monotonic() - started
