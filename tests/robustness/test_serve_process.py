"""`turnlog serve` itself, not a server built in the test: bad input gets its status, and no traceback.

The fixtures of test_bad_input.py build the server with the same function
(`grpc_server`); this proves the process wires it so, and reads the
process's own output (where its log goes) for tracebacks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from worker_processes import printed_token

from turnlog.v1 import conversation_service_pb2 as spb

LISTENING = re.compile(r"turnlog serving gRPC on (\S+:\d+)")
S = "/turnlog.v1.ConversationService/"


def _reason(error: grpc.RpcError) -> str:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def test_bad_input_to_the_serve_process(database_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNLOG_")}
    env |= {
        "TURNLOG_DATABASE_URL": database_url,
        "TURNLOG_LISTEN": "127.0.0.1:0",
        "TURNLOG_DATA_DIR": str(tmp_path / "data"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "turnlog.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    address = None
    for line in proc.stdout:
        seen.append(line)
        if match := LISTENING.search(line):
            address = match.group(1)
            break
    try:
        if address is None:
            pytest.fail("turnlog serve exited without listening:\n" + "".join(seen))
        calls = [
            ("CreateConversation", b"\xff\xff\xff\xff", "MALFORMED_MESSAGE"),
            ("StreamTurn", b"\x0a\xff\xff\xff\xff\x0f", "MALFORMED_MESSAGE"),
            (
                "ListConversations",
                spb.ListConversationsRequest(
                    create_time_after=timestamp_pb2.Timestamp(seconds=2**62)
                ).SerializeToString(),
                "INVALID_REQUEST",
            ),
        ]
        credential = (("authorization", f"Bearer {printed_token(''.join(seen))}"),)
        with grpc.insecure_channel(address) as channel:
            for method, body, reason in calls * 3:
                path = S + method
                if method == "StreamTurn":
                    stream = channel.unary_stream(path)
                    with pytest.raises(grpc.RpcError) as info:
                        list(stream(body, timeout=30, metadata=credential))
                else:
                    unary = channel.unary_unary(path)
                    with pytest.raises(grpc.RpcError) as info:
                        unary(body, timeout=30, metadata=credential)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
                assert _reason(info.value) == reason
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    assert "ERROR:" not in output, output  # basicConfig's "LEVEL:logger:message"
    assert "Unexpected" not in output, output  # grpc's "Unexpected error in servicer"
    assert "internal error in a request handler" not in output, output
