"""Offline verification of a JSONL export file: its hash chains, with no service and no database.

The export format (`turnlog.events.jsonl`, version 1) and the hash chain
(encoding `turnlog.event.v1`) are specified in the service's docs
(docs/history.md, "The JSONL export format"; docs/event-log.md, "Hash
chain (encoding v1)")::

    hash = sha256( "turnlog.event.v1" || prev_hash (32 bytes, zeros for version 1)
                 || f(stream_id) || int8(stream_version) || event_id (16 bytes)
                 || f(type) || f(data_json) || f(metadata_json)
                 || int8(recorded_at in µs since the Unix epoch) )
    f(s) = int8(byte length of UTF-8 s) || UTF-8 s;  int8 = 8 bytes big-endian

This is an independent implementation of that text (SHA-256 from hashlib),
so a client can check an export it was handed, or the events ReadEvents
sent it (`verify_events`), without trusting, or importing, the service's
code. Tests hold it to the service's verifier on the golden logs and to the
cross-language conformance summaries (clients/conformance).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from turnlog.v1 import history_pb2 as hpb

FORMAT = "turnlog.events.jsonl"
FORMAT_VERSION = 1
HASH_ENCODING = "turnlog.event.v1"
_GENESIS = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_HEX32 = re.compile(r"^[0-9a-f]{64}$")


class ExportFormatError(ValueError):
    """The file is not a `turnlog.events.jsonl` version 1 export (names the line)."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line
        self.problem = problem


@dataclass(frozen=True, slots=True)
class StreamReport:
    """The outcome of checking one stream of an export.

    Attributes:
        stream_id: the stream ("conversation-{id}").
        events_checked: events read, up to and including the first broken one.
        last_version: the last version read.
        broken_version: the first version failing a check; 0 when intact.
        problem: what is wrong there; "" when intact.
    """

    stream_id: str
    events_checked: int
    last_version: int
    broken_version: int = 0
    problem: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_version == 0


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
    recorded_at_us: int,
) -> bytes:
    """The chain hash of one event (encoding v1)."""
    return hashlib.sha256(
        b"".join(
            (
                HASH_ENCODING.encode("ascii"),
                prev_hash,
                _field(stream_id),
                _int8(stream_version),
                event_id.bytes,
                _field(type),
                _field(data_json),
                _field(metadata_json),
                _int8(recorded_at_us),
            )
        )
    ).digest()


@dataclass(frozen=True, slots=True)
class _Line:
    stream_id: str
    version: int
    event_id: UUID
    type: str
    data_json: str
    metadata_json: str
    recorded_at_us: int
    prev_hash: bytes
    hash: bytes


def _parse_event(number: int, value: Any) -> _Line:
    if not isinstance(value, dict):
        raise ExportFormatError(number, "an event line must be a JSON object")
    try:
        texts = {
            key: value[key] for key in ("stream_id", "event_id", "type", "recorded_at", "data_json")
        }
        texts["metadata_json"] = value["metadata_json"]
        version = value["stream_version"]
        hashes = (value["prev_hash"], value["hash"])
    except KeyError as e:
        raise ExportFormatError(number, f"missing key {e.args[0]!r}") from None
    if not all(isinstance(t, str) for t in texts.values()):
        raise ExportFormatError(number, "text fields must be strings")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ExportFormatError(number, "stream_version must be a positive integer")
    if not all(isinstance(h, str) and _HEX32.match(h) for h in hashes):
        raise ExportFormatError(number, "hashes must be 64 lowercase hex digits")
    if not _TIME.match(texts["recorded_at"]):
        raise ExportFormatError(number, "recorded_at must be RFC 3339 UTC with 6 fraction digits")
    try:
        recorded = datetime.strptime(texts["recorded_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
        event_id = UUID(texts["event_id"])
    except ValueError as e:
        raise ExportFormatError(number, f"bad value: {e}") from None
    micros = (recorded.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
    return _Line(
        stream_id=texts["stream_id"],
        version=version,
        event_id=event_id,
        type=texts["type"],
        data_json=texts["data_json"],
        metadata_json=texts["metadata_json"],
        recorded_at_us=micros,
        prev_hash=bytes.fromhex(hashes[0]),
        hash=bytes.fromhex(hashes[1]),
    )


def _lines(source: Path | str | bytes | Iterable[str | bytes]) -> Iterable[str | bytes]:
    if isinstance(source, bytes):
        return source.splitlines()
    if isinstance(source, Path | str):
        return Path(source).read_bytes().splitlines()
    return source


def verify_export(source: Path | str | bytes | Iterable[str | bytes]) -> tuple[StreamReport, ...]:
    """Checks every stream's hash chain in a JSONL export, offline.

    Args:
        source: the file's path, its bytes, or its lines.

    Returns:
        One report per stream, in the order the streams first appear; each
        stream must start at version 1 and run without gaps, every
        `prev_hash` must be its predecessor's hash and every hash must match
        its event's content.

    Raises:
        ExportFormatError: the file is not a version 1 export.
    """
    numbered = enumerate(_lines(source), start=1)
    header: Any = None
    for number, raw in numbered:
        try:
            header = json.loads(raw)
        except ValueError:
            raise ExportFormatError(number, "not JSON") from None
        break
    if header != {"format": FORMAT, "version": FORMAT_VERSION, "hash": HASH_ENCODING}:
        raise ExportFormatError(1, f"not a {FORMAT} version {FORMAT_VERSION} header")
    chains = _Chains()
    for number, raw in numbered:
        try:
            value = json.loads(raw)
        except ValueError:
            raise ExportFormatError(number, "not JSON") from None
        chains.check(_parse_event(number, value))
    return chains.reports()


def log_event_hash(event: hpb.LogEvent) -> bytes:
    """The chain hash of an event as ReadEvents/SubscribeEvents send it (raw or both views).

    Recomputed from its fields: `record_time` counts in whole microseconds.
    An event read with the typed view only has no `data_json` and cannot be
    checked.
    """
    return event_hash(
        prev_hash=event.prev_hash,
        stream_id=event.stream_id,
        stream_version=event.version,
        event_id=UUID(event.event_id),
        type=event.type,
        data_json=event.data_json,
        metadata_json=event.metadata_json,
        recorded_at_us=event.record_time.seconds * 1_000_000 + event.record_time.nanos // 1000,
    )


def verify_events(events: Iterable[hpb.LogEvent]) -> tuple[StreamReport, ...]:
    """Checks the hash chains of events read from the service, on the client.

    The events must carry their stored text (`EVENT_VIEW_RAW` or
    `EVENT_VIEW_BOTH`) and each stream must start at version 1. This checks
    what the service sent against itself, without trusting its
    `VerifyConversation`: an edit, a deletion or a reordering of the stored
    events shows, as it does in an export.
    """
    chains = _Chains()
    for event in events:
        chains.check(
            _Line(
                stream_id=event.stream_id,
                version=event.version,
                event_id=UUID(event.event_id),
                type=event.type,
                data_json=event.data_json,
                metadata_json=event.metadata_json,
                recorded_at_us=event.record_time.seconds * 1_000_000
                + event.record_time.nanos // 1000,
                prev_hash=event.prev_hash,
                hash=event.hash,
            )
        )
    return chains.reports()


class _Chains:
    """The checks of one or more streams' chains, event by event, in order."""

    def __init__(self) -> None:
        # stream id -> (next version expected, prev_hash expected, events checked, last version)
        self._progress: dict[str, tuple[int, bytes, int, int]] = {}
        self._broken: dict[str, StreamReport] = {}

    def check(self, event: _Line) -> None:
        if event.stream_id in self._broken:
            return
        expected_version, expected_prev, checked, _ = self._progress.get(
            event.stream_id, (1, _GENESIS, 0, 0)
        )
        checked += 1
        problem = ""
        if event.version != expected_version:
            problem = f"version gap: expected {expected_version}, found {event.version}"
        elif event.prev_hash != expected_prev:
            problem = "prev_hash is not the previous event's hash"
        elif (
            event_hash(
                prev_hash=event.prev_hash,
                stream_id=event.stream_id,
                stream_version=event.version,
                event_id=event.event_id,
                type=event.type,
                data_json=event.data_json,
                metadata_json=event.metadata_json,
                recorded_at_us=event.recorded_at_us,
            )
            != event.hash
        ):
            problem = "hash mismatch: the event's content was changed"
        self._progress[event.stream_id] = (expected_version + 1, event.hash, checked, event.version)
        if problem:
            self._broken[event.stream_id] = StreamReport(
                event.stream_id, checked, event.version, event.version, problem
            )

    def reports(self) -> tuple[StreamReport, ...]:
        return tuple(
            self._broken.get(stream_id) or StreamReport(stream_id, checked, last)
            for stream_id, (_, _, checked, last) in self._progress.items()
        )


__all__ = [
    "ExportFormatError",
    "StreamReport",
    "event_hash",
    "log_event_hash",
    "verify_events",
    "verify_export",
]
