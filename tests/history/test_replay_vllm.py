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
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest
from history.test_history_cli import turnlog as run_turnlog
from worker_processes import WorkerProcess

from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    TurnInput,
    TurnOptions,
)
from turnlog.conversation.tools import builtin_tools
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import fold
from turnlog.eventlog import wall_clock_us
from turnlog.history.service import ForkCommand, HistoryService, normalized
from turnlog.history.transcript import build_transcript, render_transcript
from turnlog.storage import PostgresEventStore
from turnlog.worker.client import EngineClient

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

SCHEMA = json.loads((Path(__file__).parent / "atif-v1.8.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

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


async def turnlog(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`turnlog ARGS` as a subprocess: exit code, stdout, stderr."""
    done = await run_turnlog(env, *args)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_a_conversation_recorded_on_vllm_replays_forks_verifies_regenerates_and_exports(
    vllm_app: ConversationApplication,
    store: PostgresEventStore,
    database_url: str,
    vllm_worker: WorkerProcess,
    tmp_path: Path,
) -> None:
    """The issue's Done-when on one conversation recorded in CI on the vLLM CPU worker."""
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

    history = HistoryService(store)
    export = tmp_path / "seeded.jsonl"
    export.write_bytes(b"".join([c async for c in history.export_jsonl("seeded")]))
    no_db = {k: v for k, v in os.environ.items() if k != "TURNLOG_DATABASE_URL"}
    no_db["TURNLOG_DATA_DIR"] = str(tmp_path / "no-database")
    with_db = {**no_db, "TURNLOG_DATABASE_URL": database_url}

    # Replayed from the database and from the export file: the same transcript.
    stored = await store.read_stream("conversation-seeded")
    expected = render_transcript(build_transcript(stored))
    assert await turnlog(with_db, "replay", "seeded") == (0, expected, "")
    assert await turnlog(no_db, "replay", "--file", str(export)) == (0, expected, "")
    # Verified, and forked at every version: each fork verifies and holds that prefix.
    assert (await history.verify("seeded")).ok
    for version in range(1, len(stored) + 1):
        fork = await history.fork(ForkCommand(source_id="seeded", version=version))
        fork_stream = f"conversation-{fork.state.conversation_id}"
        assert (await history.verify(fork.state.conversation_id)).ok
        copied = await store.read_stream(fork_stream, limit=fork.prefix_version)
        at_fork = fold(codec.decode_stored(e) for e in copied)
        source = fold(codec.decode_stored(e) for e in stored[:version])
        offset = fork.prefix_version - version
        assert normalized(at_fork, version_offset=offset) == normalized(source, version_offset=0)
    # Exported as ATIF that validates against the published schema.
    atif = json.loads(b"".join([c async for c in history.export_atif("seeded")]))
    VALIDATOR.validate(atif)

    # Regenerated from the export file with no database: every turn reproduced.
    report_path = tmp_path / "report.json"
    code, output, errors_ = await turnlog(
        no_db, "replay", "--file", str(export), "--regenerate",
        "--worker", vllm_worker.target, "--json", str(report_path),
    )  # fmt: skip
    assert code == 0, output + errors_
    assert output.endswith("3 of 3 regenerated turn(s) match the record\n")
    report = json.loads(await asyncio.to_thread(report_path.read_text))
    assert report["all_same"] is True
    assert [t["differences"] for t in report["turns"]] == [[], [], []]
    regenerated = [text for t in report["turns"] for text in t["regenerated_texts"]]
    assert regenerated == texts
    assert not await asyncio.to_thread((tmp_path / "no-database").exists)  # no database
