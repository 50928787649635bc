"""The Python SDK in the cross-language conformance (clients/conformance/README.md).

The summaries are built from what turnlog_client computes: each event's
hash recomputed by `turnlog_client.verify.log_event_hash` (hashlib, from the
documented encoding, not the server's code) and each chain checked by
`verify_events`; they must equal the Python reference's. A flipped byte must
show.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from turnlog.v1 import conversation_service_pb2 as spb
from turnlog_client.verify import log_event_hash, verify_events

CONFORMANCE = Path(__file__).resolve().parents[2] / "clients" / "conformance"
sys.path.insert(0, str(CONFORMANCE))

import compare  # noqa: E402


def summarize(name: str, response: spb.ReadEventsResponse) -> dict[str, Any]:
    """The summary of README.md, from the SDK's own checks."""
    events = []
    for event in response.events:
        member = event.WhichOneof("event")
        events.append(
            {
                "version": event.version,
                "type": event.type,
                "hash_ok": log_event_hash(event) == event.hash,
                "member": member,
                "typed": None
                if member is None
                else json_format.MessageToDict(
                    getattr(event, member), preserving_proto_field_name=True
                ),
            }
        )
    reports = verify_events(response.events)
    return {
        "file": name,
        "chain": {
            "intact": bool(reports) and all(r.intact for r in reports),
            "events": len(events),
            "head_hash": response.events[-1].hash.hex() if response.events else "",
        },
        "events": events,
    }


def _golden() -> list[tuple[str, spb.ReadEventsResponse]]:
    files = sorted((CONFORMANCE / "golden").glob("*.binpb"))
    assert len(files) >= 5
    return [(f.stem, spb.ReadEventsResponse.FromString(f.read_bytes())) for f in files]


def test_the_sdk_agrees_with_the_python_reference() -> None:
    import json

    for name, response in _golden():
        expected = json.loads((CONFORMANCE / "expected" / f"{name}.json").read_text())
        assert compare.compare_summary(expected, summarize(name, response)) == []


def test_a_flipped_byte_fails_that_event_and_the_chain() -> None:
    name, response = _golden()[0]
    tampered = spb.ReadEventsResponse()
    tampered.CopyFrom(response)
    event = tampered.events[2]
    event.data_json = event.data_json.replace('"', "'", 1)
    summary = summarize(name, tampered)
    assert [e["hash_ok"] for e in summary["events"]].index(False) == 2
    assert summary["chain"]["intact"] is False
    [report] = verify_events(tampered.events)
    assert report.broken_version == tampered.events[2].version
