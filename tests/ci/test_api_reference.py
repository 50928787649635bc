"""docs/api-reference.md is rendered from the protos' comments, and a stale page fails the check."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "proto" / "generate.py"


def _reference_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reference", ROOT / "proto" / "reference.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _descriptors(tmp_path: Path, text: str) -> descriptor_pb2.FileDescriptorSet:
    proto = tmp_path / "turnlog" / "v1" / "sample.proto"
    proto.parent.mkdir(parents=True)
    proto.write_text(text)
    image = tmp_path / "image.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path}",
            "--include_source_info",
            f"--descriptor_set_out={image}",
            "turnlog/v1/sample.proto",
        ],
        check=True,
        timeout=60,
    )
    return descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())


SAMPLE = """\
// The sample file.
//
// Its second paragraph.
syntax = "proto3";

package turnlog.v1;

// Greeter greets.
service Greeter {
  // Hello says hello | twice.
  rpc Hello(HelloRequest) returns (stream HelloResponse);
}

// HelloRequest asks.
message HelloRequest {
  // Who to greet.
  string name = 1;
  // Labels.
  map<string, int64> labels = 2;
  // Maybe.
  optional int32 times = 3;
  oneof how {
    // Loudly.
    bool loud = 4;
  }
}

// HelloResponse answers.
message HelloResponse {
  // The mood.
  Mood mood = 1;
}

// Mood is a mood.
enum Mood {
  // Not set.
  MOOD_UNSPECIFIED = 0;
  // Glad.
  MOOD_GLAD = 1;
}
"""


def test_render_lists_every_rpc_field_and_value_with_its_comment(tmp_path: Path) -> None:
    page = _reference_module().render(_descriptors(tmp_path, SAMPLE))

    assert "The sample file.\n\nIts second paragraph." in page
    assert (
        "| `Hello` | [HelloRequest](#turnlogv1hellorequest) | "
        "stream [HelloResponse](#turnlogv1helloresponse) | Hello says hello \\| twice. |"
    ) in page
    assert "| `name` | 1 | string | Who to greet. |" in page
    assert "| `labels` | 2 | map<string, int64> | Labels. |" in page
    assert "| `times` | 3 | optional int32 | Maybe. |" in page
    assert "| `loud` | 4 | bool (oneof `how`) | Loudly. |" in page
    assert "| `mood` | 1 | [Mood](#turnlogv1mood) | The mood. |" in page
    assert "| `MOOD_GLAD` | 1 | Glad. |" in page
    assert "LabelsEntry" not in page  # a map's entry type is not a message of the API


def test_the_committed_reference_is_current_and_a_stale_one_fails(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for part in ("proto", "gen", "docs"):
        shutil.copytree(ROOT / part, copy / part)

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(copy / "proto" / "generate.py"), "--check"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    assert check().returncode == 0
    page = copy / "docs" / "api-reference.md"
    page.write_text(page.read_text().replace("CancelTurn cancels", "CancelTurn stops"))
    stale = check()
    assert stale.returncode == 1
    assert "docs/api-reference.md" in stale.stderr
