"""PostgreSQL faults: restarted under load, a statement timeout, a full disk.

The restart and the full disk happen to a PostgreSQL server of the test's
own (`EmbeddedPostgres` in a folder of its own, never the shared test
server); the statement timeout is the test database's own setting on its
connections. Each case: callers get UNAVAILABLE (or the disk's own error)
with `retryable` while the fault lasts, the log holds no partial turn and
verifies, and the service serves again within seconds once the fault ends.
Figures are printed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from conversation_helpers import scripted_worker_server, served
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from psycopg.conninfo import make_conninfo

from turnlog.auth.channel import credentialed_channel
from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.eventlog import stream_id
from turnlog.storage import EmbeddedPostgres, PostgresEventStore, migrate
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient

pytestmark = pytest.mark.timeout(180)

SCRIPT: dict[str, Any] = {
    "model": "scripted-database",
    "default": {"text": "Fine, thanks.", "token_delay_ms": 5},
}
#: Generous bounds: the service serves again this soon after the fault ends.
RECOVERS_WITHIN_S = 20.0
FAILS_WITHIN_S = 15.0


class OwnServer:
    """An embedded PostgreSQL server in a folder of its own, for one test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = EmbeddedPostgres(folder / "data")
        self.url = ""

    def start(self) -> str:
        self.url = self.server.start()
        return self.url

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def own_server() -> Iterator[OwnServer]:
    # Not under pytest's base temp folder (see tests/conftest.py `pg_admin_url`).
    folder = Path(tempfile.mkdtemp(prefix="turnlog-faults-db-"))
    server = OwnServer(folder)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Service:
    stub: sgrpc.ConversationServiceStub
    app: ConversationApplication
    store: PostgresEventStore


@asynccontextmanager
async def _service(store: PostgresEventStore, *, recovery_s: float = 0) -> AsyncIterator[Service]:
    async with (
        scripted_worker_server(SCRIPT) as worker,
        EngineClient([worker.target]) as engine,
    ):
        app = ConversationApplication(store, engine, defaults=ServiceDefaults())
        if recovery_s:
            app.start_recovery(recovery_s)
        try:
            async with (
                served(app) as serving,
                credentialed_channel(serving.address, serving.token()) as channel,
            ):
                yield Service(sgrpc.ConversationServiceStub(channel), app, store)
        finally:
            await app.shutdown()


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo in the status")


def _send(name: str, content: str, request_id: str) -> spb.SendMessageRequest:
    return spb.SendMessageRequest(
        input=spb.TurnInput(conversation=name, content=content, request_id=request_id)
    )


async def _check_log(store: PostgresEventStore, name: str) -> Counter[str]:
    """The conversation's log verifies and holds no partial turn; its turns' end types."""
    cid = name.removeprefix("conversations/")
    assert (await store.verify(stream_id(cid))).ok
    events = await store.read_stream(stream_id(cid))
    started = [e.data["turn_id"] for e in events if e.type == "TurnStarted"]
    ends = {
        e.data["turn_id"]: e.type
        for e in events
        if e.type in ("TurnCompleted", "TurnFailed", "TurnInterrupted", "TurnCancelled")
    }
    assert set(ends) == set(started), "a turn without its end"
    for e in events:
        if e.type == "TurnCompleted":
            generated = [
                g
                for g in events
                if g.type == "GenerationCompleted" and g.data["turn_id"] == e.data["turn_id"]
            ]
            assert [g.data["text"] for g in generated] == ["Fine, thanks."]
    return Counter(ends.values())


# -- restarted under load -----------------------------------------------------------


@dataclass
class Load:
    """Clients sending turns one after another, each retrying a refused turn as is."""

    stub: sgrpc.ConversationServiceStub
    names: list[str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    refused: list[tuple[float, str]] = field(default_factory=list)
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    completed_at: list[float] = field(default_factory=list)

    async def client(self, name: str) -> None:
        turn = 0
        while not self.stop.is_set():
            turn += 1
            request_id = f"t{turn}"
            while True:
                try:
                    sent = await self.stub.SendMessage(_send(name, "hi", request_id), timeout=30)
                    break
                except grpc.aio.AioRpcError as e:
                    # Asserted after the load: every refusal is UNAVAILABLE, retryable.
                    info = _error_info(e)
                    self.refused.append(
                        (
                            time.monotonic(),
                            f"{e.code().name} {info.reason} "
                            f"retryable={info.metadata.get('retryable')}",
                        )
                    )
                    await asyncio.sleep(0.1)
            self.outcomes[(name, sent.turn.turn_id)] = sent.turn.status
            if sent.turn.status == pb.TURN_STATUS_COMPLETED:
                self.completed_at.append(time.monotonic())


async def test_postgres_restarted_under_load(own_server: OwnServer) -> None:
    url = own_server.start()
    await migrate(url)
    store = await PostgresEventStore.open(url, max_size=8, connect_timeout=2.0)
    try:
        async with _service(store, recovery_s=1.0) as service:
            names = [
                (
                    await service.stub.CreateConversation(
                        spb.CreateConversationRequest(request_id=f"c{n}"), timeout=10
                    )
                ).conversation.name
                for n in range(6)
            ]
            load = Load(service.stub, names)
            clients = [asyncio.create_task(load.client(name)) for name in names]
            await asyncio.sleep(1.0)
            assert load.completed_at, "no turn completed before the restart"
            down = time.monotonic()
            await asyncio.to_thread(own_server.stop)  # fast shutdown: sessions end
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_server.start)
            up = time.monotonic()
            await asyncio.sleep(3.0)
            load.stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), RECOVERS_WITHIN_S + 30)
            # Turns whose end could not be recorded are closed by recovery.
            await service.app.close_interrupted_turns()
            ends: Counter[str] = Counter()
            for name in names:
                ends += await _check_log(store, name)
    finally:
        await store.close()
    kinds = Counter(reason for _, reason in load.refused)
    assert set(kinds) == {"UNAVAILABLE STORAGE_UNAVAILABLE retryable=true"}, kinds
    during = [at for at, _ in load.refused if at >= down]
    assert during, "no call was refused: the restart did not hit the load"
    after = [at for at in load.completed_at if at > up]
    assert after, "no turn completed after the restart"
    recovered_s = after[0] - up
    assert recovered_s < RECOVERS_WITHIN_S
    assert set(ends) <= {"TurnCompleted", "TurnInterrupted"}, ends
    # What each client was told is what the log says.
    statuses = Counter(pb.TurnStatus.Name(s) for s in load.outcomes.values())
    assert statuses["TURN_STATUS_COMPLETED"] == ends["TurnCompleted"]
    print(
        f"\nFAULT PostgreSQL restarted under load (6 clients, {up - down:.2f} s down): "
        f"{len(during)} calls refused UNAVAILABLE retryable; first turn completed "
        f"{recovered_s:.2f} s after the server was back; turns {dict(ends)}"
    )


# -- a statement timeout ---------------------------------------------------------------


async def test_a_statement_timeout_is_unavailable_and_leaves_nothing_half_written(
    database_url: str,
) -> None:
    # The service's sessions time out after 300 ms; a lock held elsewhere
    # makes its append wait that long.
    dsn = make_conninfo(database_url, options="-c statement_timeout=300")
    store = await PostgresEventStore.open(dsn, max_size=4, connect_timeout=2.0)
    try:
        async with _service(store) as service:
            stub = service.stub
            name = (
                await stub.CreateConversation(spb.CreateConversationRequest(request_id="c"))
            ).conversation.name
            cid = name.removeprefix("conversations/")
            first = await stub.SendMessage(_send(name, "hi", "1"), timeout=20)
            assert first.turn.status == pb.TURN_STATUS_COMPLETED
            before = await store.read_stream(stream_id(cid))
            async with await psycopg.AsyncConnection.connect(database_url) as blocker:
                await blocker.execute("LOCK TABLE turnlog.events IN ACCESS EXCLUSIVE MODE")
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.SendMessage(_send(name, "hi", "2"), timeout=30)
                refused_s = time.monotonic() - started
                await blocker.rollback()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            info = _error_info(caught.value)
            assert (info.reason, info.metadata["retryable"]) == ("STORAGE_UNAVAILABLE", "true")
            assert refused_s < FAILS_WITHIN_S
            # Nothing of the refused turn was recorded; its retry is a whole turn.
            assert await store.read_stream(stream_id(cid)) == before
            started = time.monotonic()
            retried = await stub.SendMessage(_send(name, "hi", "2"), timeout=20)
            retry_s = time.monotonic() - started
            assert retried.turn.status == pb.TURN_STATUS_COMPLETED
            assert await _check_log(store, name) == Counter({"TurnCompleted": 2})
    finally:
        await store.close()
    print(
        f"\nFAULT statement timeout (300 ms, the events table locked): the turn refused "
        f"UNAVAILABLE retryable in {refused_s:.2f} s, nothing recorded; its retry "
        f"completed in {retry_s:.2f} s once the lock was gone"
    )


# -- a full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 64 MiB tmpfs of this test's own (mounting needs root; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the development machines run as root)")
    folder = Path(tempfile.mkdtemp(prefix="turnlog-faults-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)
        folder.rmdir()


def _fill(path: Path) -> int:
    """Write `path` until the file system is full; the bytes written."""
    written = 0
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as filler:
        while True:
            try:
                written += filler.write(chunk) or 0
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]
                if not chunk:
                    return written


async def test_a_full_disk_refuses_turns_and_leaves_nothing_half_written(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedPostgres(small_disk / "data")
    url = await asyncio.to_thread(server.start)
    try:
        await migrate(url)
        store = await PostgresEventStore.open(url, max_size=4, connect_timeout=2.0)
        try:
            async with _service(store, recovery_s=1.0) as service:
                stub = service.stub
                name = (
                    await stub.CreateConversation(spb.CreateConversationRequest(request_id="c"))
                ).conversation.name
                first = await stub.SendMessage(_send(name, "hi", "t0"), timeout=20)
                assert first.turn.status == pb.TURN_STATUS_COMPLETED
                filled = _fill(small_disk / "filler")
                refused: grpc.aio.AioRpcError | None = None
                turns = 0
                # Turns until the table needs a page the disk has no room for.
                for turns in range(1, 200):
                    try:
                        await stub.SendMessage(_send(name, "hi " * 500, f"t{turns}"), timeout=30)
                    except grpc.aio.AioRpcError as e:
                        refused = e
                        break
                assert refused is not None, "200 turns fitted on a full disk"
                assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused.details()
                info = _error_info(refused)
                assert (info.reason, info.metadata["retryable"]) == ("STORAGE_UNAVAILABLE", "true")
                # The operator's log names the cause.
                assert any("No space left on device" in r.getMessage() for r in caplog.records)

                (small_disk / "filler").unlink()
                freed = time.monotonic()
                # The refused request again: its turn (closed by recovery if
                # its start was recorded), then a new turn.
                # (the same content: a request id reused with other content is refused)
                again = await _until_served(
                    lambda: stub.SendMessage(_send(name, "hi " * 500, f"t{turns}"), timeout=30)
                )
                assert again.turn.status in (pb.TURN_STATUS_COMPLETED, pb.TURN_STATUS_INTERRUPTED)
                after = await stub.SendMessage(_send(name, "hi", "after"), timeout=30)
                assert after.turn.status == pb.TURN_STATUS_COMPLETED
                recovered_s = time.monotonic() - freed
                ends = await _check_log(store, name)
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(server.stop)
    print(
        f"\nFAULT disk full ({filled >> 20} MiB filler on a 64 MiB tmpfs): turn {turns} "
        f'refused UNAVAILABLE {info.reason} retryable ("{refused.details()}"); '
        f"served again {recovered_s:.2f} s after space was freed; turns {dict(ends)}"
    )


async def _until_served(attempt: Any) -> Any:
    """Retry `attempt()` while it fails UNAVAILABLE, up to RECOVERS_WITHIN_S."""
    started = time.monotonic()
    while True:
        try:
            return await attempt()
        except grpc.aio.AioRpcError as e:
            code = e.code()
        assert code == grpc.StatusCode.UNAVAILABLE, code
        assert time.monotonic() - started < RECOVERS_WITHIN_S, "the service did not recover"
        await asyncio.sleep(0.2)
