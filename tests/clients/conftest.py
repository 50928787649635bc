"""A live `turnlog serve` for the client tests, with a scripted engine worker.

The clients (Go, Node) talk to a real service process over loopback: the
same `turnlog serve` a user runs, on this test's database, authenticating
with the token it prints for its local key. The model is the scripted
engine (`turnlog worker --backend scripted`), the test double that answers
each prompt as `SCRIPT` says, so that the model reliably calls the
client-side tool. The examples' default prompts are the cues.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_service import CONFORMANCE_DIR, GO_DIR, GO_MODULE, SCRIPT, SERVING, GoPrograms, Service
from worker_processes import TurnlogProcess, WorkerProcess, printed_token, start_scripted_worker

# clients/conformance is scripts, not a package: its reference and comparison
# are imported by the tests from there.
sys.path.insert(0, str(CONFORMANCE_DIR))


@pytest.fixture
def scripted_worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = start_scripted_worker(SCRIPT, tmp_path)
    yield worker
    worker.terminate(timeout_s=10)


@pytest.fixture
def service(tmp_path: Path, database_url: str, scripted_worker: WorkerProcess) -> Iterator[Service]:
    """`turnlog serve` on a free loopback port over this test's database and the scripted worker."""
    serve = TurnlogProcess(
        ["serve", "--worker", scripted_worker.target], tmp_path / "serve.log", SERVING
    )
    # The test's own settings (TURNLOG_TEST_DATABASE_URL …) are not the service's.
    serve.env = {name: "" for name in os.environ if name.startswith("TURNLOG_")}
    serve.env |= {
        "TURNLOG_LISTEN": "127.0.0.1:0",
        "TURNLOG_DATA_DIR": str(tmp_path / "data"),
        "TURNLOG_DATABASE_URL": database_url,
    }
    found = serve.start(timeout_s=60)
    token = printed_token(serve.log_path.read_text(errors="replace"))
    yield Service(target=f"{found[1]}:{found[2]}", token=token, database_url=database_url)
    serve.terminate(timeout_s=30)


# -- Go ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def go_programs(tmp_path_factory: pytest.TempPathFactory) -> GoPrograms:
    """Builds clients/go's example and conformance programs (offline, `clients/go/go.sh`).

    CI installs the Go toolchain (`make clients-go-install`), so a missing
    `go` fails; only TURNLOG_SKIP_GO=1, for a machine without it, skips.
    """
    if shutil.which("go") is None or shutil.which("protoc-gen-go") is None:
        if os.environ.get("TURNLOG_SKIP_GO") == "1":
            pytest.skip("TURNLOG_SKIP_GO=1 and no Go toolchain: THE GO CLIENT IS NOT TESTED")
        pytest.fail("the Go toolchain is missing: run `make clients-go-install`", pytrace=False)
    out = tmp_path_factory.mktemp("go-bin")
    built = {}
    for name in ("example", "conformance"):
        built[name] = out / name
        subprocess.run(
            [GO_DIR / "go.sh", "build", "-o", built[name], f"{GO_MODULE}/cmd/{name}"],
            check=True,
            timeout=300,
        )
    return GoPrograms(**built)
