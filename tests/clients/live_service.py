"""What the client tests share: the scripted engine's script, the service and the built programs.

The examples' default prompts are the script's cues (see `SCRIPT`).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_DIR = ROOT / "clients" / "conformance"
SERVING = re.compile(r"turnlog serving gRPC on (\S+):(\d+)")

#: The story is slow enough (about 3 s) that a client cuts its stream while
#: the turn still runs; the countdown (about 20 s) is what a client cancels.
STORY = "Once upon a time there was a log. " * 6
COUNTDOWN = "One, two, three, four, five, six, seven, eight, nine, ten. " * 16
FORECAST_REPLY = "It is sunny in Paris, 21 °C."

# The scripted engine answers with the first reply whose `match` occurs in
# the rendered prompt, history included, so a later turn's cue comes first.
SCRIPT = {
    "model": "scripted-clients",
    "replies": [
        {"match": "Count slowly", "text": COUNTDOWN, "token_delay_ms": 20},
        # The client's tool result is in the prompt: the model's final answer.
        {"match": "sunny", "text": FORECAST_REPLY},
        {
            "match": "What is the weather in Paris?",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        },
        {"match": "Tell me a story", "text": STORY, "token_delay_ms": 15},
    ],
    "default": {"text": "Hello from the scripted engine."},
}


@dataclass(frozen=True)
class Service:
    """A running `turnlog serve`: its address, the token it printed, its database."""

    target: str
    token: str
    database_url: str


GO_DIR = ROOT / "clients" / "go"
GO_MODULE = "github.com/turnlog/turnlog/clients/go"


@dataclass(frozen=True)
class GoPrograms:
    """The Go client's programs, built from this checkout."""

    example: Path
    conformance: Path


NODE_CLIENT = ROOT / "clients" / "node"


def node_executable() -> str:
    """`node`, with the Node client package's modules installed; fails the test otherwise."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (Node 20+ is part of the test environment)")
    modules = NODE_CLIENT / "node_modules"
    if not all((modules / p).is_dir() for p in ("@connectrpc/connect-node", "@bufbuild/protobuf")):
        pytest.fail("clients/node has no node_modules: run `make clients-node-install`")
    return node
