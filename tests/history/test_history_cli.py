# ruff: noqa: F811  (pytest fixtures imported from tests/conversation/conftest.py)
"""`turnlog export`, `import` and `verify`, run as real processes against a real PostgreSQL.

Conversations are made through the application over gRPC (scripted worker,
in process); the CLI then runs as a subprocess on the test's database, as an
operator would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import psycopg
import pytest
from conversation.conftest import (  # noqa: F401 (fixtures)
    app,
    engine,
    make_app,
    worker,
)
from conversation_helpers import conversation_stub

from turnlog.conversation.application import ConversationApplication
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

Stub = sgrpc.ConversationServiceStub

SCHEMA = json.loads((Path(__file__).parent / "atif-v1.8.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


@pytest.fixture
async def stub(app: ConversationApplication) -> AsyncIterator[Stub]:
    async with conversation_stub(app) as served:
        yield served


async def conversation(stub: Stub, prompts: list[str]) -> str:
    """A conversation with a turn per prompt; its id."""
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id=str(uuid.uuid4()), system_prompt="Be brief.")
    )
    name = created.conversation.name
    for i, prompt in enumerate(prompts):
        await stub.SendMessage(
            spb.SendMessageRequest(
                input=spb.TurnInput(conversation=name, content=prompt, request_id=f"r{i}")
            )
        )
    return name.removeprefix("conversations/")


async def rpc_export(
    stub: Stub, cid: str, *, atif: bool = False, version: int | None = None
) -> bytes:
    request = spb.ExportConversationRequest(
        name=f"conversations/{cid}",
        format=hpb.EXPORT_FORMAT_ATIF if atif else hpb.EXPORT_FORMAT_JSONL,
        version=version,
    )
    return b"".join([r.data async for r in stub.ExportConversation(request)])


def cli_env(tmp_path: Path, database_url: str | None) -> dict[str, str]:
    """The environment with no TURNLOG_ settings but these; the data dir is an empty folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNLOG_")}
    data_dir = tmp_path / f"data-{uuid.uuid4().hex[:8]}"
    data_dir.mkdir()
    env["TURNLOG_DATA_DIR"] = str(data_dir)
    if database_url is not None:
        env["TURNLOG_DATABASE_URL"] = database_url
    return env


async def turnlog(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Runs `turnlog ARGS` as a subprocess (off the event loop, which serves gRPC)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "turnlog.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=90,
    )


def one_error_line(done: subprocess.CompletedProcess[bytes]) -> str:
    """The single line a failure prints on stderr (no traceback)."""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, done.stderr.decode()
    assert "Traceback" not in lines[0]
    return lines[0]


def tamper(data: bytes, version: int) -> bytes:
    """The export with event `version`'s payload edited (still valid JSON)."""
    lines = data.splitlines(keepends=True)
    line = json.loads(lines[version])
    payload = json.loads(line["data_json"])
    payload["edited"] = True
    line["data_json"] = json.dumps(payload)
    lines[version] = (json.dumps(line) + "\n").encode()
    return b"".join(lines)


async def test_export_of_one_conversation_equals_the_rpc(
    stub: Stub, database_url: str, tmp_path: Path
) -> None:
    cid = await conversation(stub, ["hi", "what is 6*7"])
    expected = await rpc_export(stub, cid)
    env = cli_env(tmp_path, database_url)

    to_stdout = await turnlog(env, "export", cid)
    assert to_stdout.returncode == 0, to_stdout.stderr.decode()
    assert to_stdout.stdout == expected

    out = tmp_path / "one.jsonl"
    to_file = await turnlog(env, "export", f"conversations/{cid}", "-o", str(out))
    assert to_file.returncode == 0, to_file.stderr.decode()
    assert out.read_bytes() == expected
    assert cid in to_file.stdout.decode()

    prefix = await turnlog(env, "export", cid, "--version", "3", "-o", "-")
    assert prefix.returncode == 0, prefix.stderr.decode()
    assert prefix.stdout == await rpc_export(stub, cid, version=3)
    assert len(prefix.stdout.splitlines()) == 1 + 3


async def test_export_all_writes_one_file_per_conversation(
    stub: Stub, database_url: str, tmp_path: Path
) -> None:
    ids = [await conversation(stub, prompts) for prompts in (["hi"], ["the answer is"], [])]
    fork = await stub.ForkConversation(
        spb.ForkConversationRequest(name=f"conversations/{ids[0]}", version=2)
    )
    ids.append(fork.conversation.name.removeprefix("conversations/"))
    folder = tmp_path / "all"
    done = await turnlog(cli_env(tmp_path, database_url), "export", "--all", "-o", str(folder))
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{cid}.jsonl" for cid in ids)
    for cid in ids:
        assert (folder / f"{cid}.jsonl").read_bytes() == await rpc_export(stub, cid)
    assert len(done.stdout.decode().splitlines()) == len(ids)
    assert done.stderr == b""  # no progress bar when stderr is not a terminal

    chosen = tmp_path / "chosen"
    done = await turnlog(
        cli_env(tmp_path, database_url), "export", ids[1], ids[2], "-o", str(chosen)
    )
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(p.name for p in chosen.iterdir()) == sorted(f"{cid}.jsonl" for cid in ids[1:3])


async def test_import_into_an_empty_database_then_export_is_byte_identical(
    stub: Stub, database_url: str, fresh_database_url: str, tmp_path: Path
) -> None:
    ids = [await conversation(stub, ["hi", "what is 6*7"]), await conversation(stub, ["hi"])]
    folder = tmp_path / "exported"
    done = await turnlog(cli_env(tmp_path, database_url), "export", *ids, "-o", str(folder))
    assert done.returncode == 0, done.stderr.decode()
    paths = [folder / f"{cid}.jsonl" for cid in ids]
    files = [str(path) for path in paths]

    other = cli_env(tmp_path, fresh_database_url)  # no schema yet: the CLI migrates it
    first = await turnlog(other, "import", *files)
    assert first.returncode == 0, first.stderr.decode()
    report = first.stdout.decode().splitlines()
    assert len(report) == 2
    for cid, path, line in zip(ids, paths, report, strict=True):
        events = len(path.read_bytes().splitlines()) - 1
        assert line == (f"{path}: conversation {cid}: {events} events written, 0 already present")
    again = await turnlog(other, "import", *files)
    assert again.returncode == 0, again.stderr.decode()
    for line in again.stdout.decode().splitlines():
        assert ": 0 events written, " in line
        assert not line.endswith(", 0 already present")

    for cid, path in zip(ids, paths, strict=True):
        exported = await turnlog(other, "export", cid)
        assert exported.returncode == 0, exported.stderr.decode()
        assert exported.stdout == path.read_bytes() == await rpc_export(stub, cid)


async def test_a_rejected_import_file_does_not_stop_the_others(
    stub: Stub, fresh_database_url: str, tmp_path: Path
) -> None:
    cid = await conversation(stub, ["hi"])
    data = await rpc_export(stub, cid)
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(tamper(data, 3))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"not json\n")
    good = tmp_path / "good.jsonl"
    good.write_bytes(data)
    missing = tmp_path / "missing.jsonl"

    env = cli_env(tmp_path, fresh_database_url)
    done = await turnlog(env, "import", str(tampered), str(garbage), str(missing), str(good))
    assert done.returncode == 2
    errors = done.stderr.decode().splitlines()
    assert len(errors) == 3, done.stderr.decode()
    assert errors[0].startswith(f"turnlog import: {tampered}: version 3: hash mismatch")
    assert errors[1].startswith(f"turnlog import: {garbage}: line 1: not JSON")
    assert errors[2].startswith(f"turnlog import: {missing}: No such file or directory")
    assert done.stdout.decode().splitlines() == [
        f"{good}: conversation {cid}: {len(data.splitlines()) - 1} events written, "
        "0 already present"
    ]
    assert (await turnlog(env, "export", cid)).stdout == data  # the tampered file wrote nothing


async def test_verify_finds_a_raw_sql_edit_at_its_version(
    stub: Stub, database_url: str, tmp_path: Path
) -> None:
    cid = await conversation(stub, ["hi", "what is 6*7"])
    other = await conversation(stub, ["hi"])
    env = cli_env(tmp_path, database_url)
    latest = len((await rpc_export(stub, cid)).splitlines()) - 1

    intact = await turnlog(env, "verify", cid)
    assert intact.returncode == 0, intact.stderr.decode()
    assert intact.stdout.decode() == f"{cid}: intact, version {latest}\n"

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE turnlog.events SET data = replace(data::text, 'hi', 'yo')::json"
            " WHERE stream_id = %s AND stream_version = 3",
            (f"conversation-{cid}",),
        )
    edited = await turnlog(env, "verify", cid)
    assert edited.returncode == 1
    assert edited.stdout.decode().startswith(f"{cid}: broken at version 3 (hash_chain): ")

    every = await turnlog(env, "verify", "--all")
    assert every.returncode == 1
    lines = sorted(every.stdout.decode().splitlines())
    assert len(lines) == 2
    by_id = {line.split(":", 1)[0]: line for line in lines}
    assert by_id[other].startswith(f"{other}: intact, version ")
    assert by_id[cid].startswith(f"{cid}: broken at version 3 (hash_chain): ")


async def test_verify_file_needs_no_database(stub: Stub, tmp_path: Path) -> None:
    cid = await conversation(stub, ["hi", "what is 6*7"])
    data = await rpc_export(stub, cid)
    good = tmp_path / "good.jsonl"
    good.write_bytes(data)
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(tamper(data, 4))

    env = cli_env(tmp_path, None)
    data_dir = tmp_path / env["TURNLOG_DATA_DIR"]  # absolute already
    ok = await turnlog(env, "verify", "--file", str(good))
    assert ok.returncode == 0, ok.stderr.decode()
    assert ok.stdout.decode() == f"{good}: {cid}: intact, version {len(data.splitlines()) - 1}\n"

    broken = await turnlog(env, "verify", "--file", str(good), str(edited))
    assert broken.returncode == 1, broken.stderr.decode()
    lines = broken.stdout.decode().splitlines()
    assert lines[0].startswith(f"{good}: {cid}: intact")
    assert lines[1].startswith(f"{edited}: {cid}: broken at version 4 (hash_chain): ")

    piped = await turnlog(env, "verify", "--file", "-", stdin=data)
    assert (piped.returncode, piped.stdout.decode()) == (
        0,
        ok.stdout.decode().replace(str(good), "-"),
    )
    assert not (data_dir / "postgres").exists()  # no embedded server was started
    assert list(data_dir.iterdir()) == []

    header_only = tmp_path / "header-only.jsonl"
    header_only.write_bytes(data.splitlines(keepends=True)[0])
    empty = await turnlog(env, "verify", "--file", str(header_only))
    assert empty.returncode == 2
    assert one_error_line(empty) == f"turnlog verify: {header_only}: the file holds no events"


async def test_verify_file_checks_the_fold(
    stub: Stub, app: ConversationApplication, tmp_path: Path
) -> None:
    """A well-chained event that does not apply to the conversation is found offline too."""
    from turnlog.storage import NewEvent

    cid = await conversation(stub, ["hi"])
    sid = f"conversation-{cid}"
    version = await app.store.stream_version(sid)
    bogus = NewEvent(event_id=uuid.uuid4(), type="TurnCompleted", data={"turn_id": "nope"})
    await app.store.append(sid, [bogus], expected_version=version)
    exported = tmp_path / "bogus.jsonl"
    exported.write_bytes(await rpc_export(stub, cid))
    done = await turnlog(cli_env(tmp_path, None), "verify", "--file", str(exported))
    assert done.returncode == 1
    assert done.stdout.decode().startswith(
        f"{exported}: {cid}: broken at version {version + 1} (fold): TurnCompleted "
    )


async def test_missing_conversations_and_unreachable_databases_give_one_line(
    stub: Stub, database_url: str, tmp_path: Path
) -> None:
    cid = await conversation(stub, ["hi"])
    env = cli_env(tmp_path, database_url)
    for command in (["export", "nope"], ["verify", "nope"], ["export", cid, "--version", "99"]):
        done = await turnlog(env, *command)
        assert done.returncode == 2, command
        assert done.stdout == b""
        line = one_error_line(done)
        assert line.startswith(f"turnlog {command[0]}: conversation ")
        assert "not found" in line

    # Several: the others are still done.
    both = await turnlog(env, "verify", "nope", cid)
    assert both.returncode == 2
    assert both.stdout.decode().startswith(f"{cid}: intact")

    unreachable = cli_env(tmp_path, "postgresql://turnlog@127.0.0.1:9/turnlog?connect_timeout=5")
    for command in (["export", cid], ["verify", "--all"], ["import", "-"]):
        done = await turnlog(unreachable, *command, stdin=b"")
        assert done.returncode == 2, command
        assert "cannot reach the database" in one_error_line(done)

    usage = await turnlog(env, "export", cid, "other")  # several need -o FOLDER
    assert usage.returncode == 2
    assert b"-o FOLDER" in usage.stderr


async def test_atif_export_validates_against_the_schema(
    stub: Stub, database_url: str, tmp_path: Path
) -> None:
    ids = [await conversation(stub, ["what is 6*7", "leak a secret"]), await conversation(stub, [])]
    env = cli_env(tmp_path, database_url)
    one = await turnlog(env, "export", ids[0], "--format", "atif")
    assert one.returncode == 0, one.stderr.decode()
    assert one.stdout == await rpc_export(stub, ids[0], atif=True)

    folder = tmp_path / "atif"
    done = await turnlog(env, "export", "--all", "--format", "atif", "-o", str(folder))
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c}.atif.json" for c in ids)
    for cid in ids:
        trajectory = json.loads((folder / f"{cid}.atif.json").read_bytes())
        problems = [
            f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(trajectory)
        ]
        assert not problems
        assert trajectory["session_id"] == cid
