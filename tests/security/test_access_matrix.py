"""Every RPC, every way a call can lack the right to it → the exact status, and the log unchanged.

The RPCs come from the service's own descriptor, so a new RPC without a row
in `CALLS` fails `test_every_rpc_is_in_the_matrix` rather than escaping.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from conversation_helpers import USER_SCOPES, ServedApp, error_reason
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import field_mask_pb2

from turnlog.api.authentication import SCOPES
from turnlog.auth.local import LOCAL_AUDIENCE, LOCAL_ISSUER, LocalSigningKey
from turnlog.auth.principal import Scope
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

SERVICE = spb.DESCRIPTOR.services_by_name["ConversationService"]
TENANT_A, TENANT_B = "tenant-a", "tenant-b"


@dataclass(frozen=True)
class Seed:
    """Tenant A's conversation (with one turn) and its export file."""

    name: str
    export: bytes
    turn_id: str


def _input(seed: Seed, request_id: str) -> spb.TurnInput:
    return spb.TurnInput(conversation=seed.name, content="hi", request_id=request_id)


#: method -> the request(s) of a call that would succeed for tenant A with every scope.
CALLS: dict[str, Callable[[Seed], Any]] = {
    "CreateConversation": lambda s: spb.CreateConversationRequest(request_id="matrix-create"),
    "GetConversation": lambda s: spb.GetConversationRequest(name=s.name),
    "ListConversations": lambda s: spb.ListConversationsRequest(),
    "ArchiveConversation": lambda s: spb.ArchiveConversationRequest(name=s.name),
    "SendMessage": lambda s: spb.SendMessageRequest(input=_input(s, "matrix-send")),
    "CompactConversation": lambda s: spb.CompactConversationRequest(
        name=s.name, request_id="matrix-compact"
    ),
    "StreamTurn": lambda s: spb.StreamTurnRequest(start=_input(s, "matrix-stream")),
    "Converse": lambda s: [spb.ConverseRequest(user_message=_input(s, "matrix-converse"))],
    "CancelTurn": lambda s: spb.CancelTurnRequest(conversation=s.name, turn_id=s.turn_id),
    "SubmitToolResults": lambda s: spb.SubmitToolResultsRequest(
        conversation=s.name,
        turn_id=s.turn_id,
        results=[spb.ToolResult(call_id="matrix-call", result="x")],
    ),
    "ReadEvents": lambda s: spb.ReadEventsRequest(conversation=s.name),
    "SubscribeEvents": lambda s: spb.SubscribeEventsRequest(conversation=s.name),
    "ForkConversation": lambda s: spb.ForkConversationRequest(
        name=s.name, request_id="matrix-fork"
    ),
    "VerifyConversation": lambda s: spb.VerifyConversationRequest(name=s.name),
    "ExportConversation": lambda s: spb.ExportConversationRequest(
        name=s.name, format=hpb.EXPORT_FORMAT_JSONL
    ),
    "ImportConversation": lambda s: [spb.ImportConversationRequest(data=s.export)],
    "UpdateConversation": lambda s: spb.UpdateConversationRequest(
        conversation=pb.Conversation(name=s.name, labels={"matrix": "yes"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
        request_id="matrix-update",
    ),
    "UnarchiveConversation": lambda s: spb.UnarchiveConversationRequest(name=s.name),
    "ListTurns": lambda s: spb.ListTurnsRequest(conversation=s.name),
    "ListMessages": lambda s: spb.ListMessagesRequest(conversation=s.name),
}

#: What tenant B (every user scope) gets for A's resource: NOT_FOUND, never a
#: hint that it exists. Absent: the call names no resource of A's (B creates
#: or lists its own; tests/security/test_isolation.py checks those).
OTHER_TENANT: dict[str, tuple[grpc.StatusCode, str]] = {
    **{
        m: (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        for m in (
            "GetConversation",
            "ArchiveConversation",
            "SendMessage",
            "CompactConversation",
            "StreamTurn",
            "Converse",
            "CancelTurn",
            "SubmitToolResults",
            "ReadEvents",
            "SubscribeEvents",
            "ForkConversation",
            "VerifyConversation",
            "ExportConversation",
            "UpdateConversation",
            "UnarchiveConversation",
            "ListTurns",
            "ListMessages",
        )
    },
    "ImportConversation": (grpc.StatusCode.PERMISSION_DENIED, "IMPORT_TENANT_MISMATCH"),
}


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": LOCAL_ISSUER,
        "aud": LOCAL_AUDIENCE,
        "sub": "matrix",
        "tenant": TENANT_A,
        "scope": " ".join(s.value for s in USER_SCOPES),
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _bad_signature(service: ServedApp) -> str:
    # Signed by another key under the server key's id: the id is known, the signature fails.
    stranger = LocalSigningKey(Ed25519PrivateKey.generate())
    return stranger.sign(_claims(), headers={"kid": service.key.kid})


#: credential name -> (token maker (None: no credential), expected code, reason)
CREDENTIALS: dict[str, tuple[Callable[[ServedApp, str], str | None], grpc.StatusCode, str]] = {
    "none": (lambda s, m: None, grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_MISSING"),
    "malformed": (
        lambda s, m: "not-a-token",
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIAL_MALFORMED",
    ),
    "bad signature": (
        lambda s, m: _bad_signature(s),
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIAL_INVALID",
    ),
    "expired": (
        lambda s, m: s.key.sign(_claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIAL_EXPIRED",
    ),
    "wrong issuer": (
        lambda s, m: s.key.sign(_claims(iss="https://elsewhere.example")),
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIAL_WRONG_ISSUER",
    ),
    "wrong audience": (
        lambda s, m: s.key.sign(_claims(aud="another-service")),
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIAL_WRONG_AUDIENCE",
    ),
    "missing scope": (
        # Every user scope but the one this method needs.
        lambda s, m: s.token(TENANT_A, [x for x in USER_SCOPES if x is not _scope(m)]),
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
    ),
}


def _scope(method: str) -> Scope:
    return SCOPES[f"/{SERVICE.full_name}/{method}"]


async def _call(stub: sgrpc.ConversationServiceStub, method: str, request: Any) -> None:
    """Calls `method` to its end (reading every response of a stream)."""
    rpc = getattr(stub, method)
    streams_out = SERVICE.methods_by_name[method].server_streaming
    if isinstance(request, Sequence):

        async def requests() -> AsyncIterator[Any]:
            for r in request:
                yield r

        call = rpc(requests(), timeout=10)
    else:
        call = rpc(request, timeout=10)
    if streams_out:
        async for _ in call:
            pass
    else:
        await call


async def _log_digest(database_url: str) -> list[tuple[str, int, bytes]]:
    """Every stored event (stream, version, hash), in position order.

    Read with SQL, not `read_all`: an all-stream read stops below the oldest
    transaction still open anywhere on the server, so it can lag.
    """
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cursor = await db.execute(
            "SELECT stream_id, stream_version, hash FROM turnlog.events ORDER BY global_position"
        )
        return [(str(r[0]), int(r[1]), bytes(r[2])) for r in await cursor.fetchall()]


@pytest.fixture
async def seed(service: ServedApp) -> Seed:
    async with service.stub(TENANT_A) as stub:
        created = await stub.CreateConversation(spb.CreateConversationRequest(request_id="seed"))
        name = created.conversation.name
        sent = await stub.SendMessage(
            spb.SendMessageRequest(input=spb.TurnInput(conversation=name, content="hi"))
        )
        export = b"".join(
            [
                chunk.data
                async for chunk in stub.ExportConversation(
                    spb.ExportConversationRequest(name=name, format=hpb.EXPORT_FORMAT_JSONL)
                )
            ]
        )
    return Seed(name=name, export=export, turn_id=sent.turn.turn_id)


def test_every_rpc_is_in_the_matrix() -> None:
    methods = set(SERVICE.methods_by_name)
    assert methods == set(CALLS), "add the new RPC to CALLS (and OTHER_TENANT if it names one)"
    assert {f"/{SERVICE.full_name}/{m}" for m in methods} == set(SCOPES)
    assert set(OTHER_TENANT) <= methods


@pytest.mark.parametrize("credential", sorted(CREDENTIALS))
async def test_every_rpc_refuses_a_call_without_the_right(
    service: ServedApp, database_url: str, seed: Seed, credential: str
) -> None:
    make_token, code, reason = CREDENTIALS[credential]
    before = await _log_digest(database_url)
    failures = []
    for method in sorted(CALLS):
        async with service.stub(token=make_token(service, method)) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _call(stub, method, CALLS[method](seed))
        got = (raised.value.code(), error_reason(raised.value))
        if got != (code, reason):
            failures.append((method, got))
    assert failures == []
    assert await _log_digest(database_url) == before


async def test_another_tenants_resource_is_not_found(
    service: ServedApp, database_url: str, seed: Seed
) -> None:
    before = await _log_digest(database_url)
    failures = []
    async with service.stub(TENANT_B) as stub:
        for method, expected in sorted(OTHER_TENANT.items()):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _call(stub, method, CALLS[method](seed))
            got = (raised.value.code(), error_reason(raised.value))
            if got != expected:
                failures.append((method, got))
    assert failures == []
    assert await _log_digest(database_url) == before


async def test_the_owner_can_make_every_call(service: ServedApp, seed: Seed) -> None:
    """The control row: the same requests succeed with the owner's credential."""
    async with service.stub(TENANT_A) as stub:
        # Archiving last: an archived conversation takes no more turns.
        for method in sorted(CALLS, key=lambda m: (m == "ArchiveConversation", m)):
            if method == "SubscribeEvents":
                call = stub.SubscribeEvents(CALLS[method](seed))
                assert (await call.read()).events  # it never ends by itself
                call.cancel()
                continue
            if method == "SubmitToolResults":
                # The seed's turn has ended: past admission, the call is
                # refused by the turn itself, not by the credential.
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await _call(stub, method, CALLS[method](seed))
                assert error_reason(raised.value) == "TOOL_CALL_NOT_AWAITED"
                continue
            await _call(stub, method, CALLS[method](seed))
