"""Engine worker subprocesses shared by every test folder.

`turnlog worker` runs as a subprocess so that tests can kill it, and so that
vLLM's and torch's import-time warnings stay out of the test process
(warnings are errors here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
VLLM_MAX_MODEL_LEN = 1024
#: The token `turnlog serve` prints when it uses its local signing key.
SERVE_TOKEN = re.compile(r"turnlog token for tenant '[^']+' \([^)]*\): (\S+)")


def printed_token(output: str) -> str:
    """The token a `turnlog serve` printed in `output` (its latest)."""
    found = SERVE_TOKEN.findall(output)
    assert found, "turnlog serve printed no token"
    return str(found[-1])


class TurnlogProcess:
    """A `turnlog ...` subprocess in its own session, logging to a file.

    `start()` waits until the log (from this start on) matches `ready`, so
    one log file can hold several starts of the same process.
    """

    def __init__(self, args: list[str], log_path: Path, ready: re.Pattern[str]) -> None:
        self.args = args
        self.log_path = log_path
        self.ready = ready
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_match: re.Match[str] | None = None

    def start(self, timeout_s: float = 120.0) -> re.Match[str]:
        """Start the process; returns the match of `ready` in its output."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "turnlog.cli", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            output = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if found := self.ready.search(output):
                self.ready_match = found
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited early:\n{self.log_tail()}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.args[0]} did not start in {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the process and its children (vLLM's engine core)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful) and wait, SIGKILL if it hangs; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()


class WorkerProcess(TurnlogProcess):
    """A `turnlog worker` subprocess on loopback.

    Without a port it binds port 0 and `port` is the one it reports: vLLM's
    engine opens sockets on ephemeral ports while the model loads, before
    the worker binds, so a port picked in advance could be taken by then.
    A given port (a restart on the same address) is bound as is.
    """

    def __init__(self, args: list[str], log_path: Path, port: int | None = None) -> None:
        self.port = port or 0
        super().__init__(
            ["worker", *args, "--listen", f"127.0.0.1:{self.port}"],
            log_path,
            re.compile(r"serving on port (\d+)" if port is None else f"serving on port {port}"),
        )
        self.env = dict(WORKER_ENV)

    @property
    def target(self) -> str:
        if not self.port:
            raise RuntimeError("the worker has no port until it has started")
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> WorkerProcess:  # type: ignore[override]
        found = super().start(timeout_s)
        if not self.port:
            # A later start (a restart) comes back on the same address.
            self.port = int(found.group(1))
            self.args[self.args.index("127.0.0.1:0")] = self.target
            self.ready = re.compile(f"serving on port {self.port}")
        return self


def start_scripted_worker(
    script: dict[str, Any], folder: Path, *, name: str = "worker", grace_s: float = 1
) -> WorkerProcess:
    """A `turnlog worker --backend scripted` subprocess replying per `script`, started."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(script))
    worker = WorkerProcess(
        ["--backend", "scripted", "--script", str(path), "--grace", str(grace_s)],
        folder / f"{name}.log",
    )
    return worker.start(timeout_s=30)
