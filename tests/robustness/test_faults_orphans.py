"""`turnlog serve` SIGKILLed leaves no processes behind: not its spawned worker, not its PostgreSQL.

The service runs on its embedded defaults (embedded PostgreSQL in a data
folder of this test's own, a `--spawn-worker` child on the scripted backend
so that no engine is loaded). Killed alone, as the kernel's OOM killer or
`kill -9 PID` does, its worker gets its parent-death signal and the process
holding its database stops it. Killed with its whole process group, holder
included, the database outlives it; the next start then reuses that server and its
clean stop ends it (before, the dead process's handle kept every later
stop from ending it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_processes import ServeProcess, alive, wait_gone

from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

pytestmark = pytest.mark.timeout(240)

SCRIPT = {"model": "scripted-orphans", "default": {"text": "Still here."}}
#: Generous bounds for processes to go (measured: well under a second each).
WORKER_GONE_S = 10.0
DATABASE_GONE_S = 15.0


class Folder:
    """A data folder outside pytest's temporary tree, and the pids to clean up after the test."""

    def __init__(self) -> None:
        # Not under pytest's base temp folder: run as root, the server runs
        # as another user that must traverse the folder's ancestors, and a
        # pytest session that starts chmods /tmp/pytest-of-<user> to 0700.
        self.path = Path(tempfile.mkdtemp(prefix="turnlog-faults-orphans-"))
        self.pids: list[int] = []

    def serve(self) -> ServeProcess:
        script = self.path / "script.json"
        script.write_text(json.dumps(SCRIPT))
        return ServeProcess(
            self.path / "serve.log",
            self.path / "data",
            spawn_worker=f"--backend scripted --script {script} --grace 1",
        )

    def postmaster_pid(self) -> int:
        lines = (self.path / "data" / "postgres" / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
        self.pids.append(pid)
        return pid

    def cleanup(self) -> None:
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.path, ignore_errors=True)


@pytest.fixture
def folder() -> Iterator[Folder]:
    made = Folder()
    try:
        yield made
    finally:
        made.cleanup()


async def _one_turn(serve: ServeProcess, request_id: str) -> None:
    async with serve.channel() as channel:
        stub = sgrpc.ConversationServiceStub(channel)
        created = await stub.CreateConversation(
            spb.CreateConversationRequest(request_id=request_id), timeout=20
        )
        sent = await stub.SendMessage(
            spb.SendMessageRequest(
                input=spb.TurnInput(
                    conversation=created.conversation.name, content="hi", request_id="1"
                )
            ),
            timeout=20,
        )
        assert sent.turn.status == pb.TURN_STATUS_COMPLETED


async def test_a_killed_service_leaves_no_worker_and_no_database(folder: Folder) -> None:
    serve = folder.serve().start(timeout_s=180)
    worker = serve.spawned_worker_pid()
    folder.pids.append(worker)
    postmaster = folder.postmaster_pid()
    try:
        await _one_turn(serve, "c")
        assert alive(worker)
        assert alive(postmaster)
        serve.kill_alone()
        killed = time.monotonic()
    finally:
        serve.kill()
    assert wait_gone(worker, WORKER_GONE_S) is not None, f"the worker {worker} outlived serve"
    worker_gone = time.monotonic() - killed
    assert wait_gone(postmaster, DATABASE_GONE_S) is not None, f"PostgreSQL {postmaster} too"
    database_gone = time.monotonic() - killed
    assert not (folder.path / "data" / "postgres" / "postmaster.pid").exists()
    print(
        f"\nFAULT turnlog serve SIGKILLed: spawned worker gone in {worker_gone:.2f} s, "
        f"embedded PostgreSQL stopped in {database_gone:.2f} s"
    )

    # The next start finds everything in order and serves the data kept.
    serve.start(timeout_s=120)
    folder.pids.append(serve.spawned_worker_pid())
    folder.postmaster_pid()
    try:
        await _one_turn(serve, "c2")
    finally:
        assert serve.stop() == 0


async def test_after_a_kill_of_the_whole_group_the_next_clean_stop_ends_the_database(
    folder: Folder,
) -> None:
    serve = folder.serve().start(timeout_s=180)
    postmaster = folder.postmaster_pid()
    try:
        await _one_turn(serve, "c")
    finally:
        serve.kill()  # SIGKILL to its process group: the worker and the holder too
    # The server runs detached (its own session), so it outlived all of them.
    assert alive(postmaster)

    serve.start(timeout_s=120)
    reused = folder.postmaster_pid() == postmaster
    try:
        await _one_turn(serve, "c2")
    finally:
        stopping = time.monotonic()
        assert serve.stop() == 0
    stop_s = time.monotonic() - stopping
    # Ended before the service exited: no wait, nothing left to a later start.
    assert not alive(postmaster), "the clean stop left the database running"
    print(
        f"\nFAULT turnlog serve and its process group SIGKILLed: the next start "
        f"{'reused' if reused else 'replaced'} the running server; its clean stop "
        f"(service and database) took {stop_s:.2f} s"
    )
