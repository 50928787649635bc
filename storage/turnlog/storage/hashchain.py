"""The per-stream hash chain: its byte encoding and a database-free verifier.

Encoding v1 (also written, byte for byte, in migrations/0001_event_log.sql,
which computes it at append time; tests keep the two in agreement)::

    hash = sha256(
        b"turnlog.event.v1"
        || prev_hash                         32 bytes; 32 zero bytes for version 1
        || field(stream_id)
        || int8(stream_version)
        || event_id                          the UUID's 16 bytes
        || field(type)
        || field(data_json)                  the stored JSON text
        || field(metadata_json)
        || int8(recorded_at as microseconds since 1970-01-01T00:00:00Z)
    )
    field(s) = int8(len(utf8(s))) || utf8(s)
    int8(n)  = n as 8 bytes, big-endian, two's complement

Every variable-length field is length-prefixed, so no two different events
encode to the same bytes. Because the JSON is hashed as stored text, an
exported log (JSONL with the raw text) verifies without a database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Final
from uuid import UUID

from turnlog.storage.port import RecordedEvent, VerificationReport

HASH_DOMAIN: Final = b"turnlog.event.v1"
GENESIS_HASH: Final = bytes(32)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _int8(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)


def _field(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _int8(len(raw)) + raw


def event_hash(
    *,
    prev_hash: bytes,
    stream_id: str,
    stream_version: int,
    event_id: UUID,
    type: str,
    data_json: str,
    metadata_json: str,
    recorded_at: datetime,
) -> bytes:
    """The chain hash of one event (encoding v1, see the module docstring)."""
    micros = (recorded_at - _EPOCH) // timedelta(microseconds=1)
    return hashlib.sha256(
        b"".join(
            (
                HASH_DOMAIN,
                prev_hash,
                _field(stream_id),
                _int8(stream_version),
                event_id.bytes,
                _field(type),
                _field(data_json),
                _field(metadata_json),
                _int8(micros),
            )
        )
    ).digest()


def recorded_event_hash(event: RecordedEvent) -> bytes:
    """Recomputes `event.hash` from the event's own fields and `prev_hash`."""
    return event_hash(
        prev_hash=event.prev_hash,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        event_id=event.event_id,
        type=event.type,
        data_json=event.data_json,
        metadata_json=event.metadata_json,
        recorded_at=event.recorded_at,
    )


def verify_chain(stream_id: str, events: Iterable[RecordedEvent]) -> VerificationReport:
    """Checks one stream's events, given in version order, without a database.

    Reports the first event whose version does not follow its predecessor's
    (an event deleted, or the stream not starting at 1), whose `prev_hash` is
    not its predecessor's hash, or whose hash does not match its content.
    """
    expected_prev = GENESIS_HASH
    expected_version = 1
    checked = 0
    last_version = 0
    for event in events:
        checked += 1
        last_version = event.stream_version
        problem: str | None = None
        if event.stream_id != stream_id:
            problem = f"event of another stream: {event.stream_id!r}"
        elif event.stream_version != expected_version:
            problem = f"version gap: expected {expected_version}, found {event.stream_version}"
        elif event.prev_hash != expected_prev:
            problem = "prev_hash is not the previous event's hash"
        elif recorded_event_hash(event) != event.hash:
            problem = "hash mismatch: the event's content was changed"
        if problem is not None:
            return VerificationReport(
                stream_id=stream_id,
                events_checked=checked,
                last_version=last_version,
                broken_at_version=event.stream_version,
                problem=problem,
            )
        expected_prev = event.hash
        expected_version += 1
    return VerificationReport(
        stream_id=stream_id, events_checked=checked, last_version=last_version
    )
