"""Cross-language conformance: Go reads the golden logs as Python does (clients/conformance).

The inputs are the golden logs as `ReadEvents(view=EVENT_VIEW_BOTH)` returns
them; each language decodes the typed events and verifies the hash chains
on its own, and the summaries must agree with the Python reference's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import compare
import pytest
import reference
from live_service import GoPrograms

from turnlog.v1 import conversation_service_pb2 as spb

# The first test builds the Go programs (about 20 s cold on two cores) inside its time.
pytestmark = pytest.mark.timeout(300)


def go_summaries(go: GoPrograms, files: list[Path], out: Path) -> dict[str, dict[str, Any]]:
    """Runs the Go conformance program on `files`; its summaries by name."""
    out.mkdir()
    subprocess.run(
        [go.conformance, "-out", out, *files], check=True, timeout=60, capture_output=True
    )
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in out.glob("*.json")}


def test_reference_files_are_fresh() -> None:
    """The committed .binpb files and expected summaries are what the current server code gives."""
    stale = reference.stale(reference.outputs())
    assert stale == [], "run: python clients/conformance/reference.py"


def test_every_golden_log_has_a_reference() -> None:
    names = {p.stem for p in reference.golden_logs()}
    assert names == {p.stem for p in reference.BINPB_DIR.glob("*.binpb")}
    assert len(names) >= 5


def test_go_agrees_with_python(go_programs: GoPrograms, tmp_path: Path) -> None:
    files = sorted(reference.BINPB_DIR.glob("*.binpb"))
    summaries = go_summaries(go_programs, files, tmp_path / "go")
    assert set(summaries) == {f.stem for f in files}
    assert compare.compare_dirs(tmp_path / "go") == []
    # The agreement covers something: every chain intact, every event typed.
    for summary in summaries.values():
        assert summary["chain"]["intact"]
        assert summary["events"]
        assert all(e["hash_ok"] and e["typed"] is not None for e in summary["events"])


def _tampered(tmp_path: Path, name: str, change: Any) -> tuple[Path, spb.ReadEventsResponse]:
    """A copy of golden/<name>.binpb changed by `change(raw bytes, response) -> bytes`."""
    raw = (reference.BINPB_DIR / f"{name}.binpb").read_bytes()
    response = spb.ReadEventsResponse.FromString(raw)
    folder = tmp_path / "tampered"
    folder.mkdir()
    path = folder / f"{name}.binpb"
    path.write_bytes(change(raw, response))
    return path, spb.ReadEventsResponse.FromString(path.read_bytes())


def test_go_sees_one_flipped_byte(go_programs: GoPrograms, tmp_path: Path) -> None:
    """One byte of one event's data_json flipped: that event's hash fails, and the chain."""
    victim = 5

    def flip(raw: bytes, response: spb.ReadEventsResponse) -> bytes:
        text = response.events[victim - 1].data_json.encode()
        assert raw.count(text) == 1
        at = raw.index(text) + text.index(b'"') + 1  # the first letter of the first key
        return raw[:at] + bytes([raw[at] ^ 0x20]) + raw[at + 1 :]  # its case: still UTF-8

    path, tampered = _tampered(tmp_path, "plain", flip)
    [summary] = go_summaries(go_programs, [path], tmp_path / "go").values()
    assert [e["version"] for e in summary["events"] if not e["hash_ok"]] == [victim]
    assert summary["chain"]["intact"] is False
    # Python, given the same bytes, says the same.
    python = reference.summarize("plain", tampered)
    assert compare.compare_summary(python, summary) == []
    # And the difference from the untampered reference is exactly that.
    expected = json.loads((reference.EXPECTED_DIR / "plain.json").read_text(encoding="utf-8"))
    assert compare.compare_summary(expected, summary) == [
        "$.chain.intact: expected True, got False",
        f"$.events[{victim - 1}].hash_ok: expected True, got False",
    ]


def test_go_sees_a_deleted_event(go_programs: GoPrograms, tmp_path: Path) -> None:
    """An event left out: every hash still matches, but the chain is not intact."""

    def delete(raw: bytes, response: spb.ReadEventsResponse) -> bytes:
        del response.events[3]
        return response.SerializeToString(deterministic=True)

    path, tampered = _tampered(tmp_path, "tools", delete)
    [summary] = go_summaries(go_programs, [path], tmp_path / "go").values()
    assert summary["events"]
    assert all(e["hash_ok"] for e in summary["events"])
    assert summary["chain"]["intact"] is False
    assert compare.compare_summary(reference.summarize("tools", tampered), summary) == []
