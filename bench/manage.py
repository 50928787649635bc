"""One page of a long conversation: ListMessages and ListTurns against GetConversation.

Run: .venv/bin/python bench/manage.py [--dsn URL] [--turns N] [--reps R] [--json PATH]

Without --dsn it starts an embedded PostgreSQL in a temporary folder (removed
afterwards); --dsn names an empty or migrated database. One conversation of
--turns turns (default 1,000: 2,001 messages with the system message) is
written through `PostgresEventStore.append`, each turn as the service records
it (TurnStarted, the user message, GenerationStarted, GenerationCompleted
with token ids, TurnCompleted). `turnlog serve`'s own gRPC server (no
engine, authentication and validation on) then answers, over loopback:

- `ListMessages` first page (100), and a page from the middle (by its token);
- `ListTurns` first page (50);
- `GetConversation` with its defaults (the latest 100 messages and turns),
  and with message_limit and turn_limit 1,000;
- the same first ListMessages page with the state cache emptied before each
  call (a load from the latest snapshot, or the whole fold without one);
- ListConversations, a page of 50 (49 conversations of 10 turns and the
  long one): each entry is the conversation's latest state, read through
  the state cache; warm, and with the cache emptied before each call.

Each figure is the median milliseconds of --reps calls after one warm-up;
the state cache is warm unless said. Every page is checked (sizes, the system
message first, total_size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from turnlog.api.server import grpc_server
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.channel import credentialed_channel
from turnlog.auth.principal import Scope
from turnlog.auth.settings import AuthSettings
from turnlog.conversation.application import ConversationApplication
from turnlog.domain import events as ev
from turnlog.storage import PostgresEventStore
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.migrations import migrate
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc


async def build(store: PostgresEventStore, app: ConversationApplication, turns: int) -> str:
    """One conversation of `turns` turns; returns its id."""
    cid = f"bench-{uuid.uuid4().hex[:12]}"
    created = ev.ConversationCreated(
        conversation_id=cid, created_at_us=1, system_prompt="You are a helpful assistant."
    )
    new = app.repository.new_event
    await store.append(f"conversation-{cid}", [new(str(uuid.uuid4()), created)], expected_version=0)
    version = 1
    for n in range(turns):
        tid = f"t{n}"
        batch: list[ev.Event] = [
            ev.TurnStarted(turn_id=tid, request_id=tid, started_at_us=n + 2),
            ev.MessageAppended(
                message_id=f"m{n}", role=ev.Role.USER, content=f"question {n} " * 20, turn_id=tid
            ),
            ev.GenerationStarted(
                turn_id=tid,
                generation_id=f"g{n}",
                worker="w",
                model="m",
                sampling=ev.SamplingParams(),
            ),
            ev.GenerationCompleted(
                turn_id=tid,
                generation_id=f"g{n}",
                text=f"answer {n} " * 60,
                token_ids=tuple(range(120)),
                finish_reason=ev.FinishReason.STOP,
                usage=ev.Usage(prompt_tokens=100, completion_tokens=120),
                model="m",
                sampling=ev.SamplingParams(),
            ),
            ev.TurnCompleted(
                turn_id=tid, completed_at_us=n + 3, finish_reason=ev.FinishReason.STOP
            ),
        ]
        await store.append(
            f"conversation-{cid}",
            [new(str(uuid.uuid4()), e) for e in batch],
            expected_version=version,
        )
        version += len(batch)
    return cid


async def timed(reps: int, call: Callable[[], Awaitable[Any]]) -> float:
    await call()
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        await call()
        runs.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(runs), 2)


async def bench(dsn: str, turns: int, reps: int) -> dict[str, float]:
    await migrate(dsn)
    store = await PostgresEventStore.open(dsn)
    app = ConversationApplication(store, None)
    auth_dir = tempfile.TemporaryDirectory(prefix="turnlog-bench-auth-")
    authenticator = Authenticator(AuthSettings.local_default(Path(auth_dir.name)))
    assert authenticator.local_key is not None
    token = authenticator.local_key.mint_token(scopes=(Scope.READ,), subject="bench", ttl_s=3600)
    server, _ = grpc_server(app, authenticator=authenticator)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        small = [await build(store, app, 10) for _ in range(49)]
        cid = await build(store, app, turns)
        name = f"conversations/{cid}"
        messages = 2 * turns + 1
        async with credentialed_channel(f"127.0.0.1:{port}", token) as channel:
            stub = sgrpc.ConversationServiceStub(channel)

            first = await stub.ListMessages(spb.ListMessagesRequest(conversation=name))
            assert len(first.messages) == 100
            assert first.total_size == messages
            assert first.messages[0].role == pb.ROLE_SYSTEM
            middle_token = first.next_page_token
            for _ in range(turns // 100 - 1):
                page = await stub.ListMessages(
                    spb.ListMessagesRequest(conversation=name, page_token=middle_token)
                )
                middle_token = page.next_page_token
            got = await stub.GetConversation(spb.GetConversationRequest(name=name))
            assert len(got.conversation.messages) == 101
            assert got.conversation.message_count == messages

            async def list_first() -> None:
                await stub.ListMessages(spb.ListMessagesRequest(conversation=name))

            async def list_cold() -> None:
                app.repository.forget(cid)
                await list_first()

            async def conversations() -> None:
                page = await stub.ListConversations(spb.ListConversationsRequest(page_size=50))
                assert len(page.conversations) == 50

            async def conversations_cold() -> None:
                for each in [cid, *small]:
                    app.repository.forget(each)
                await conversations()

            figures = {
                "list_messages_first_page_ms": await timed(reps, list_first),
                "list_messages_middle_page_ms": await timed(
                    reps,
                    lambda: stub.ListMessages(
                        spb.ListMessagesRequest(conversation=name, page_token=middle_token)
                    ),
                ),
                "list_turns_first_page_ms": await timed(
                    reps, lambda: stub.ListTurns(spb.ListTurnsRequest(conversation=name))
                ),
                "get_conversation_default_ms": await timed(
                    reps, lambda: stub.GetConversation(spb.GetConversationRequest(name=name))
                ),
                "get_conversation_1000_ms": await timed(
                    reps,
                    lambda: stub.GetConversation(
                        spb.GetConversationRequest(name=name, message_limit=1000, turn_limit=1000)
                    ),
                ),
                "list_messages_first_page_cold_cache_ms": await timed(reps, list_cold),
                "list_conversations_50_ms": await timed(reps, conversations),
                "list_conversations_50_cold_cache_ms": await timed(reps, conversations_cold),
            }
    finally:
        await server.stop(0)
        await authenticator.aclose()
        await store.close()
        auth_dir.cleanup()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an empty or migrated database (default: embedded)")
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.turns < 200:
        parser.error("--turns must be at least 200 (a middle page is read)")
    server: EmbeddedPostgres | None = None
    pg_dir: Path | None = None
    dsn = args.dsn
    try:
        if dsn is None:
            pg_dir = Path(tempfile.mkdtemp(prefix="turnlog-bench-manage-"))
            server = EmbeddedPostgres(pg_dir / "pg")
            dsn = server.start()
        figures = asyncio.run(bench(dsn, args.turns, args.reps))
    finally:
        if server is not None:
            server.stop()
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)
    for key, value in figures.items():
        print(f"{key:45s} {value:10.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
