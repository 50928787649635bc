"""Compares a client language's conformance summaries with the Python reference's.

    python clients/conformance/compare.py ACTUAL_DIR [--expected DIR]

ACTUAL_DIR holds one `<name>.json` per golden log, written by a language's
conformance program (the format is in README.md). Every expected summary
must have its actual one, and the two must be equal after `normalize`; the
differences are printed with their JSON paths and the exit status is 1.

Pure standard library on purpose: any language's CI can run it with a bare
`python3`, without the project's virtualenv.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

EXPECTED_DIR = Path(__file__).resolve().parent / "expected"

# An RFC 3339 UTC timestamp as protobuf JSON writes a google.protobuf.Timestamp.
_TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?Z$")


def _timestamp(text: str) -> str | None:
    """`text` with its fraction trimmed of trailing zeros, if it is a timestamp; else None.

    The proto3 JSON mapping lets a writer print 0, 3, 6 or 9 fraction digits
    (Python and Go choose the fewest that are exact; other runtimes always
    print 9), so "…:05.100Z" and "…:05.1Z" are the same instant.
    """
    match = _TIMESTAMP.match(text)
    if match is None:
        return None
    fraction = (match.group(2) or "").rstrip("0")
    return f"{match.group(1)}{'.' + fraction if fraction else ''}Z"


def normalize(value: Any) -> Any:
    """A summary value with what protobuf JSON writers legitimately vary made canonical.

    - numbers become floats: a double field holding 2.0 is written `2.0` by
      Python and `2` by Go and JavaScript; int64 values are strings in every
      writer (the proto3 mapping), so this loses no integer precision;
    - the special doubles become the mapping's strings ("NaN", "Infinity",
      "-Infinity"), which some writers emit and JSON cannot hold otherwise;
    - timestamps lose trailing fraction zeros (see `_timestamp`);
    - hex digests are lowercase.

    Key order never matters (objects are compared as dicts); list order does.
    """
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        number = float(value)
        if math.isnan(number):
            return "NaN"
        if math.isinf(number):
            return "Infinity" if number > 0 else "-Infinity"
        return number
    if isinstance(value, str):
        stamp = _timestamp(value)
        if stamp is not None:
            return stamp
        if re.fullmatch(r"[0-9a-fA-F]{64}", value):
            return value.lower()
    return value


def differences(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Where two normalized values differ, as "path: expected X, got Y" lines."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found: list[str] = []
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                found.append(f"{path}.{key}: missing (expected {expected[key]!r})")
            elif key not in expected:
                found.append(f"{path}.{key}: unexpected {actual[key]!r}")
            else:
                found.extend(differences(expected[key], actual[key], f"{path}.{key}"))
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        found = []
        if len(expected) != len(actual):
            found.append(f"{path}: {len(actual)} items, expected {len(expected)}")
        for index, (e, a) in enumerate(zip(expected, actual, strict=False)):
            found.extend(differences(e, a, f"{path}[{index}]"))
        return found
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


def compare_summary(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The differences between one log's expected and actual summaries (none: they agree)."""
    return differences(normalize(expected), normalize(actual))


def compare_dirs(actual_dir: Path, expected_dir: Path = EXPECTED_DIR) -> list[str]:
    """Every difference between the summaries in two folders, each line prefixed by its file."""
    found: list[str] = []
    expected_files = sorted(expected_dir.glob("*.json"))
    if not expected_files:
        return [f"{expected_dir}: no expected summaries"]
    for expected_file in expected_files:
        actual_file = actual_dir / expected_file.name
        if not actual_file.exists():
            found.append(f"{expected_file.name}: no actual summary in {actual_dir}")
            continue
        expected = json.loads(expected_file.read_text(encoding="utf-8"))
        actual = json.loads(actual_file.read_text(encoding="utf-8"))
        found.extend(f"{expected_file.name}: {d}" for d in compare_summary(expected, actual))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("actual", type=Path, help="folder of <name>.json summaries")
    parser.add_argument("--expected", type=Path, default=EXPECTED_DIR)
    args = parser.parse_args(argv)
    found = compare_dirs(args.actual, args.expected)
    for line in found[:200]:
        print(line)
    if len(found) > 200:
        print(f"... and {len(found) - 200} more")
    if not found:
        print(f"conformance: {args.actual} agrees with {args.expected}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
