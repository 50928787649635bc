"""Cross-language conformance in Node: the golden logs read into typed events, their hash chains verified.

`clients/node/conformance.mjs` reads each `clients/conformance/golden/*.binpb`
(a ReadEventsResponse as the server sends it) with the generated Node code,
recomputes every hash with node:crypto from the documented encoding, and
writes a summary per log; `clients/conformance/compare.py` compares those
with the Python reference's (`expected/`). A copy with one byte of one
event's data_json flipped proves Node's check can fail.

Node and the package's modules are part of the test environment (`make
clients-node-install`): when they are missing the test fails, it never skips.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

from live_service import NODE_CLIENT, node_executable

from turnlog.v1 import conversation_service_pb2 as spb

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT / "clients" / "conformance"
GOLDEN = sorted((CONFORMANCE / "golden").glob("*.binpb"))


def compare_module() -> ModuleType:
    """clients/conformance/compare.py (not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("conformance_compare", CONFORMANCE / "compare.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def node_summaries(files: list[Path], out: Path) -> dict[str, Any]:
    """Runs conformance.mjs on `files`; returns its summaries by log name."""
    subprocess.run(
        [
            node_executable(),
            str(NODE_CLIENT / "conformance.mjs"),
            "--out",
            str(out),
            *map(str, files),
        ],
        cwd=NODE_CLIENT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def test_node_reads_every_golden_log_as_python_does(tmp_path: Path) -> None:
    assert len(GOLDEN) >= 5  # fork, guardrails, interrupted, plain, tools
    summaries = node_summaries(GOLDEN, tmp_path)
    assert sorted(summaries) == sorted(p.stem for p in GOLDEN)
    assert compare_module().compare_dirs(tmp_path, CONFORMANCE / "expected") == []
    # Not vacuous: every chain verified in Node, every event typed.
    for summary in summaries.values():
        assert summary["chain"]["intact"] is True
        assert summary["chain"]["events"] == len(summary["events"]) > 0
        assert all(e["hash_ok"] and e["typed"] is not None for e in summary["events"])


def test_node_finds_one_flipped_byte_in_an_events_data_json(tmp_path: Path) -> None:
    source = CONFORMANCE / "golden" / "tools.binpb"
    raw = source.read_bytes()
    response = spb.ReadEventsResponse.FromString(raw)
    index = len(response.events) // 2
    data = response.events[index].data_json.encode()
    assert raw.count(data) == 1  # the payload's bytes, found where the file holds them
    start = raw.index(data)
    # Flip the case of the payload's first letter: still UTF-8 and JSON, a
    # different text (so only the hash can tell).
    offset = start + next(i for i, b in enumerate(data) if chr(b).isalpha())
    flipped = bytearray(raw)
    flipped[offset] ^= 0x20
    copy = tmp_path / "in" / "tools.binpb"
    copy.parent.mkdir()
    copy.write_bytes(bytes(flipped))
    assert spb.ReadEventsResponse.FromString(bytes(flipped)).events[index].data_json != (
        response.events[index].data_json
    )

    summary = node_summaries([copy], tmp_path / "out")["tools"]
    hash_ok = [e["hash_ok"] for e in summary["events"]]
    assert hash_ok == [i != index for i in range(len(response.events))]
    assert summary["chain"]["intact"] is False
    differences = compare_module().compare_dirs(tmp_path / "out", CONFORMANCE / "expected")
    assert f"tools.json: $.events[{index}].hash_ok: expected True, got False" in differences


def test_node_finds_an_event_deleted_from_the_chain(tmp_path: Path) -> None:
    response = spb.ReadEventsResponse.FromString(
        (CONFORMANCE / "golden" / "plain.binpb").read_bytes()
    )
    index = len(response.events) // 2
    del response.events[index]
    copy = tmp_path / "in" / "plain.binpb"
    copy.parent.mkdir()
    copy.write_bytes(response.SerializeToString())

    summary = node_summaries([copy], tmp_path / "out")["plain"]
    # Every event left is as recorded; only the chain shows the hole.
    assert all(e["hash_ok"] for e in summary["events"])
    assert summary["chain"] == {
        "intact": False,
        "events": len(response.events),
        "head_hash": response.events[-1].hash.hex(),
    }
