"""`.ci/check_lock.py` fails on a stale lock and passes on the committed one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / ".ci" / "check_lock.py"


def _check(pyproject_text: str, lock_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    pyproject = tmp_path / "pyproject.toml"
    lock = tmp_path / "requirements.lock"
    pyproject.write_text(pyproject_text)
    lock.write_text(lock_text)
    return subprocess.run(
        [sys.executable, str(CHECK), "--pyproject", str(pyproject), "--lock", str(lock)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_committed_lock_satisfies_pyproject(tmp_path: Path) -> None:
    result = _check(
        (ROOT / "pyproject.toml").read_text(), (ROOT / "requirements.lock").read_text(), tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "satisfies pyproject.toml" in result.stdout


def test_new_dependency_missing_from_lock_fails(tmp_path: Path) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject = pyproject.replace(
        '"tqdm>=4.66,<5",', '"tqdm>=4.66,<5",\n    "definitely-not-locked-pkg>=1",'
    )
    result = _check(pyproject, (ROOT / "requirements.lock").read_text(), tmp_path)
    assert result.returncode == 1
    assert "definitely-not-locked-pkg>=1" in result.stderr
    assert "is not pinned" in result.stderr
    assert "make lock" in result.stderr


def test_pin_outside_range_fails(tmp_path: Path) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text().replace('"tqdm>=4.66,<5"', '"tqdm>=99"')
    result = _check(pyproject, (ROOT / "requirements.lock").read_text(), tmp_path)
    assert result.returncode == 1
    assert "asks for tqdm>=99" in result.stderr


def test_pin_nothing_requires_fails(tmp_path: Path) -> None:
    lock = (
        ROOT / "requirements.lock"
    ).read_text() + "\nleftover-package==1.0 \\\n    --hash=sha256:00\n"
    result = _check((ROOT / "pyproject.toml").read_text(), lock, tmp_path)
    assert result.returncode == 1
    assert "leftover-package==1.0, which nothing requires" in result.stderr


def test_runtime_floor_below_generated_code_fails(tmp_path: Path) -> None:
    pyproject, count = re.subn(
        r'"grpcio>=[0-9.]+,<2"', '"grpcio>=1.0,<2"', (ROOT / "pyproject.toml").read_text()
    )
    assert count == 1
    result = _check(pyproject, (ROOT / "requirements.lock").read_text(), tmp_path)
    assert result.returncode == 1
    assert "gen/ was made with grpcio" in result.stderr
