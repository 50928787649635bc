"""Engine workers started by `turnlog serve --spawn-worker "ARGS"` as child processes.

For a one-machine setup (and the README's `make serve`): the service starts
`turnlog worker ARGS --listen 127.0.0.1:0`, waits until the worker says which
port it serves on, and talks to it over gRPC like any other worker. The
child is stopped with SIGTERM (it drains) when the service stops, and killed
if it does not exit in time. If the service dies without stopping it (even
by SIGKILL), Linux sends the child SIGTERM (its parent-death signal, which
the worker sets for itself first thing: `exit_with_parent`), so no worker,
with its engine and its memory, is left running without a service;
elsewhere that is not done.

The connection is mTLS, with nothing to set up: a CA made for this one
worker (`turnlog.worker.certs`) issues the worker a certificate for
127.0.0.1 and localhost and the service a client certificate, and is then
dropped. The worker's key, certificate and the CA certificate are written to
a private temporary folder (0700, the key 0600) that is removed when the
worker has stopped; the service's client key never touches the disk. So
another local user cannot use the worker's port, nor pose as the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from turnlog import errors
from turnlog.worker.certs import CertificateAuthority
from turnlog.worker.client import WorkerTarget

log = logging.getLogger(__name__)

_SERVING = re.compile(rb"turnlog worker serving on port (\d+)")
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 40.0


#: Set by `turnlog serve` for the workers it spawns: its pid.
PARENT_PID_ENV = "TURNLOG_SPAWNED_BY"
#: prctl(2) option: the signal this process gets when its parent thread dies.
_PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """In a spawned worker: get SIGTERM when the `turnlog serve` that spawned it dies (Linux).

    Called by `turnlog worker` first thing, when `PARENT_PID_ENV` names its
    parent. Set in the child, after exec, not in a `preexec_fn`: that would
    make Python fork rather than vfork, and a forked child of a process with
    gRPC's threads sometimes crashes before exec (measured ~3%). If the
    parent died already, the worker stops at once.
    """
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot set the parent-death signal (errno %d)", ctypes.get_errno())
        return
    if str(os.getppid()) != parent:
        os.kill(os.getpid(), signal.SIGTERM)


async def _echo(stream: asyncio.StreamReader, prefix: str) -> None:
    """Forward the child's output to our log, line by line, until it closes."""
    while line := await stream.readline():
        log.info("%s%s", prefix, line.decode(errors="replace").rstrip())


_TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca")


def _worker_tls(folder: Path) -> tuple[list[str], grpc.ChannelCredentials]:
    """Certificates for one spawned worker in `folder`: its TLS flags and our credentials."""
    ca = CertificateAuthority.create("turnlog spawned worker CA")
    server = ca.issue_server("turnlog spawned worker", hosts=["127.0.0.1", "localhost"])
    client = ca.issue_client("turnlog serve")
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "worker.pem", folder / "worker.key"
    ca_path.write_bytes(ca.cert_pem)
    server.write(cert_path, key_path)
    flags = ["--tls-cert", str(cert_path), "--tls-key", str(key_path)]
    flags += ["--tls-client-ca", str(ca_path)]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem,
        private_key=client.key_pem,
        certificate_chain=client.cert_pem,
    )
    return flags, credentials


@contextlib.asynccontextmanager
async def spawned_worker(worker_args: str) -> AsyncIterator[WorkerTarget]:
    """Run `turnlog worker <worker_args>` on a free loopback port, over mTLS, for the context.

    Args:
        worker_args: the worker's command-line arguments as one shell-quoted
            string, e.g. "--model /models/tiny --enforce-eager". TLS flags
            are not allowed: the worker's certificates are made here.

    Yields:
        The worker's address, "127.0.0.1:PORT", with the client credentials
        that it accepts (and that accept only it), for `EngineClient`.

    Raises:
        ValueError: `worker_args` holds TLS flags.
        EngineUnavailableError: the worker exited, or did not start serving
            within START_TIMEOUT_S.
    """
    args = shlex.split(worker_args)
    if given := [a for a in args if a.split("=", 1)[0] in _TLS_FLAGS]:
        raise ValueError(
            f"a spawned worker gets its TLS certificates from turnlog serve; drop {given[0]}"
        )
    # mkdtemp makes the folder 0700; it goes when the worker has stopped.
    with tempfile.TemporaryDirectory(prefix="turnlog-worker-tls-") as folder:
        flags, credentials = _worker_tls(Path(folder))
        async with _worker_process([*args, *flags, "--listen", "127.0.0.1:0"]) as address:
            yield WorkerTarget(address=address, credentials=credentials)


@contextlib.asynccontextmanager
async def _worker_process(args: list[str]) -> AsyncIterator[str]:
    """`turnlog worker <args>` as a child process for the context; yields its address."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "turnlog.cli",
        "worker",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # The parent-death signal follows the thread that started the child:
        # this loop's, the main thread of `turnlog serve`.
        env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
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
