"""Engine test fixtures: real `turnlog worker` processes over real gRPC.

The session's one vLLM worker (`vllm_worker`, tests/conftest.py) is shared
with the conversation tests; scripted workers are cheap and started per need. Workers are
subprocesses so that tests can kill them, and so that vLLM's and torch's
import-time warnings stay out of this process (warnings are errors here).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from engine_helpers import SCRIPT, Backend
from worker_processes import WorkerProcess

from turnlog.engine.v1 import engine_pb2_grpc


@pytest.fixture(scope="session")
def script_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("script") / "script.json"
    path.write_text(json.dumps(SCRIPT))
    return path


@pytest.fixture
def make_scripted_worker(
    tmp_path: Path,
) -> Iterator[Any]:
    """Start scripted workers (killed at the end of the test)."""
    started: list[WorkerProcess] = []

    def make(script: dict[str, Any] | None = None, port: int | None = None) -> WorkerProcess:
        path = tmp_path / f"script-{len(started)}.json"
        path.write_text(json.dumps(script or SCRIPT))
        worker = WorkerProcess(
            ["--backend", "scripted", "--script", str(path), "--grace", "5"],
            tmp_path / f"worker-{len(started)}.log",
            port=port,
        )
        started.append(worker)
        return worker.start(timeout_s=30)

    yield make
    for worker in started:
        worker.kill()


@pytest.fixture(scope="session")
def scripted_worker(
    script_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("scripted") / "worker.log"
    worker = WorkerProcess(["--backend", "scripted", "--script", str(script_path)], log)
    worker.start(timeout_s=30)
    yield worker
    worker.kill()


@pytest.fixture(params=["scripted", pytest.param("vllm", marks=pytest.mark.vllm)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The contract suite runs once per backend, each through a real worker."""
    if request.param == "vllm":
        worker: WorkerProcess = request.getfixturevalue("vllm_worker")
    else:
        worker = request.getfixturevalue("scripted_worker")
    return Backend(kind=request.param, target=worker.target)


@pytest.fixture
async def stub(backend: Backend) -> AsyncIterator[engine_pb2_grpc.EngineServiceStub]:
    async with grpc.aio.insecure_channel(backend.target) as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)
