"""The import structure that docs/architecture.md describes, checked on the source.

- No import cycles among turnlog's modules (imports made only for type
  checking do not count: they never run).
- The layers point one way: `api` above `conversation` and `history`;
  `history` may use `conversation`, never the other way; neither imports `api`.
  `auth` (credentials) sits beside them, used by `api` only.
- psycopg is imported only under `storage/`; the domain imports neither
  grpc nor psycopg.
- Every name a public module exports in `__all__` exists.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = (ROOT / "services", ROOT / "storage")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for source_root in SOURCE_ROOTS:
        for path in sorted((source_root / "turnlog").rglob("*.py")):
            parts = path.relative_to(source_root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[str]:
    """Every module name imported where it runs (not under `if TYPE_CHECKING:`)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (name for child in node.orelse for name in _imports(child))
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            # `from turnlog.conversation import turn` imports a module too.
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        yield from _imports(node)


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges[name] = {m for m in _imports(tree) if m in MODULES and m != name}
    return edges


EDGES = _edges()
ALL_IMPORTS = {
    name: set(_imports(ast.parse(path.read_text(), filename=str(path))))
    for name, path in MODULES.items()
}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components; any with two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(EDGES[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(EDGES):
        if node not in index:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("turnlog.conversation", "turnlog.api"),
        ("turnlog.conversation", "turnlog.history"),
        ("turnlog.history", "turnlog.api"),
        ("turnlog.domain", "turnlog.conversation"),
        ("turnlog.storage", "turnlog.conversation"),
        ("turnlog.eventlog", "turnlog.conversation"),
        ("turnlog.eventlog", "turnlog.history"),
        # Credentials are the API's business: below it a tenant is a plain
        # string, and `auth` knows nothing of conversations or the log.
        ("turnlog.conversation", "turnlog.auth"),
        ("turnlog.history", "turnlog.auth"),
        ("turnlog.auth", "turnlog.api"),
        ("turnlog.auth", "turnlog.conversation"),
        ("turnlog.auth", "turnlog.history"),
        ("turnlog.auth", "turnlog.storage"),
    ],
)
def test_layers_point_one_way(lower: str, upper: str) -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in EDGES.items()
        if _in(module, lower)
        for target in targets
        if _in(target, upper)
    )
    assert wrong == []


def test_psycopg_only_under_storage() -> None:
    outside = sorted(
        module
        for module, imported in ALL_IMPORTS.items()
        if not _in(module, "turnlog.storage") and any(_in(m, "psycopg") for m in imported)
    )
    assert outside == []


def test_the_domain_imports_no_grpc_or_psycopg() -> None:
    wrong = sorted(
        f"{module} -> {m}"
        for module, imported in ALL_IMPORTS.items()
        if _in(module, "turnlog.domain")
        for m in imported
        if _in(m, "grpc") or _in(m, "psycopg")
    )
    assert wrong == []


@pytest.mark.parametrize(
    "module",
    sorted(
        name
        for name, path in MODULES.items()
        if _in(name, "turnlog.conversation")
        or _in(name, "turnlog.api")
        or name in ("turnlog.eventlog", "turnlog.storage", "turnlog.storage.liveness")
    ),
)
def test_exports_exist(module: str) -> None:
    loaded = importlib.import_module(module)
    missing = [n for n in getattr(loaded, "__all__", ()) if not hasattr(loaded, n)]
    assert missing == []


def test_test_file_names_are_unique() -> None:
    """pytest imports test files by their base name (rootdir import mode): two alike fail collection."""
    seen: dict[str, list[str]] = {}
    for path in sorted((Path(__file__).parent).rglob("test_*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(Path(__file__).parent)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
