"""`ErrorReason` lists exactly the reasons the code raises, with their codes, and docs/errors.md shows it.

The enum (proto/turnlog/v1/errors.proto) is the client's list of reasons;
`turnlog.errors` and the few modules that define their own `TurnlogError`
subclasses are the service's. The scan reads the source for every
`reason = "..."` (so a reason cannot be added without the enum knowing),
imports the modules that hold them, and compares each class's status code
and retryability with the enum value's comment.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from google.rpc import code_pb2  # type: ignore[import-untyped]

from turnlog import errors, grpc_errors
from turnlog.v1 import errors_pb2

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = (ROOT / "services", ROOT / "storage")
REASON_LINE = re.compile(r'^\s*reason(?:: ClassVar\[str\])? = "([A-Z][A-Z0-9_]*)"', re.M)

#: Listed by the enum ahead of the code that raises them (a contract
#: committed first). The test fails once one is raised, so it is emptied then.
PENDING: frozenset[str] = frozenset()


def _load(path: Path) -> ModuleType:
    # The script imports its neighbours (generate, reference) as a script
    # would; they leave sys.modules again, so that no other test's module of
    # the same name (tests/clients has a `reference`) is shadowed.
    before = set(sys.modules)
    sys.path.insert(0, str(path.parent))
    try:
        return _exec(path)
    finally:
        sys.path.remove(str(path.parent))
        for name in set(sys.modules) - before - {path.stem}:
            if str(path.parent) in str(getattr(sys.modules[name], "__file__", "")):
                del sys.modules[name]


def _exec(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


TABLE = _load(ROOT / "proto" / "errors_table.py")


def _scan() -> dict[str, list[str]]:
    """reason -> the modules whose source assigns it."""
    found: dict[str, list[str]] = {}
    for root in SOURCE_ROOTS:
        for path in sorted(root.rglob("*.py")):
            for reason in REASON_LINE.findall(path.read_text()):
                module = ".".join(path.relative_to(root).with_suffix("").parts)
                found.setdefault(reason, []).append(module)
    return found


def _subclasses(cls: type[errors.TurnlogError]) -> list[type[errors.TurnlogError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


def _error_classes() -> dict[str, type[errors.TurnlogError]]:
    """reason -> its class, after importing every module that assigns a reason."""
    for modules in _scan().values():
        for module in modules:
            importlib.import_module(module)
    classes: dict[str, type[errors.TurnlogError]] = {}
    for cls in _subclasses(errors.TurnlogError):
        if cls.__module__.startswith("turnlog."):
            classes.setdefault(cls.reason, cls)
    return classes


def _enum_names() -> set[str]:
    return {v.name for v in errors_pb2.ErrorReason.DESCRIPTOR.values if v.number != 0}


def test_every_reason_the_code_uses_is_listed() -> None:
    used = set(_scan()) | set(_error_classes())
    assert used, "the scan found no reasons"
    assert used - _enum_names() == set(), "reasons raised but not in ErrorReason"


def test_every_listed_reason_is_used() -> None:
    used = set(_scan()) | set(_error_classes())
    assert _enum_names() - used - PENDING == set(), "ErrorReason lists reasons nothing raises"
    assert PENDING & used == set(), "a pending reason is raised now: remove it from PENDING"


def test_codes_and_retryability_match_the_comments() -> None:
    classes = _error_classes()
    documented = {r.name: r for r in TABLE.current_reasons()}
    assert set(documented) == _enum_names()
    for reason, cls in classes.items():
        error = cls.__new__(cls)  # only its type matters to the status table
        code = code_pb2.Code.Name(grpc_errors.code_of(error))
        assert documented[reason].code == code, reason
        assert documented[reason].retryable == cls.retryable, reason


def test_docs_errors_table_is_current() -> None:
    page = TABLE.PAGE.read_text()
    assert TABLE.rendered_page(page, TABLE.current_reasons()) == page, (
        "docs/errors.md is stale: run python proto/errors_table.py"
    )


def test_a_comment_out_of_form_is_refused() -> None:
    reason = TABLE._parse("X", "FAILED_PRECONDITION, retryable. When. Metadata: a, b (why).")
    assert (reason.code, reason.retryable, reason.metadata) == (
        "FAILED_PRECONDITION",
        True,
        ("a", "b"),
    )
    for bad in ("When it happens. Metadata: none.", "ABORTED, not retryable. No metadata."):
        try:
            TABLE._parse("X", bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
