"""What the SDK tests share: the scripted worker's script, the retry policy, the served service."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The fault tests' helpers (TcpProxy, ServeProcess) live in tests/robustness.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "robustness"))

from conversation_helpers import ServedApp

from turnlog.conversation.application import ConversationApplication
from turnlog_client import AsyncTurnlogClient, RetryPolicy

FIXED_NOW_US = 1_700_000_000_000_000

#: "slow story": 60 words streamed 15 ms a token apart (a few seconds), so a
#: test can act mid-turn; "ask the client" calls the client-side tool.
SCRIPT: dict[str, Any] = {
    "model": "scripted-sdk",
    "replies": [
        {"match": "slow story", "text": "once upon a time " * 15, "token_delay_ms": 15},
        {"match": "ask the client", "tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]},
        {
            "match": "what is 6*7",
            "text": "Let me compute.",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}],
        },
        # The default guardrail profile redacts the address (a MODIFY decision).
        {"match": "mail me", "text": "Write to alice@example.com please."},
    ],
    "default": {"text": "Hello there."},
}
#: Retries quick enough for tests, patient enough for a restart.
TEST_RETRY = RetryPolicy(max_attempts=12, initial_backoff_s=0.05, max_backoff_s=0.5, deadline_s=30)


@dataclass
class Service:
    served: ServedApp
    app: ConversationApplication

    @property
    def address(self) -> str:
        return self.served.address

    def client(self, target: str | None = None, **options: Any) -> AsyncTurnlogClient:
        options.setdefault("retry", TEST_RETRY)
        return AsyncTurnlogClient(target or self.address, token=self.served.token(), **options)
