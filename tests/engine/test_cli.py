"""The worker CLI refuses configurations that could serve a script in place of a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from turnlog.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "--model", "m", "--script", "s.json"], "never runs a script"),
        (["worker", "--backend", "scripted", "--model", "m", "--script", "s"], "only --script"),
        (["worker", "--backend", "scripted"], "needs --script"),
        (["worker"], "--model is required"),
    ],
)
def test_worker_refuses_ambiguous_backends(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert message in str(caught.value)


def test_worker_refuses_a_stream_interval_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["worker", "--model", "m", "--stream-interval", "0"])
    assert caught.value.code == 2
    assert "'0' is not a whole number of at least 1" in capsys.readouterr().err


def test_tiny_model_is_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "turnlog.cli", "dev", "tiny-model", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_model / name).read_bytes(), name
