"""Engine workers started by `turnlog serve --spawn-worker "ARGS"` as child processes.

For a one-machine setup (and the README's `make serve`): the service starts
`turnlog worker ARGS --listen 127.0.0.1:0`, waits until the worker says which
port it serves on, and talks to it over gRPC like any other worker. The
child is stopped with SIGTERM (it drains) when the service stops, and killed
if it does not exit in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
import sys
from collections.abc import AsyncIterator

from turnlog import errors

log = logging.getLogger(__name__)

_SERVING = re.compile(rb"turnlog worker serving on port (\d+)")
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 40.0


async def _echo(stream: asyncio.StreamReader, prefix: str) -> None:
    """Forward the child's output to our log, line by line, until it closes."""
    while line := await stream.readline():
        log.info("%s%s", prefix, line.decode(errors="replace").rstrip())


@contextlib.asynccontextmanager
async def spawned_worker(worker_args: str) -> AsyncIterator[str]:
    """Run `turnlog worker <worker_args>` on a free loopback port for the context.

    Args:
        worker_args: the worker's command-line arguments as one shell-quoted
            string, e.g. "--model /models/tiny --enforce-eager".

    Yields:
        The worker's address, "127.0.0.1:PORT".

    Raises:
        EngineUnavailableError: the worker exited, or did not start serving
            within START_TIMEOUT_S.
    """
    args = [*shlex.split(worker_args), "--listen", "127.0.0.1:0"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "turnlog.cli",
        "worker",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    echo: asyncio.Task[None] | None = None
    try:
        port = await asyncio.wait_for(_wait_for_port(proc.stdout), START_TIMEOUT_S)
        if port is None:
            raise errors.EngineUnavailableError("the spawned engine worker exited while starting")
        echo = asyncio.create_task(_echo(proc.stdout, f"worker[{proc.pid}] "))
        log.info("spawned engine worker %d serving on 127.0.0.1:%d", proc.pid, port)
        yield f"127.0.0.1:{port}"
    except TimeoutError as e:
        raise errors.EngineUnavailableError("the spawned engine worker did not start") from e
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if echo is not None:
            await echo


async def _wait_for_port(stdout: asyncio.StreamReader) -> int | None:
    """Echo start-up output until the serving line; None if the child exits first."""
    while line := await stdout.readline():
        if match := _SERVING.search(line):
            return int(match.group(1))
        log.info("worker: %s", line.decode(errors="replace").rstrip())
    return None
