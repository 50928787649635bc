"""`regenerate`: recorded turns re-run against a worker, compared turn by turn.

The scripted worker here is the one the golden logs were recorded with
(`golden/make_golden.py`), so an unchanged worker must reproduce every turn;
a worker that now answers differently must be reported, turn by turn.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from turnlog.conversation.tools import builtin_tools
from turnlog.domain import events as ev
from turnlog.domain.state import TurnStatus
from turnlog.engine.v1 import engine_pb2_grpc
from turnlog.guardrails.registry import BuiltinSettings, GuardrailRegistry, default_registry
from turnlog.history import jsonl
from turnlog.history.regenerate import ForkTarget, compare_turns, regenerate, render_report
from turnlog.history.service import HistoryService
from turnlog.history.transcript import GenerationRecord, TurnRecord
from turnlog.storage import PostgresEventStore, RecordedEvent
from turnlog.worker.client import EngineClient
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import SCRIPT, START_US  # noqa: E402


def golden(name: str) -> list[RecordedEvent]:
    data = (GOLDEN / f"{name}.jsonl").read_bytes()
    return [e.to_recorded() for e in jsonl.read_jsonl(jsonl.split_lines(data))]


async def scripted_engine(script: dict[str, Any]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(
        EngineServicer(ScriptedEngine(Script.from_json(script))), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def engine() -> AsyncIterator[EngineClient]:
    server, target = await scripted_engine(SCRIPT)
    async with EngineClient([target]) as client:
        yield client
    await server.stop(0)


def guardrails() -> GuardrailRegistry:
    return default_registry(BuiltinSettings(blocked_terms=("kaboom",)))


async def run(name: str, engine: EngineClient, **kwargs: Any) -> Any:
    return await regenerate(
        golden(name),
        engine=engine,
        guardrails=guardrails(),
        tools=builtin_tools(lambda: START_US),
        **kwargs,
    )


@pytest.mark.parametrize("name", ["plain", "tools", "fork"])
async def test_the_same_worker_reproduces_every_turn(name: str, engine: EngineClient) -> None:
    report = await run(name, engine)
    assert report.turns
    assert [t.differences for t in report.turns] == [[] for _ in report.turns]
    assert report.all_same
    assert all(t.regenerated is not None for t in report.turns)


async def test_tool_turns_rerun_their_tools(engine: EngineClient) -> None:
    report = await run("tools", engine)
    outcomes = [[(o.ok, o.text) for o in t.regenerated.tool_outcomes] for t in report.turns]
    assert outcomes == [
        [(True, '{"result": 42}')],
        [(False, "math error: ZeroDivisionError")],
        [(True, '{"result": 2}')],
    ]


async def test_unfinished_turns_are_skipped_and_said_so(engine: EngineClient) -> None:
    report = await run("interrupted", engine)
    assert [bool(t.skipped) for t in report.turns] == [False, True, False]
    assert "interrupted" in report.turns[1].skipped
    assert report.all_same
    assert "turn 2 [golden-interrupted-r2]: skipped (interrupted" in render_report(report)


async def test_guardrail_verdicts_are_compared(engine: EngineClient) -> None:
    """The log keeps the user's text redacted, so the request PII stage now allows it."""
    report = await run("guardrails", engine)
    first, blocked_request, blocked_response = report.turns
    assert first.differences == [
        "guardrail verdicts: sanitize_request/pii_redaction: modify -> allow"
    ]
    assert blocked_request.same
    assert blocked_response.same, blocked_response.differences
    # Without the blocked term configured today, both blocked turns now run.
    lenient = await regenerate(
        golden("guardrails"),
        engine=engine,
        guardrails=default_registry(),
        tools=builtin_tools(lambda: START_US),
    )
    assert lenient.turns[1].differences[0] == "outcome: blocked (None) -> completed (stop)"
    assert lenient.turns[2].differences[0] == "outcome: blocked (None) -> completed (stop)"


async def test_a_changed_worker_is_reported_turn_by_turn() -> None:
    script = copy.deepcopy(SCRIPT)
    for reply in script["replies"]:
        if reply["match"] == "the answer is":
            reply["text"] = "It is 43."
    server, target = await scripted_engine(script)
    async with EngineClient([target]) as client:
        report = await run("plain", client)
    await server.stop(0)
    assert [t.same for t in report.turns] == [True, False, False]
    (difference,) = report.turns[1].differences
    assert difference.startswith("generation 1 text differs from character 7:")
    assert "-It is 42." in difference
    assert "+It is 43." in difference
    assert not report.all_same
    text = render_report(report)
    assert "turn 2 [golden-plain-r2]: 1 difference(s)" in text
    assert text.endswith("1 of 3 regenerated turn(s) match the record\n")


async def test_at_a_version_regenerates_only_the_turns_before_it(engine: EngineClient) -> None:
    events = golden("plain")
    second_end = 27  # golden-fork forked golden-plain here: the end of turn 2
    report = await regenerate(
        events,
        engine=engine,
        guardrails=guardrails(),
        tools=builtin_tools(lambda: START_US),
        at=second_end,
    )
    assert [t.recorded.number for t in report.turns] == [1, 2]
    assert report.version == second_end


async def test_regenerated_turns_can_be_written_to_forks_and_the_source_is_untouched(
    engine: EngineClient, store: PostgresEventStore
) -> None:
    data = (GOLDEN / "tools.jsonl").read_bytes()
    history = HistoryService(store)
    await history.import_jsonl(data)
    before = await store.read_stream("conversation-golden-tools")
    report = await regenerate(
        before,
        engine=engine,
        guardrails=guardrails(),
        tools=builtin_tools(lambda: START_US),
        fork=ForkTarget(store=store, prefix="retry"),
    )
    assert report.all_same
    assert [t.fork_id for t in report.turns] == ["retry-1", "retry-2", "retry-3"]
    assert await store.read_stream("conversation-golden-tools") == before
    for turn in report.turns:
        fork = await history.verify(turn.fork_id)
        assert fork.ok
        assert fork.state.forked_from == ("golden-tools", turn.recorded.start_version - 1)
        assert fork.state.turns[-1].request_id == turn.recorded.request_id


def _blocked_turn(shown: str, status: TurnStatus = TurnStatus.BLOCKED) -> TurnRecord:
    turn = TurnRecord(
        number=1,
        turn_id="t",
        request_id="r",
        start_version=2,
        sampling=ev.SamplingParams(),
        max_tool_round_trips=1,
        status=status,
    )
    turn.steps.append(
        GenerationRecord(
            generation_id="t/1", model="m", sampling=ev.SamplingParams(), streamed=[shown]
        )
    )
    return turn


def test_text_shown_before_a_block_is_compared_up_to_the_shorter_release() -> None:
    """How much text a guardrail released before the blocked term arrived is delivery timing."""
    recorded = _blocked_turn("Sure, the forbidden word is")
    assert compare_turns(recorded, _blocked_turn("Sure, the")) == []
    assert compare_turns(recorded, _blocked_turn("")) == []
    # Something else said before the block still differs...
    (difference,) = compare_turns(recorded, _blocked_turn("Sure, a different"))
    assert difference.startswith("generation 1 text differs from character 6:")
    # ... and so does a shorter text when the turn was not blocked both times.
    differences = compare_turns(recorded, _blocked_turn("Sure, the", TurnStatus.CANCELLED))
    assert differences[0] == "outcome: blocked (None) -> cancelled (None)"
    assert differences[1].startswith("generation 1 text differs from character 9:")
