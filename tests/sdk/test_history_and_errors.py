"""The SDK's reads against a live service: typed history, paging, subscriptions, export, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path

import grpc
import pytest
from sdk_helpers import Service
from tcp_proxy import TcpProxy

from turnlog.api.limits import RateLimit
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import errors_pb2
from turnlog.v1 import history_pb2 as hpb
from turnlog_client import (
    NO_RETRY,
    Aborted,
    AsyncTurnlogClient,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Transcript,
    Unauthenticated,
    verify_export,
)

pytestmark = pytest.mark.timeout(90)

GOLDEN = Path(__file__).resolve().parents[1] / "history" / "golden"


async def _conversation_with_history(client: AsyncTurnlogClient) -> str:
    """A conversation with a plain turn, a server-side tool turn, a cancelled turn, archived."""
    conversation = await client.create_conversation(system_prompt="Be brief.")
    await client.send_message(conversation.name, "hi")
    await client.send_message(conversation.name, "what is 6*7")
    turn = client.converse(conversation.name, "slow story")
    async for event in turn:
        if event.HasField("text_delta"):
            await turn.cancel()
    await client.archive_conversation(conversation.name)
    return conversation.name


async def test_the_typed_transcript_equals_the_services_fold(client: AsyncTurnlogClient) -> None:
    name = await _conversation_with_history(client)
    fork = await client.fork_conversation(name, version=6)
    for conversation in (name, fork.conversation.name):
        folded = await client.get_conversation(conversation)
        transcript = await client.transcript(conversation)
        assert transcript.version == folded.version
        assert [m.SerializeToString() for m in transcript.messages] == [
            m.SerializeToString() for m in folded.messages
        ]
        assert [(t.turn_id, t.status) for t in transcript.turns] == [
            (t.turn_id, t.status) for t in folded.turns
        ]
        assert transcript.archived == (folded.state == pb.CONVERSATION_STATE_ARCHIVED)
    assert {pb.TURN_STATUS_COMPLETED, pb.TURN_STATUS_CANCELLED} <= {
        t.status for t in (await client.transcript(name)).turns
    }
    assert (await client.transcript(fork.conversation.name)).forked_from == (name, 6)
    # As of a version: the service's time travel and the client's fold agree.
    at_4 = await client.transcript(name, version=4)
    assert [m.content for m in at_4.messages] == [
        m.content for m in (await client.get_conversation(name, version=4)).messages
    ]
    # Every event read with view BOTH carries its stored text and its typed form.
    both = [e async for e in client.read_events(name, view=hpb.EVENT_VIEW_BOTH)]
    assert all(e.data_json and e.WhichOneof("event") for e in both)
    assert Transcript.fold(both).messages == (await client.transcript(name)).messages


async def test_paging_iterators_yield_everything_once(client: AsyncTurnlogClient) -> None:
    created = [
        (await client.create_conversation(labels={"suite": "paging"})).name for _ in range(7)
    ]
    listed = [
        c.name async for c in client.list_conversations(labels={"suite": "paging"}, page_size=2)
    ]
    assert sorted(listed) == sorted(created)
    assert len(listed) == len(set(listed)) == 7
    name = await _conversation_with_history(client)
    one_page = [e.version async for e in client.read_events(name, page_size=1000)]
    paged = [e.version async for e in client.read_events(name, page_size=3)]
    assert paged == one_page == list(range(1, len(one_page) + 1))
    everything = [e.position async for e in client.read_events(page_size=5)]
    assert len(everything) == len(set(everything)) > len(one_page)


async def test_a_subscription_resumes_after_a_cut_from_its_last_position(
    service: Service, client: AsyncTurnlogClient
) -> None:
    conversation = await client.create_conversation()
    async with TcpProxy(service.address) as proxy, service.client(proxy.address) as watcher:
        subscription = watcher.subscribe_events(conversation.name)
        versions: list[int] = []

        async def watch() -> None:
            async for event in subscription:
                versions.append(event.version)
                if len(versions) >= 2 and event.type == "TurnCompleted":
                    return

        watching = asyncio.create_task(watch())
        while not subscription.caught_up:  # noqa: ASYNC110 (a flag the iterator sets)
            await asyncio.sleep(0.05)
        proxy.cut()
        await client.send_message(conversation.name, "hi")  # recorded while cut off
        proxy.restore()
        await asyncio.wait_for(watching, 30)
    assert subscription.resubscriptions >= 1
    assert versions == list(range(1, versions[-1] + 1)), "a gap or a duplicate"
    assert subscription.version == versions[-1]


async def test_export_verifies_offline_and_a_flipped_byte_is_found(
    client: AsyncTurnlogClient,
) -> None:
    name = await _conversation_with_history(client)
    exported = await client.export_conversation(name)
    [report] = verify_export(exported)
    assert report.intact
    assert (
        report.events_checked
        == report.last_version
        == (await client.get_conversation(name)).version
    )
    lines = exported.splitlines(keepends=True)
    event = json.loads(lines[3])
    event["data_json"] = event["data_json"].replace('"', "'", 1)
    tampered = b"".join([*lines[:3], json.dumps(event).encode() + b"\n", *lines[4:]])
    [broken] = verify_export(tampered)
    assert not broken.intact
    assert broken.broken_version == 3
    assert "hash mismatch" in broken.problem


def test_the_offline_verifier_agrees_with_the_services_on_the_golden_logs() -> None:
    from turnlog.history.jsonl import verify_exported

    files = sorted(GOLDEN.glob("*.jsonl"))
    assert len(files) >= 5
    for path in files:
        data = path.read_bytes()
        ours = verify_export(data)
        theirs = verify_exported(data.splitlines())
        assert [(r.stream_id, r.events_checked, r.last_version, r.intact) for r in ours] == [
            (r.stream_id, r.events_checked, r.last_version, r.broken_at_version is None)
            for r in theirs
        ]
        assert all(r.intact for r in ours)
        # One flipped byte inside the stored text of each event: both find it there.
        lines = data.splitlines(keepends=True)
        for index in range(1, len(lines)):
            start = lines[index].index(b'"data_json":"')
            at = start + re.search(rb"[a-z]", lines[index][start + 13 :]).start() + 13  # type: ignore[union-attr]
            flipped = bytearray(lines[index])
            flipped[at] ^= 0x01
            tampered = b"".join([*lines[:index], bytes(flipped), *lines[index + 1 :]])
            [ours_broken] = [r for r in verify_export(tampered) if not r.intact]
            [theirs_broken] = [
                r for r in verify_exported(tampered.splitlines()) if r.broken_at_version
            ]
            assert ours_broken.broken_version == theirs_broken.broken_at_version == index


async def test_errors_are_classes_with_reason_and_retryable(
    service: Service, client: AsyncTurnlogClient
) -> None:
    with pytest.raises(NotFound) as missing:
        await client.get_conversation("no-such-conversation")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.reason
    assert missing.value.error_reason != errors_pb2.ERROR_REASON_UNSPECIFIED  # a listed reason
    assert not missing.value.retryable

    with pytest.raises(InvalidArgument) as invalid:
        await client.create_conversation(conversation_id="-not valid-")
    assert invalid.value.reason == "INVALID_REQUEST"
    assert [v.field for v in invalid.value.field_violations] == ["conversation_id"]

    conversation = await client.create_conversation()
    with pytest.raises(Aborted) as aborted:
        await client.archive_conversation(conversation.name, expected_version=7)
    assert aborted.value.metadata["actualVersion"] == "1"

    async with AsyncTurnlogClient(service.address, retry=NO_RETRY) as anonymous:
        with pytest.raises(Unauthenticated) as refused:
            await anonymous.get_conversation(conversation.name)
    assert refused.value.error_reason != errors_pb2.ERROR_REASON_UNSPECIFIED
    # The log is unchanged by all of it.
    assert (await client.get_conversation(conversation.name)).version == 1


async def test_rate_limited_calls_wait_as_told_and_then_succeed(store: object) -> None:
    from conversation_helpers import scripted_worker_server, served
    from sdk_helpers import SCRIPT

    from turnlog.conversation.application import ConversationApplication
    from turnlog.worker.client import EngineClient

    async with (
        scripted_worker_server(SCRIPT) as worker,
        EngineClient([worker.target]) as engine,
    ):
        app = ConversationApplication(store, engine)  # type: ignore[arg-type]
        try:
            async with served(app, rate_limit=RateLimit(rate=5.0, burst=2)) as serving:
                token = serving.token()
                async with AsyncTurnlogClient(
                    serving.address, token=token, retry=NO_RETRY
                ) as eager:

                    async def burst() -> None:
                        for _ in range(5):
                            _ = [c async for c in eager.list_conversations()]

                    with pytest.raises(ResourceExhausted) as limited:
                        await burst()
                assert limited.value.retryable
                assert limited.value.retry_after_s is not None
                assert limited.value.retry_after_s > 0
                async with AsyncTurnlogClient(serving.address, token=token) as patient:
                    created = [await patient.create_conversation() for _ in range(6)]
                assert len({c.name for c in created}) == 6
        finally:
            await app.shutdown()


async def test_a_filtered_subscription_keeps_its_checkpoints_and_resumes_after_them(
    client: AsyncTurnlogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from turnlog.history import service as history_service

    monkeypatch.setattr(history_service, "CHECKPOINT_AFTER_SECONDS", 0.1)
    subscription = client.subscribe_events(event_types=["ConversationArchived"])
    archived: list[hpb.LogEvent] = []

    async def watch() -> None:
        async for event in subscription:
            archived.append(event)

    watching = asyncio.create_task(watch())
    try:
        while not subscription.caught_up:  # noqa: ASYNC110 (a flag the iterator sets)
            await asyncio.sleep(0.05)
        # Events the subscription does not send: it reports how far it read.
        names = [(await client.create_conversation()).name for _ in range(3)]
        last = [e.position async for e in client.read_events()][-1]
        async with asyncio.timeout(30):
            while subscription.position != last:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert subscription.checkpoints >= 1
        assert archived == []
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    # A subscription resumed from there reads nothing before it.
    await client.archive_conversation(names[0])
    resumed = client.subscribe_events(
        event_types=["ConversationArchived"], after_position=subscription.position
    )
    first = await asyncio.wait_for(anext(resumed), 30)
    await resumed.aclose()
    assert first.type == "ConversationArchived"
    assert first.conversation == names[0]
    assert first.WhichOneof("event") == "conversation_archived"


async def test_the_chain_is_verified_on_the_client_from_read_events(
    client: AsyncTurnlogClient,
) -> None:
    name = await _conversation_with_history(client)
    report = await client.verify_locally(name)
    folded = await client.get_conversation(name)
    assert report.intact
    assert report.events_checked == report.last_version == folded.version
    served = await client.verify_conversation(name)
    assert served.intact
    assert served.events_checked == report.events_checked


async def test_manage_calls_and_their_paging(client: AsyncTurnlogClient) -> None:
    name = await _conversation_with_history(client)
    unarchived = await client.unarchive_conversation(name)
    assert unarchived.state == pb.CONVERSATION_STATE_ACTIVE
    current = await client.get_conversation(name)
    current.system_prompt = "Be briefer."
    updated = await client.update_conversation(current, ["system_prompt"])
    assert updated.system_prompt == "Be briefer."
    await client.send_message(name, "hi again")
    folded = await client.get_conversation(name)
    transcript = await client.transcript(name)
    # The update is folded on the client too: the system message is the new prompt.
    assert transcript.system_prompt == "Be briefer."
    assert [m.SerializeToString() for m in transcript.messages] == [
        m.SerializeToString() for m in folded.messages
    ]
    turns = [t async for t in client.list_turns(name, page_size=1)]
    assert [t.turn_id for t in turns] == [t.turn_id for t in folded.turns]
    assert len(turns) == folded.turn_count == 4
    messages = [m async for m in client.list_messages(name, page_size=2)]
    assert [m.message_id for m in messages] == [m.message_id for m in transcript.messages]
    newest = [m async for m in client.list_messages(name, page_size=3, newest_first=True)]
    assert newest == messages[::-1]
    last_turn = [m async for m in client.list_messages(name, turn_id=turns[-1].turn_id)]
    assert last_turn[0].content == "hi again"
    assert {m.turn_id for m in last_turn} == {turns[-1].turn_id}
