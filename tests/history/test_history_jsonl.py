"""The JSONL export format, with no database: round trip and offline verification."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from turnlog.history import jsonl
from turnlog.storage.hashchain import GENESIS_HASH, event_hash


def chain(stream_id: str, count: int) -> list[jsonl.ExportedEvent]:
    events = []
    prev = GENESIS_HASH
    for version in range(1, count + 1):
        fields = {
            "stream_id": stream_id,
            "stream_version": version,
            "event_id": uuid.uuid4(),
            "type": "Said",
            "data_json": f'{{"n": {version}, "t":"ünï ✓\\n"}}',
            "metadata_json": "{}",
            "recorded_at": datetime(2024, 5, 6, tzinfo=UTC) + timedelta(microseconds=version),
            "prev_hash": prev,
        }
        digest = event_hash(**fields)  # type: ignore[arg-type]
        events.append(jsonl.ExportedEvent(hash=digest, **fields))  # type: ignore[arg-type]
        prev = digest
    return events


def test_write_read_round_trip_keeps_the_exact_text() -> None:
    events = chain("conversation-a", 3) + chain("conversation-b", 2)
    text = "".join(jsonl.write_jsonl(events))
    lines = text.splitlines(keepends=True)
    assert json.loads(lines[0]) == {
        "format": jsonl.FORMAT,
        "version": 1,
        "hash": jsonl.HASH_ENCODING,
    }
    assert json.loads(lines[1])["recorded_at"] == "2024-05-06T00:00:00.000001Z"
    assert jsonl.read_jsonl(lines) == events
    assert "".join(jsonl.write_jsonl(jsonl.read_jsonl(lines))) == text
    reports = jsonl.verify_exported(lines)
    assert [(r.stream_id, r.ok, r.last_version) for r in reports] == [
        ("conversation-a", True, 3),
        ("conversation-b", True, 2),
    ]


def test_verify_exported_names_the_edited_event() -> None:
    lines = list(jsonl.write_jsonl(chain("conversation-a", 4)))
    record = json.loads(lines[3])
    record["data_json"] = record["data_json"].replace("3", "4")
    lines[3] = json.dumps(record) + "\n"
    (report,) = jsonl.verify_exported(lines)
    assert (report.ok, report.broken_at_version) == (False, 3)
    assert report.problem is not None
    assert "hash mismatch" in report.problem
    del lines[2]
    (report,) = jsonl.verify_exported(lines)
    assert report.broken_at_version == 3
    assert "version gap" in (report.problem or "")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda lines: ["{}\n", *lines[1:]], "no header"),
        (lambda lines: [*lines[:1], "not json\n"], "not JSON"),
        (lambda lines: [lines[0], lines[1].replace('"hash"', '"hush"')], "keys differ"),
        (lambda lines: [lines[0], lines[1].replace(".000001Z", "Z")], "recorded_at"),
        (lambda lines: [], "empty file"),
    ],
)
def test_malformed_files_name_the_line(edit: object, problem: str) -> None:
    lines = list(jsonl.write_jsonl(chain("conversation-a", 1)))
    with pytest.raises(jsonl.JsonlFormatError, match=problem):
        jsonl.read_jsonl(edit(lines))  # type: ignore[operator]
