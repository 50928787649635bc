"""The cross-language conformance reference: golden logs as the server sends them, and their summaries.

    PYTHONPATH=gen:services:storage python clients/conformance/reference.py           # rewrite
    PYTHONPATH=gen:services:storage python clients/conformance/reference.py --check   # exit 1 if stale

For each golden log `tests/history/golden/<name>.jsonl` this writes

- `golden/<name>.binpb`: a serialized `turnlog.v1.ReadEventsResponse` holding
  the log's events as `ReadEvents` returns them under `EVENT_VIEW_BOTH`. The
  `LogEvent`s are built by the server's own code (`turnlog.api.messages.log_event`,
  which decodes and upcasts the typed form), not by anything written here;
  only the store is missing, so `position` is the store-less one (0/0).
- `expected/<name>.json`: the summary that every client language must derive
  from that file (the format is in README.md beside this file). The Python
  summary is computed here from the LogEvent messages alone, recomputing each
  hash with `turnlog.storage.hashchain.event_hash`, the code the server
  verifies with.

Other languages (clients/go, clients/node) read the .binpb files with their
generated code, compute the same summary on their own, and `compare.py`
compares theirs with `expected/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC
from pathlib import Path
from typing import Any
from uuid import UUID

from google.protobuf import json_format

from turnlog.api.messages import log_event
from turnlog.history.jsonl import read_jsonl
from turnlog.storage.hashchain import GENESIS_HASH, event_hash
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import history_pb2 as hpb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GOLDEN_LOGS = ROOT / "tests" / "history" / "golden"
BINPB_DIR = HERE / "golden"
EXPECTED_DIR = HERE / "expected"


def golden_logs() -> list[Path]:
    """The committed golden logs, by name."""
    return sorted(GOLDEN_LOGS.glob("*.jsonl"))


def read_events_response(log: Path) -> spb.ReadEventsResponse:
    """One page of `ReadEvents(view=EVENT_VIEW_BOTH)` holding every event of a golden log."""
    events = [e.to_recorded() for e in read_jsonl(log.read_bytes().splitlines())]
    return spb.ReadEventsResponse(events=[log_event(e, raw=True, typed=True) for e in events])


def serialize(response: spb.ReadEventsResponse) -> bytes:
    """The response's bytes, deterministic (map entries sorted) so the committed files are stable."""
    return response.SerializeToString(deterministic=True)


def recomputed_hash(event: hpb.LogEvent) -> bytes:
    """The event's chain hash recomputed from the LogEvent's fields (encoding v1).

    `record_time` carries microseconds (the server never sends finer), and
    `event_hash` takes them from the datetime it is given.
    """
    return event_hash(
        prev_hash=event.prev_hash,
        stream_id=event.stream_id,
        stream_version=event.version,
        event_id=UUID(event.event_id),
        type=event.type,
        data_json=event.data_json,
        metadata_json=event.metadata_json,
        recorded_at=event.record_time.ToDatetime(tzinfo=UTC),
    )


def summarize(name: str, response: spb.ReadEventsResponse) -> dict[str, Any]:
    """The conformance summary of one golden log's events (the format of README.md)."""
    events: list[dict[str, Any]] = []
    intact = True
    expected_prev = GENESIS_HASH
    for number, event in enumerate(response.events, start=1):
        hash_ok = recomputed_hash(event) == event.hash
        intact = intact and hash_ok and event.version == number and event.prev_hash == expected_prev
        expected_prev = event.hash
        member = event.WhichOneof("event")
        typed = (
            None
            if member is None
            else json_format.MessageToDict(getattr(event, member), preserving_proto_field_name=True)
        )
        events.append(
            {
                "version": event.version,
                "type": event.type,
                "hash_ok": hash_ok,
                "member": member,
                "typed": typed,
            }
        )
    head = response.events[-1].hash.hex() if response.events else ""
    return {
        "file": name,
        "chain": {"intact": intact, "events": len(events), "head_hash": head},
        "events": events,
    }


def dump(summary: dict[str, Any]) -> str:
    """A summary as the committed text: indented, keys sorted, UTF-8, a final newline."""
    return json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def outputs() -> dict[Path, bytes]:
    """Every file this script writes, with its content."""
    files: dict[Path, bytes] = {}
    for log in golden_logs():
        response = read_events_response(log)
        files[BINPB_DIR / f"{log.stem}.binpb"] = serialize(response)
        files[EXPECTED_DIR / f"{log.stem}.json"] = dump(summarize(log.stem, response)).encode()
    return files


def stale(files: dict[Path, bytes]) -> list[Path]:
    """The files that differ from what is committed, plus committed files nothing writes."""
    differ = [p for p, data in files.items() if not p.exists() or p.read_bytes() != data]
    extra = [
        p
        for d, pattern in ((BINPB_DIR, "*.binpb"), (EXPECTED_DIR, "*.json"))
        for p in sorted(d.glob(pattern))
        if p not in files
    ]
    return differ + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    args = parser.parse_args(argv)
    files = outputs()
    if args.check:
        paths = stale(files)
        for path in paths:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        if paths:
            print("run: python clients/conformance/reference.py", file=sys.stderr)
        return 1 if paths else 0
    for directory in (BINPB_DIR, EXPECTED_DIR):
        directory.mkdir(exist_ok=True)
    for path, data in files.items():
        path.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
