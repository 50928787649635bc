"""Retries across a restarted `turnlog serve`, and the client distribution standing alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conversation_helpers import scripted_worker_server
from sdk_helpers import SCRIPT
from serve_processes import ServeProcess

from turnlog_client import NO_RETRY, AsyncTurnlogClient, RetryPolicy, Unavailable

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
async def test_calls_are_retried_across_a_service_restart(
    database_url: str, tmp_path: Path
) -> None:
    async with scripted_worker_server(SCRIPT) as worker:
        serve = ServeProcess(
            tmp_path / "serve.log",
            tmp_path / "data",
            database_url=database_url,
            worker=worker.target,
        )
        await asyncio.to_thread(serve.start)
        serve.env["TURNLOG_LISTEN"] = serve.target  # the restart listens on the same port
        try:
            patient = RetryPolicy(max_attempts=200, max_backoff_s=0.5, deadline_s=120)
            async with (
                AsyncTurnlogClient(serve.target, token=serve.token, retry=patient) as client,
                AsyncTurnlogClient(serve.target, token=serve.token, retry=NO_RETRY) as eager,
            ):
                conversation = await client.create_conversation()
                await asyncio.to_thread(serve.stop)
                with pytest.raises(Unavailable) as down:
                    await eager.get_conversation(conversation.name)
                assert down.value.retryable
                # Both calls start while the service is down and finish after it is back.
                started = time.monotonic()
                read = asyncio.create_task(client.get_conversation(conversation.name))
                # No request id given: the SDK makes one and every attempt repeats it.
                sent = asyncio.create_task(client.send_message(conversation.name, "hi"))
                await asyncio.sleep(1.0)
                assert not read.done()
                assert not sent.done()
                await asyncio.to_thread(serve.start)
                restarted_after = time.monotonic() - started
                assert (await read).name == conversation.name
                assert (await sent).assistant_message.content == "Hello there."
                assert time.monotonic() - started >= restarted_after
                # The retried write ran once.
                after = await client.get_conversation(conversation.name)
                assert len(after.turns) == 1
        finally:
            await asyncio.to_thread(serve.stop)


def test_the_wheel_carries_the_client_and_turnlog_v1_only(tmp_path: Path) -> None:
    """The client wheel: turnlog_client, the generated turnlog.v1, nothing of the server."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO / "clients" / "python"),
        ],
        check=True,
        timeout=120,
    )
    [wheel] = tmp_path.glob("turnlog_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {
        n.split("/")[0] if not n.startswith("turnlog/") else "/".join(n.split("/")[:2])
        for n in names
    }
    assert packages == {
        "turnlog_client",
        "turnlog/v1",
        next(n.split("/")[0] for n in names if ".dist-info/" in n),
    }
    assert "turnlog/__init__.py" not in names  # turnlog stays a namespace package
    generated = sorted(n.removeprefix("turnlog/v1/") for n in names if n.startswith("turnlog/v1/"))
    assert generated == sorted(p.name for p in (REPO / "gen" / "turnlog" / "v1").iterdir())
    metadata = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    requires = sorted(
        line.split(":", 1)[1].split(";")[0].split(">")[0].split("<")[0].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert requires == ["googleapis-common-protos", "grpcio", "protobuf"]

    # Installed alone (the wheel's files on the path; none of the repository's
    # source roots), it imports and works offline without the server's code.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    golden = REPO / "tests" / "history" / "golden" / "plain.jsonl"
    # The repository's source roots (not the whole checkout: the virtual
    # environment may live inside it, as .venv does).
    sources = tuple(str(REPO / d) for d in ("gen", "services", "storage", "clients", "tests"))
    probe = f"""
import sys
roots = {sources!r}
sys.path = [{str(unpacked)!r}] + [p for p in sys.path if not p.startswith(roots) and p != '']
import turnlog_client
from turnlog_client import verify_export
[report] = verify_export({str(golden)!r})
assert report.intact, report
client = turnlog_client.AsyncTurnlogClient("127.0.0.1:1")
loaded = sorted(m for m in sys.modules if m == "turnlog" or m.startswith("turnlog."))
assert all(m == "turnlog" or m.startswith("turnlog.v1") for m in loaded), loaded
assert all(sys.modules[m].__file__.startswith({str(unpacked)!r}) for m in loaded if sys.modules[m].__file__), loaded
print("ok", len(loaded))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", _with_site_packages(probe)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def _with_site_packages(probe: str) -> str:
    """`probe` run with the environment's site-packages but none of its .pth files.

    The dev environment's .pth files put the repository's gen/, services/,
    storage/ and clients/python on the path; `-S` skips them, and only the
    site-packages folder (grpcio, protobuf, googleapis-common-protos) is added.
    """
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    platlib = sysconfig.get_paths()["platlib"]
    return f"import sys; sys.path += [{purelib!r}, {platlib!r}]\n{probe}"
