"""The model a turn runs on, with the session's real vLLM CPU worker.

The worker names its model in GetModelInfo (the tiny model's path); a turn
that names no model is recorded with that name, and one naming another
model is refused before anything is recorded.
"""

from __future__ import annotations

import grpc
import pytest
from conversation_helpers import conversation_stub, error_reason
from worker_processes import WorkerProcess

from turnlog.conversation.application import ConversationApplication
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.worker.client import EngineClient

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


async def test_the_vllm_worker_s_model_is_recorded_and_another_refused(
    store: PostgresEventStore, vllm_worker: WorkerProcess
) -> None:
    async with EngineClient([vllm_worker.target]) as engine:
        served = (await engine.model_info()).model
        assert served
        app = ConversationApplication(store, engine)
        try:
            async with conversation_stub(app) as stub:
                created = await stub.CreateConversation(
                    spb.CreateConversationRequest(
                        defaults=pb.TurnDefaults(temperature=0, max_tokens=4)
                    )
                )
                name = created.conversation.name
                cid = name.removeprefix("conversations/")
                await stub.SendMessage(
                    spb.SendMessageRequest(input=spb.TurnInput(conversation=name, content="Hi"))
                )
                recorded = [
                    e.data["model"]
                    for e in await store.read_stream(stream_id(cid))
                    if e.type in ("GenerationStarted", "GenerationCompleted")
                ]
                assert recorded == [served, served]
                version = len(await store.read_stream(stream_id(cid)))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.SendMessage(
                        spb.SendMessageRequest(
                            input=spb.TurnInput(
                                conversation=name,
                                content="Hi",
                                options=pb.TurnDefaults(model="not-" + served),
                            )
                        )
                    )
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_reason(refused.value) == "MODEL_NOT_SERVED"
                assert len(await store.read_stream(stream_id(cid))) == version
        finally:
            await app.shutdown()
