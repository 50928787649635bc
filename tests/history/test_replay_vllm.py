"""`turnlog replay --regenerate` against the seeded vLLM CPU worker reproduces every turn.

A conversation is recorded through the real service code on the session's
vLLM worker with seeded sampling at temperature 0.8 (so sampling really
draws), including a turn with a tool round trip; it is exported; then the
`turnlog replay` command, with no database, regenerates every turn from the
export file against the same worker and must report the recorded text of
every generation, and nothing else differing.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from worker_processes import WorkerProcess

from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    TurnInput,
    TurnOptions,
    wall_clock_us,
)
from turnlog.conversation.tools import builtin_tools
from turnlog.domain import events as ev
from turnlog.history.service import HistoryService
from turnlog.history.transcript import build_transcript
from turnlog.storage import PostgresEventStore
from turnlog.worker.client import EngineClient

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

TOOL_CALL_REGEX = (
    r'<tool_call>\n\{"name": "calculator", "arguments": '
    r'\{"expression": "[1-9] \* [1-9]"\}\}\n</tool_call>'
)


@pytest.fixture
async def vllm_app(
    store: PostgresEventStore, vllm_worker: WorkerProcess
) -> AsyncIterator[ConversationApplication]:
    async with EngineClient([vllm_worker.target]) as engine:
        app = ConversationApplication(store, engine, tools=builtin_tools(wall_clock_us))
        yield app
        await app.shutdown()


async def test_replay_regenerate_reproduces_every_recorded_turn(
    vllm_app: ConversationApplication,
    store: PostgresEventStore,
    vllm_worker: WorkerProcess,
    tmp_path: Path,
) -> None:
    await vllm_app.create(
        CreateConversation(
            conversation_id="seeded",
            system_prompt="You are a calculator assistant.",
            tools=(ev.ToolDefinition(name="calculator"),),
            defaults=TurnOptions(
                sampling=ev.SamplingParams(temperature=0.8, seed=1234, max_tokens=24),
                max_tool_round_trips=1,
            ),
        )
    )
    turns = [
        ("t1", "What is 6 * 7?", ev.SamplingParams(regex=TOOL_CALL_REGEX, max_tokens=64)),
        ("t2", "Thanks. Tell me about the number.", ev.SamplingParams()),
        ("t3", "And once more, differently.", ev.SamplingParams(seed=99)),
    ]
    for request_id, text, sampling in turns:
        await vllm_app.send(
            TurnInput(
                conversation_id="seeded",
                content=text,
                request_id=request_id,
                options=TurnOptions(sampling=sampling),
            )
        )
    recorded = build_transcript(await store.read_stream("conversation-seeded"))
    outcomes = [(t.status.value, t.outcome_reason, t.usage.prompt_tokens) for t in recorded.turns]
    assert [o[0] for o in outcomes] == ["completed"] * 3, outcomes
    assert len(recorded.turns[0].generations) == 2  # the tool call, then the answer
    assert recorded.turns[0].tool_outcomes[0].ok
    texts = [g.text for t in recorded.turns for g in t.generations]
    assert all(texts)

    export = tmp_path / "seeded.jsonl"
    export.write_bytes(b"".join([c async for c in HistoryService(store).export_jsonl("seeded")]))
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TURNLOG_DATABASE_URL"}
    env["TURNLOG_DATA_DIR"] = str(tmp_path / "no-database")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "turnlog.cli",
        "replay",
        "--file",
        str(export),
        "--regenerate",
        "--worker",
        vllm_worker.target,
        "--json",
        str(report_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=240)
    output = stdout.decode()
    assert process.returncode == 0, output + stderr.decode()
    assert output.endswith("3 of 3 regenerated turn(s) match the record\n")
    report = json.loads(await asyncio.to_thread(report_path.read_text))
    assert report["all_same"] is True
    assert [t["differences"] for t in report["turns"]] == [[], [], []]
    regenerated = [text for t in report["turns"] for text in t["regenerated_texts"]]
    assert regenerated == texts
    assert not await asyncio.to_thread((tmp_path / "no-database").exists)  # no database
