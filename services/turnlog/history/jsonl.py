"""The JSONL export format of event streams: pure code, no database.

A file is UTF-8 text, one JSON object per line (each line ends with "\\n"):

- line 1, the header: ``{"format":"turnlog.events.jsonl","version":1,"hash":"turnlog.event.v1"}``
- then one line per event, the streams' events each in version order::

    {"stream_id":..., "stream_version":..., "event_id":..., "type":...,
     "recorded_at":"2024-05-06T07:08:09.123456Z", "data_json":"...",
     "metadata_json":"...", "prev_hash":"<64 hex>", "hash":"<64 hex>"}

`data_json` and `metadata_json` are the stored JSON text as strings, never
re-serialized: the hash chain covers that exact text, so a file verifies
(`verify_exported`) with `turnlog.storage.hashchain` and no database. Keys
come in the fixed order above and nothing deployment-local (global
positions, transaction ids, export time) is written, so exporting what was
imported gives the same bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

from turnlog.errors import InvalidArgumentError
from turnlog.storage.hashchain import verify_chain
from turnlog.storage.port import ImportedEvent, RecordedEvent, VerificationReport

FORMAT: Final = "turnlog.events.jsonl"
FORMAT_VERSION: Final = 1
HASH_ENCODING: Final = "turnlog.event.v1"

_KEYS: Final = (
    "stream_id",
    "stream_version",
    "event_id",
    "type",
    "recorded_at",
    "data_json",
    "metadata_json",
    "prev_hash",
    "hash",
)
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_HEX32 = re.compile(r"^[0-9a-f]{64}$")


class JsonlFormatError(InvalidArgumentError):
    """A line of an export file is not in the format; `line` is its 1-based number."""

    reason = "INVALID_EXPORT_FILE"

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}", metadata={"line": str(line)})
        self.line = line
        self.problem = problem


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportedEvent:
    """One event line of an export file, decoded (the JSON text stays text)."""

    stream_id: str
    stream_version: int
    event_id: UUID
    type: str
    data_json: str
    metadata_json: str
    recorded_at: datetime
    prev_hash: bytes
    hash: bytes

    def to_imported(self) -> ImportedEvent:
        """The event as `EventStore.import_events` takes it."""
        return self.to_recorded().to_imported()

    def to_recorded(self) -> RecordedEvent:
        """The event as a `RecordedEvent` with no log position (0), for replay and checks."""
        return RecordedEvent(
            global_position=0,
            transaction_id=0,
            stream_id=self.stream_id,
            stream_version=self.stream_version,
            event_id=self.event_id,
            type=self.type,
            data_json=self.data_json,
            metadata_json=self.metadata_json,
            recorded_at=self.recorded_at,
            prev_hash=self.prev_hash,
            hash=self.hash,
        )


def _dump(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with exactly six fractional digits, e.g. 2024-05-06T07:08:09.000001Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def header_line() -> str:
    """The first line of every file."""
    return _dump({"format": FORMAT, "version": FORMAT_VERSION, "hash": HASH_ENCODING})


def event_line(event: RecordedEvent | ExportedEvent) -> str:
    """One event's line (with its newline)."""
    return _dump(
        {
            "stream_id": event.stream_id,
            "stream_version": event.stream_version,
            "event_id": str(event.event_id),
            "type": event.type,
            "recorded_at": format_time(event.recorded_at),
            "data_json": event.data_json,
            "metadata_json": event.metadata_json,
            "prev_hash": event.prev_hash.hex(),
            "hash": event.hash.hex(),
        }
    )


def write_jsonl(events: Iterable[RecordedEvent | ExportedEvent]) -> Iterator[str]:
    """The lines of a file holding `events` (header first), each ending in a newline."""
    yield header_line()
    for event in events:
        yield event_line(event)


def _text(raw: str | bytes, number: int) -> str:
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonlFormatError(number, "not UTF-8") from e
    return raw


def _object(raw: str | bytes, number: int) -> dict[str, Any]:
    try:
        value = json.loads(_text(raw, number))
    except json.JSONDecodeError as e:
        raise JsonlFormatError(number, f"not JSON ({e.msg})") from e
    if not isinstance(value, dict):
        raise JsonlFormatError(number, "not a JSON object")
    return value


def _event(value: dict[str, Any], number: int) -> ExportedEvent:
    if set(value) != set(_KEYS):
        missing = sorted(set(_KEYS) - set(value))
        extra = sorted(set(value) - set(_KEYS))
        raise JsonlFormatError(number, f"keys differ (missing {missing}, unexpected {extra})")
    for key in ("stream_id", "event_id", "type", "recorded_at", "data_json", "metadata_json"):
        if not isinstance(value[key], str):
            raise JsonlFormatError(number, f"{key} must be a string")
    version = value["stream_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise JsonlFormatError(number, "stream_version must be a positive integer")
    try:
        event_id = UUID(value["event_id"])
    except ValueError as e:
        raise JsonlFormatError(number, "event_id is not a UUID") from e
    if not _TIME.match(value["recorded_at"]):
        raise JsonlFormatError(number, "recorded_at must be RFC 3339 UTC with 6 fraction digits")
    try:
        recorded_at = datetime.strptime(value["recorded_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=UTC
        )
    except ValueError as e:
        raise JsonlFormatError(number, "recorded_at is not a valid time") from e
    hashes = []
    for key in ("prev_hash", "hash"):
        if not isinstance(value[key], str) or not _HEX32.match(value[key]):
            raise JsonlFormatError(number, f"{key} must be 64 lowercase hex digits")
        hashes.append(bytes.fromhex(value[key]))
    for key in ("data_json", "metadata_json"):
        try:
            json.loads(value[key])
        except json.JSONDecodeError as e:
            raise JsonlFormatError(number, f"{key} is not JSON text") from e
    return ExportedEvent(
        stream_id=value["stream_id"],
        stream_version=version,
        event_id=event_id,
        type=value["type"],
        data_json=value["data_json"],
        metadata_json=value["metadata_json"],
        recorded_at=recorded_at,
        prev_hash=hashes[0],
        hash=hashes[1],
    )


def read_jsonl(lines: Iterable[str | bytes]) -> list[ExportedEvent]:
    """Parses a file's lines (with or without their newlines; blank lines are errors).

    Checks the format only; `verify_exported` checks the hash chains.

    Raises:
        JsonlFormatError: the first line that is not in the format, with its number.
    """
    events: list[ExportedEvent] = []
    header_seen = False
    for number, raw in enumerate(lines, start=1):
        text = _text(raw, number).removesuffix("\n")
        if not header_seen:
            header = _object(text, number)
            if header.get("format") != FORMAT:
                raise JsonlFormatError(number, f"not a {FORMAT} file (no header)")
            if header.get("version") != FORMAT_VERSION:
                raise JsonlFormatError(number, f"unsupported version {header.get('version')!r}")
            if header.get("hash") != HASH_ENCODING:
                raise JsonlFormatError(number, f"unsupported hash encoding {header.get('hash')!r}")
            header_seen = True
            continue
        events.append(_event(_object(text, number), number))
    if not header_seen:
        raise JsonlFormatError(1, "empty file")
    return events


def split_lines(data: bytes) -> list[bytes]:
    """A file's bytes as lines; a final newline is required, as every line ends in one."""
    if data and not data.endswith(b"\n"):
        raise JsonlFormatError(data.count(b"\n") + 1, "the last line has no newline")
    return data.split(b"\n")[:-1]


def verify_exported(lines: Iterable[str | bytes]) -> tuple[VerificationReport, ...]:
    """Checks every stream's hash chain in an export file, without a database.

    Each stream must start at version 1 and be complete up to its last line
    (an export from version 1), in version order.

    Returns:
        One report per stream, in order of first appearance; `report.ok` for each.

    Raises:
        JsonlFormatError: a line is not in the format.
    """
    streams: dict[str, list[RecordedEvent]] = {}
    for event in read_jsonl(lines):
        streams.setdefault(event.stream_id, []).append(event.to_recorded())
    return tuple(verify_chain(sid, events) for sid, events in streams.items())
