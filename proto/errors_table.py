"""Render docs/errors.md's table of error reasons from the `ErrorReason` comments.

errors.proto is the one source: each `ErrorReason` value's comment starts
with "CODE, retryable." or "CODE, not retryable.", says when it happens, and
ends with "Metadata: ...". This script reads those comments from a
descriptor set built with source info (as proto/reference.py does) and
rewrites the block between the markers in docs/errors.md;
tests/ci/test_error_reasons.py fails when the page is stale or a comment
does not follow the form.

    python proto/errors_table.py           # rewrite the block
    python proto/errors_table.py --check   # exit 1 when it is stale
"""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import generate  # proto/generate.py: a script's own folder is first on sys.path
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "errors.md"
BEGIN, END = "<!-- reasons:begin -->\n", "<!-- reasons:end -->"
_FILE_ENUM, _ENUM_VALUE = 5, 2
_HEAD = re.compile(r"^([A-Z_]+), (retryable|not retryable)\. (.*)$", re.S)


@dataclass(frozen=True)
class Reason:
    """One `ErrorReason` value as its comment describes it."""

    name: str
    code: str
    retryable: bool
    when: str
    metadata: tuple[str, ...]
    metadata_text: str
    """The "Metadata:" sentence as written (the keys with their explanations)."""


def _parse(name: str, comment: str) -> Reason:
    text = " ".join(comment.split())
    head = _HEAD.match(text)
    if head is None:
        raise ValueError(f"{name}: the comment must start with 'CODE, (not )retryable.'")
    code, retry, rest = head.groups()
    when, found, keys = rest.rpartition(" Metadata: ")
    if not found:
        raise ValueError(f"{name}: the comment must end with 'Metadata: ...'")
    keys = keys.rstrip(".")
    bare = re.sub(r"\([^)]*\)", "", keys)
    metadata = tuple(k for k in re.findall(r"[a-z][A-Za-z]*", bare) if k not in ("or", "none"))
    return Reason(name, code, retry == "retryable", when, metadata, keys)


def _marked(text: str, keys: tuple[str, ...]) -> str:
    """`text` with each key outside parentheses in backticks."""
    parts = re.split(r"(\([^)]*\))", text)
    for i in range(0, len(parts), 2):
        for key in keys:
            parts[i] = re.sub(rf"\b{key}\b", f"`{key}`", parts[i])
    return "".join(parts)


def reasons(files: descriptor_pb2.FileDescriptorSet) -> list[Reason]:
    """Every `turnlog.v1.ErrorReason` value but UNSPECIFIED, in declaration order."""
    for file in files.file:
        if file.name != "turnlog/v1/errors.proto":
            continue
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        for e, enum in enumerate(file.enum_type):
            if enum.name != "ErrorReason":
                continue
            return [
                _parse(value.name, comments.get((_FILE_ENUM, e, _ENUM_VALUE, v), ""))
                for v, value in enumerate(enum.value)
                if value.number != 0
            ]
    raise LookupError("turnlog.v1.ErrorReason not found")


def current_reasons() -> list[Reason]:
    """The reasons as proto/ holds them now."""
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.binpb"
        generate.write_image(image)
        return reasons(descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()))


def table(found: list[Reason]) -> str:
    rows = [
        "| reason | status code | retryable | when | metadata |",
        "|---|---|---|---|---|",
    ]
    for r in found:
        keys = _marked(r.metadata_text, r.metadata) if r.metadata else "—"
        rows.append(
            f"| `{r.name}` | {r.code} | {'yes' if r.retryable else 'no'} | {r.when} | {keys} |"
        )
    return "\n".join(rows) + "\n"


def rendered_page(page: str, found: list[Reason]) -> str:
    before, _, rest = page.partition(BEGIN)
    _, _, after = rest.partition(END)
    return before + BEGIN + table(found) + END + after


def main() -> int:
    page = PAGE.read_text()
    wanted = rendered_page(page, current_reasons())
    if "--check" in sys.argv[1:]:
        if wanted != page:
            print("docs/errors.md is stale; run: python proto/errors_table.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
