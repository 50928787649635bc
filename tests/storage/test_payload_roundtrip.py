"""Payloads survive append and read unchanged (Hypothesis), through a real server."""

from __future__ import annotations

import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnlog.storage.hashchain import verify_chain
from turnlog.storage.port import EventMetadata, NewEvent
from turnlog.storage.postgres import PostgresEventStore

# JSON values as Python decodes them: any text (NUL included: JSON escapes
# it), floats that JSON can carry, integers far beyond 64 bits, nesting.
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
payloads = st.dictionaries(st.text(max_size=20), json_values, max_size=6)
names = st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=payloads, stream_name=names, event_type=names, actor=st.none() | names)
async def test_payloads_round_trip(
    store: PostgresEventStore,
    payload: dict[str, Any],
    stream_name: str,
    event_type: str,
    actor: str | None,
) -> None:
    stream_id = f"{uuid.uuid4()}/{stream_name}"  # unique per example; the store is shared
    event = NewEvent(
        event_id=uuid.uuid4(), type=event_type, data=payload, metadata=EventMetadata(actor=actor)
    )
    await store.append(stream_id, [event], expected_version=0)
    (read,) = await store.read_stream(stream_id)
    assert read.stream_id == stream_id
    assert read.type == event_type
    assert read.data == payload
    assert json.loads(read.data_json) == payload
    assert read.metadata == EventMetadata(actor=actor)
    assert verify_chain(stream_id, [read]).ok


async def test_large_payload_round_trips(store: PostgresEventStore) -> None:
    payload = {
        "text": "🙂 ü 中文 " * 80_000,
        "numbers": [1.5e-300, -0.0, 2**200, 0.1 + 0.2],
        "deep": json.loads("[" * 200 + "]" * 200),
    }
    event = NewEvent(event_id=uuid.uuid4(), type="Big", data=payload)
    await store.append("big", [event], expected_version=0)
    (read,) = await store.read_stream("big")
    assert read.data == payload
    assert len(read.data_json.encode()) > 1_000_000
    assert (await store.verify("big")).ok
