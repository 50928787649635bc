"""`turnlog chat` in a pseudo-terminal against a live `turnlog serve` (pexpect).

The service is a `turnlog serve` subprocess over a scripted `turnlog worker`
subprocess whose "slow story" streams for seconds, so the test can press
Ctrl-C mid-turn. Both are subprocesses because pexpect forks this process to
start the chat: a fork while gRPC threads run here crashes the child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from sdk_helpers import SCRIPT
from serve_processes import ServeProcess
from worker_processes import WorkerProcess

from turnlog.v1 import conversation_pb2 as pb
from turnlog_client import TurnlogClient, verify_export

pytestmark = pytest.mark.timeout(180)
#: The prompt as prompt_toolkit draws it (it moves the cursor instead of writing the space).
PROMPT = "you>"


def _spawn(serve: ServeProcess, *args: str, token: bool = True) -> pexpect.spawn:
    env = {
        **os.environ,
        "TURNLOG_DATA_DIR": serve.env["TURNLOG_DATA_DIR"],
        "PROMPT_TOOLKIT_NO_CPR": "1",  # pexpect answers no cursor-position requests
        "TERM": "xterm",
        "NO_COLOR": "1",
    }
    env.pop("TURNLOG_TOKEN", None)
    command = ["-m", "turnlog.cli", "chat", "--target", serve.target, *args]
    if token:
        command += ["--token", serve.token]
    return pexpect.spawn(
        sys.executable,
        command,
        env=env,
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 200),
        logfile=sys.stderr if os.environ.get("SDK_DEBUG") else None,
    )


def _session(serve: ServeProcess, export_to: Path) -> str:
    """Drives one chat; returns the conversation's name."""
    chat = _spawn(serve, token=False)  # the token is minted from the data folder's key
    chat.expect(r"created (conversations/\S+)")
    name = str(chat.match.group(1))
    chat.expect_exact("type a message, or /help")
    chat.expect_exact(PROMPT)

    chat.sendline("hello")
    chat.expect_exact("Hello there.")
    chat.expect_exact(PROMPT)

    # (The scripted model answers the first cue found in the whole prompt, so
    # the cues come in the script's reverse order.)
    chat.sendline("please mail me")
    chat.expect(r"guardrail \S+: modify")  # shown inline as the reply streams
    chat.expect_exact(PROMPT)

    chat.sendline("what is 6*7")  # a tool this conversation does not offer
    chat.expect_exact("retracted")
    chat.expect_exact("guardrail tool_allow_list: block")
    chat.expect_exact("[turn blocked: sanitize_response/tool_allow_list")
    chat.expect_exact(PROMPT)

    chat.sendline("tell me a slow story")
    chat.expect_exact("once upon a time once upon")  # streamed text arrives
    chat.sendintr()  # Ctrl-C mid-turn
    chat.expect_exact("cancelling the turn")
    chat.expect_exact("[turn cancelled")
    chat.expect_exact(PROMPT)
    assert chat.isalive(), "Ctrl-C ended the program, not the turn"

    chat.sendline("/history")
    chat.expect_exact("you> hello")
    chat.expect_exact("assistant> Hello there.")
    chat.expect_exact("you> tell me a slow story")
    chat.expect_exact(PROMPT)

    chat.sendline(f"/export {export_to}")
    chat.expect(r"exported (\d+) events to .* \(hash chain intact\)")
    chat.expect_exact(PROMPT)

    chat.sendline("/fork")
    chat.expect(rf"forked {name} into (conversations/\S+)")
    fork = str(chat.match.group(1))
    assert fork != name
    chat.expect_exact(PROMPT)
    chat.sendline("/history")
    chat.expect_exact(fork)
    chat.expect_exact("assistant> Hello there.")
    chat.expect_exact("you> tell me a slow story")
    chat.expect_exact(PROMPT)

    chat.sendintr()  # Ctrl-C at the prompt clears the line, nothing more
    chat.expect_exact("Ctrl-D or /quit")
    assert chat.isalive()
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    return name


CREATE_WITH_CALCULATOR = """
import sys
from turnlog.v1 import conversation_pb2 as pb
from turnlog_client import TurnlogClient
schema = '{"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}'
with TurnlogClient(sys.argv[1], token=sys.argv[2]) as client:
    tools = [pb.ToolDefinition(name="calculator", parameters_json_schema=schema)]
    print(client.create_conversation(tools=tools).name)
"""


def _tools(serve: ServeProcess) -> None:
    """Tool calls and results inline, in a conversation offering the service's calculator."""
    # Made by a subprocess: no gRPC threads may run here when pexpect forks.
    made = subprocess.run(
        [sys.executable, "-c", CREATE_WITH_CALCULATOR, serve.target, serve.token],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    name = made.stdout.strip()
    chat = _spawn(serve, "--conversation", name)
    chat.expect_exact(f"resumed {name}")
    chat.expect_exact(PROMPT)
    chat.sendline("what is 6*7")
    chat.expect_exact('tool call calculator({"expression": "6*7"}) (service)')
    chat.expect_exact('tool result {"result": 42}')
    chat.expect_exact(PROMPT)
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)


def _resume(serve: ServeProcess, name: str) -> None:
    chat = _spawn(serve, "--conversation", name.removeprefix("conversations/"))
    chat.expect_exact(f"resumed {name}")
    chat.expect_exact("assistant> Hello there.")
    chat.expect_exact("type a message, or /help")
    chat.expect_exact(PROMPT)
    # A turn another client started (the last spawn is behind us: gRPC may
    # run here now), cancelled with /cancel.
    with TurnlogClient(serve.target, token=serve.token) as other:
        stream = other.stream_turn(name, "one more slow story")
        next(stream)
        chat.sendline("/cancel")
        chat.expect_exact("[turn cancelled]")
        chat.expect_exact(PROMPT)
        assert list(stream)[-1].turn_ended.turn.status == pb.TURN_STATUS_CANCELLED
    chat.sendline("/cancel")
    chat.expect_exact("no turn is running")
    chat.expect_exact(PROMPT)
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_turnlog_chat_in_a_terminal(database_url: str, tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    worker = WorkerProcess(
        ["--backend", "scripted", "--script", str(script)], tmp_path / "worker.log"
    )
    worker.start()
    serve = ServeProcess(
        tmp_path / "serve.log", tmp_path / "data", database_url=database_url, worker=worker.target
    )
    try:
        serve.start()
        export = tmp_path / "chat.jsonl"
        name = _session(serve, export)
        _tools(serve)
        _resume(serve, name)
    finally:
        serve.stop()
        worker.terminate()
    [report] = verify_export(export)
    assert report.intact
    assert report.stream_id == "conversation-" + name.removeprefix("conversations/")
