"""Live streams end when their credential does; a moved event fails verification.

`StreamTurn` and `SubscribeEvents` opened with a token that expires end
UNAUTHENTICATED (CREDENTIAL_EXPIRED) once it has; a stream opened with an API
key ends (CREDENTIAL_INVALID) once the key is removed from its file. Each wait
is bounded; none is timed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import psycopg
import pytest
from conversation_helpers import USER_SCOPES, ServedApp, error_reason, served

from turnlog.auth.api_keys import new_api_key
from turnlog.auth.settings import AuthSettings
from turnlog.conversation.application import ConversationApplication
from turnlog.v1 import conversation_service_pb2 as spb

#: Seconds a stream may take to end after its credential did (the re-check
#: interval of these tests is 0.2 s); a bound, not a measurement.
BOUND_S = 10.0


async def _read_until_error(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:  # type: ignore[type-arg]
    try:
        async with asyncio.timeout(BOUND_S):
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    raise AssertionError("the stream ended OK")
    except grpc.aio.AioRpcError as e:
        return e


async def test_a_subscription_ends_when_its_token_expires(service: ServedApp) -> None:
    async with service.stub("tenant-a") as owner:
        created = await owner.CreateConversation(spb.CreateConversationRequest(request_id="c"))
    token = service.token("tenant-a", USER_SCOPES, ttl_s=2)
    expires_at = time.time() + 2
    async with service.stub(token=token) as stub:
        call = stub.SubscribeEvents(
            spb.SubscribeEventsRequest(conversation=created.conversation.name)
        )
        error = await _read_until_error(call)
    assert time.time() >= expires_at - 1  # the token's own second granularity
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "CREDENTIAL_EXPIRED"


async def test_a_streamed_turn_ends_when_its_token_expires(service: ServedApp) -> None:
    async with service.stub("tenant-a") as owner:
        created = await owner.CreateConversation(spb.CreateConversationRequest(request_id="c"))
    token = service.token("tenant-a", USER_SCOPES, ttl_s=1)
    async with service.stub(token=token) as stub:
        call = stub.StreamTurn(
            spb.StreamTurnRequest(
                start=spb.TurnInput(
                    conversation=created.conversation.name, content="slow story", request_id="t"
                )
            )
        )
        error = await _read_until_error(call)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "CREDENTIAL_EXPIRED"


async def test_a_subscription_ends_when_its_api_key_is_removed(
    app: ConversationApplication, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys.toml"
    key, entry = new_api_key("tenant-a", USER_SCOPES)
    keys.write_text(entry)

    def settings(data_dir: Path) -> AuthSettings:
        return AuthSettings(local=True, data_dir=data_dir, api_keys_file=keys)

    async with served(app, auth=settings, recheck_interval_s=0.2) as serving:
        async with serving.stub(token=key) as stub:
            call = stub.SubscribeEvents(spb.SubscribeEventsRequest())
            assert (await call.read()).HasField("caught_up")
            keys.write_text("")  # the key is revoked
            error = await _read_until_error(call)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(error) == "CREDENTIAL_INVALID"
        async with serving.stub(token=key) as stub:  # and new calls are refused
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ListConversations(spb.ListConversationsRequest())
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_an_event_moved_to_another_tenant_fails_verification(
    service: ServedApp, database_url: str
) -> None:
    async with service.stub("tenant-a") as stub:
        created = await stub.CreateConversation(spb.CreateConversationRequest(request_id="c"))
        name = created.conversation.name
        await stub.SendMessage(
            spb.SendMessageRequest(input=spb.TurnInput(conversation=name, content="hi"))
        )
        assert (await stub.VerifyConversation(spb.VerifyConversationRequest(name=name))).intact
    sid = "conversation-" + name.removeprefix("conversations/")
    # Moving event 2 to tenant B: its metadata (which the tenant column derives from).
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
        await db.execute(
            "UPDATE turnlog.events SET metadata = replace(metadata::text, "
            '\'"tenant":"tenant-a"\', \'"tenant":"tenant-b"\')::json '
            "WHERE stream_id = %s AND stream_version = 2",
            (sid,),
        )
    async with service.stub("tenant-a") as stub:
        report = await stub.VerifyConversation(spb.VerifyConversationRequest(name=name))
    assert not report.intact
    assert report.broken_version == 2
