"""`turnlog replay`, run as a real process: transcripts from files and the log, regeneration."""

from __future__ import annotations

import asyncio
import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from history.test_history_cli import cli_env, one_error_line, turnlog
from history.test_regenerate import GOLDEN, SCRIPT, scripted_engine

from turnlog.history.service import HistoryService
from turnlog.history.transcript import build_transcript, render_transcript
from turnlog.storage import PostgresEventStore


@pytest.mark.parametrize("name", ["plain", "fork", "interrupted"])
async def test_replay_of_an_export_file_prints_its_transcript_without_a_database(
    name: str, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, None)
    done = await turnlog(env, "replay", "--file", str(GOLDEN / f"{name}.jsonl"))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == (GOLDEN / f"{name}.transcript.txt").read_text()
    assert await asyncio.to_thread(os.listdir, env["TURNLOG_DATA_DIR"]) == []  # no database


async def test_replay_from_the_log_at_a_version(
    store: PostgresEventStore, database_url: str, tmp_path: Path
) -> None:
    await HistoryService(store).import_jsonl((GOLDEN / "plain.jsonl").read_bytes())
    env = cli_env(tmp_path, database_url)
    done = await turnlog(env, "replay", "conversations/golden-plain")
    assert done.stdout.decode() == (GOLDEN / "plain.transcript.txt").read_text()
    at = await turnlog(env, "replay", "golden-plain", "--at", "27")
    events = await store.read_stream("conversation-golden-plain")
    assert at.stdout.decode() == render_transcript(build_transcript(events, at=27))
    assert at.stdout.decode().startswith("conversation golden-plain at version 27\n")
    assert "turn 3" not in at.stdout.decode()


async def test_replay_regenerate_reports_per_turn_and_sets_the_exit_code(
    store: PostgresEventStore, database_url: str, tmp_path: Path
) -> None:
    server, target = await scripted_engine(SCRIPT)
    changed: dict[str, Any] = copy.deepcopy(SCRIPT)
    for reply in changed["replies"]:
        if reply["match"] == "math error":
            reply["text"] = "Division by zero is undefined."
    other, other_target = await scripted_engine(changed)
    try:
        env = cli_env(tmp_path, None)
        tools = str(GOLDEN / "tools.jsonl")
        same = await turnlog(env, "replay", "--file", tools, "--regenerate", "--worker", target)
        assert same.returncode == 0, same.stderr.decode()
        assert same.stdout.decode().splitlines() == [
            "regenerated conversation golden-tools up to version 73",
            "turn 1 [golden-tools-r1]: same (not seeded: sampling may differ)",
            "turn 2 [golden-tools-r2]: same (not seeded: sampling may differ)",
            "turn 3 [golden-tools-r3]: same (not seeded: sampling may differ)",
            "3 of 3 regenerated turn(s) match the record",
        ]
        report_path = tmp_path / "report.json"
        differs = await turnlog(
            env, "replay", "--file", tools, "--regenerate", "--worker", other_target,
            "--json", str(report_path),
        )  # fmt: skip
        assert differs.returncode == 1
        assert "turn 2 [golden-tools-r2]: 1 difference(s)" in differs.stdout.decode()
        report = json.loads(report_path.read_text())
        assert [t["same"] for t in report["turns"]] == [True, False, True]
        assert report["turns"][1]["regenerated_texts"][-1] == "Division by zero is undefined."

        # Into forks in the log: the source stays as it was.
        await HistoryService(store).import_jsonl((GOLDEN / "tools.jsonl").read_bytes())
        before = await store.read_stream("conversation-golden-tools")
        db_env = cli_env(tmp_path, database_url)
        forked = await turnlog(
            db_env, "replay", "golden-tools", "--regenerate", "--worker", target,
            "--fork-prefix", "again", "--at", "40",
        )  # fmt: skip
        assert forked.returncode == 0, forked.stderr.decode()
        assert "turn 1 [golden-tools-r1]: same in fork again-1" in forked.stdout.decode()
        assert await store.read_stream("conversation-golden-tools") == before
        assert (await store.read_stream("conversation-again-1"))[0].type == "ConversationForked"
    finally:
        await server.stop(0)
        await other.stop(0)


async def test_replay_usage_and_input_errors_give_exit_2_and_one_line(tmp_path: Path) -> None:
    env = cli_env(tmp_path, None)
    tools = str(GOLDEN / "tools.jsonl")
    no_worker = await turnlog(env, "replay", "--file", tools, "--regenerate")
    assert no_worker.returncode == 2
    assert "--regenerate needs --worker" in no_worker.stderr.decode()
    fork_of_file = await turnlog(
        env, "replay", "--file", tools, "--regenerate", "--worker", "127.0.0.1:1",
        "--fork-prefix", "x",
    )  # fmt: skip
    assert fork_of_file.returncode == 2
    missing = await turnlog(env, "replay", "--file", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert "No such file" in one_error_line(missing)
    wrong_id = await turnlog(env, "replay", "someone-else", "--file", tools)
    assert wrong_id.returncode == 2
    assert "no conversation 'someone-else'" in one_error_line(wrong_id)
    edited = tmp_path / "edited.jsonl"
    lines = (GOLDEN / "tools.jsonl").read_bytes().splitlines(keepends=True)
    edited.write_bytes(b"".join(lines[:5] + lines[6:]))  # an event missing: no fold
    broken = await turnlog(env, "replay", "--file", str(edited))
    assert broken.returncode == 2
    assert one_error_line(broken).startswith("turnlog replay: the log does not replay: version")


async def test_replay_writes_the_transcript_as_json(tmp_path: Path) -> None:
    out = tmp_path / "transcript.json"
    done = await turnlog(
        cli_env(tmp_path, None), "replay", "--file", str(GOLDEN / "tools.jsonl"), "--json", str(out)
    )
    assert done.returncode == 0, done.stderr.decode()
    data = json.loads(await asyncio.to_thread(out.read_text))
    assert (data["conversation_id"], data["version"]) == ("golden-tools", 73)
    assert data["settings"]["tools"][0]["name"] == "calculator"
    assert [t["user_text"] for t in data["turns"]] == [
        "what is 6*7",
        "divide by zero",
        "keep counting",
    ]
    first = data["turns"][0]["steps"]
    generations = [s for s in first if s["kind"] == "generation"]
    assert [g["text"] for g in generations][-1] == "6*7 is 42."
    assert generations[0]["tool_calls"][0]["arguments_json"] == '{"expression": "6*7"}'
    assert {
        "kind": "tool_result",
        "call_id": "call_0",
        "ok": True,
        "text": '{"result": 42}',
    } in first
    assert [s["verdict"] for s in first if s["kind"] == "GuardrailDecided"][:2] == [
        "allow",
        "allow",
    ]
