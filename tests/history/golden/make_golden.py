"""Records the golden conversation logs under tests/history/golden/ (run by hand, rarely).

    .venv/bin/python tests/history/golden/make_golden.py

Each `<name>.jsonl` is a JSONL export of one conversation recorded by the real
service code (ConversationApplication over PostgreSQL, the scripted worker
over gRPC), and `<name>.transcript.txt` is what `turnlog replay` printed for it
when it was recorded. The files are history: once committed they are never
regenerated, so they keep the event shapes of the release that wrote them,
and test_golden.py proves that the current code still replays them to the
same transcripts (upcasting old shapes). Run this only to add a new log;
it refuses to overwrite one.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc

from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    ServiceDefaults,
    TurnInput,
    TurnOptions,
)
from turnlog.conversation.tools import builtin_tools
from turnlog.domain import events as ev
from turnlog.engine.v1 import engine_pb2_grpc
from turnlog.guardrails.registry import BuiltinSettings, default_registry
from turnlog.history.service import ForkCommand, HistoryService
from turnlog.history.transcript import build_transcript, render_transcript
from turnlog.storage import PostgresEventStore
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.migrations import migrate
from turnlog.worker.client import EngineClient
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer

HERE = Path(__file__).parent
START_US = 1_750_000_000_000_000

# The scripted worker answers with the first reply whose `match` occurs
# anywhere in the rendered prompt (history included), so later turns' cues
# come first.
SCRIPT = {
    "model": "scripted-golden",
    "replies": [
        {
            "match": "keep counting",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}],
        },
        {"match": "math error", "text": "I cannot divide by zero."},
        {
            "match": "divide by zero",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "1/0"}}],
        },
        {"match": '"result": 42', "text": "6*7 is 42."},
        {
            "match": "what is 6*7",
            "text": "Let me compute.",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}],
        },
        {"match": "leak a secret", "text": "Sure, the forbidden word is kaboom, enjoy."},
        {"match": "mail me", "text": "Write to alice@example.com please."},
        {"match": "the answer is", "text": "It is 42."},
        {"match": "tell me a story", "text": "Once upon a time " * 40, "token_delay_ms": 15},
    ],
    "default": {"text": "Hello there."},
}


def ticking_clock() -> Callable[[], int]:
    now = START_US

    def clock() -> int:
        nonlocal now
        now += 1_000
        return now

    return clock


async def record(store: PostgresEventStore, engine: EngineClient) -> dict[str, str]:
    """Runs the golden conversations; returns {file name: conversation id}."""
    app = ConversationApplication(
        store,
        engine,
        tools=builtin_tools(lambda: START_US),
        guardrails=default_registry(BuiltinSettings(blocked_terms=("kaboom",))),
        defaults=ServiceDefaults(max_tool_round_trips=2),
        clock=ticking_clock(),
        instance="golden",
    )
    calculator = (ev.ToolDefinition(name="calculator"),)

    async def create(cid: str, **kwargs: object) -> None:
        await app.create(
            CreateConversation(conversation_id=cid, request_id=f"create-{cid}", **kwargs)
        )  # type: ignore[arg-type]

    async def send(cid: str, n: int, text: str, options: TurnOptions | None = None) -> None:
        await app.send(
            TurnInput(
                conversation_id=cid,
                content=text,
                request_id=f"{cid}-r{n}",
                options=options or TurnOptions(),
            )
        )

    await create(
        "golden-plain",
        system_prompt="Be brief.\nAnswer in English.",
        labels=(("env", "golden"), ("team", "replay")),
        defaults=TurnOptions(sampling=ev.SamplingParams(temperature=0.0, seed=7, max_tokens=64)),
    )
    await send("golden-plain", 1, "hi")
    await send(
        "golden-plain", 2, "the answer is", TurnOptions(sampling=ev.SamplingParams(top_p=0.9))
    )
    fork_version = (await app.load("golden-plain")).version
    await send("golden-plain", 3, "say something")

    await create("golden-tools", system_prompt="Use tools.", tools=calculator)
    await send("golden-tools", 1, "what is 6*7")
    await send("golden-tools", 2, "divide by zero")
    await send("golden-tools", 3, "keep counting", TurnOptions(max_tool_round_trips=1))

    await create("golden-guardrails", guardrail_profile="default")
    await send("golden-guardrails", 1, "mail me at bob@example.com")
    await send("golden-guardrails", 2, "just say kaboom")
    await send("golden-guardrails", 3, "leak a secret")
    await app.archive("golden-guardrails")

    history = HistoryService(store, clock=ticking_clock(), instance="golden")
    await history.fork(
        ForkCommand(
            source_id="golden-plain",
            version=fork_version,
            fork_id="golden-fork",
            request_id="fork-1",
        )
    )
    await send("golden-fork", 1, "and now?")

    # An interrupted turn: the database goes away while the turn streams, so
    # its end is never recorded; a new process finds it open at start-up and
    # closes it with TurnInterrupted, and the conversation goes on.
    await create("golden-interrupted", system_prompt="Tell stories.")
    await send("golden-interrupted", 1, "hi")
    turn_id = await app.start_turn(
        TurnInput(
            conversation_id="golden-interrupted",
            content="tell me a story",
            request_id="golden-interrupted-r2",
        )
    )
    while True:  # until some of the story is recorded
        events = await store.read_stream("conversation-golden-interrupted")
        started = next(i for i, e in enumerate(events) if e.data.get("turn_id") == turn_id)
        if any(e.type == "TextStreamed" for e in events[started:]):
            break
        await asyncio.sleep(0.05)
    return {"turn": turn_id}


async def main() -> int:
    names = ["plain", "tools", "guardrails", "fork", "interrupted"]
    existing = [n for n in names if (HERE / f"{n}.jsonl").exists()]
    if existing:
        print(f"refusing to overwrite committed golden logs: {existing}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        url = pg.url(pg.database)
        await migrate(url)
        server = grpc.aio.server()
        engine_pb2_grpc.add_EngineServiceServicer_to_server(
            EngineServicer(ScriptedEngine(Script.from_json(SCRIPT))), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with EngineClient([f"127.0.0.1:{port}"]) as engine:
            store = await PostgresEventStore.open(url)
            await record(store, engine)
            await store.close()  # mid-turn: the turn's end cannot be recorded
            await asyncio.sleep(1.0)
            store = await PostgresEventStore.open(url)
            restarted = ConversationApplication(
                store,
                engine,
                tools=builtin_tools(lambda: START_US),
                clock=ticking_clock(),
                instance="golden-2",
            )
            closed = await restarted.close_interrupted_turns()
            assert closed, "the interrupted turn was not found open"
            await restarted.send(
                TurnInput(
                    conversation_id="golden-interrupted",
                    content="the answer is",
                    request_id="golden-interrupted-r3",
                )
            )
            history = HistoryService(store)
            for name in names:
                cid = f"golden-{name}"
                data = b"".join([c async for c in history.export_jsonl(cid)])
                (HERE / f"{name}.jsonl").write_bytes(data)
                events = await store.read_stream(f"conversation-{cid}")
                text = render_transcript(build_transcript(events))
                (HERE / f"{name}.transcript.txt").write_text(text)
                print(f"{name}: {len(events)} events")
            await store.close()
        await server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
