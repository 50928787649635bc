"""A deterministic engine that replays scripted replies, for tests and offline demos.

It is never a default: `turnlog worker --backend scripted --script FILE` is
the only way to start it, and a worker given `--model` refuses a script.

The script is a JSON file::

    {
      "model": "scripted-demo",            # optional name reported by GetModelInfo
      "max_context_tokens": 4096,          # optional
      "replies": [                         # first whose match is in the prompt wins
        {"match": "weather",
         "text": "Let me check.",
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
         "first_token_delay_ms": 0, "token_delay_ms": 5,
         "fail_at_token": 3, "fail_reason": "ENGINE_UNAVAILABLE"}
      ],
      "default": {"text": "Hello from the scripted engine."}
    }

Tokens are UTF-8 bytes (ids 0-255) plus BOS 256, EOS 257 and PAD 258. A reply
is its text followed by hermes-style ``<tool_call>{json}</tool_call>`` blocks
and EOS; with `ignore_eos` (or until `min_tokens`) it repeats. Sampling
parameters other than max/min tokens, stops and ignore_eos have no effect.
Structured output constraints are validated but not enforced.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2

from turnlog import errors
from turnlog.engine.v1 import engine_pb2
from turnlog.worker.backend import (
    GenerationEvent,
    RequestProgress,
    add_generation_prompt,
    chat_to_openai,
    count_chat_tokens,
    output_budget,
    validate_start,
)

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259
EMBEDDING_DIM = 8
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FAILURES: Mapping[str, type[errors.TurnlogError]] = {
    "ENGINE_UNAVAILABLE": errors.EngineUnavailableError,
    "ENGINE_INTERNAL": errors.EngineInternalError,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ScriptedReply:
    """One scripted reply (see the module docstring for the fields)."""

    match: str | None = None
    text: str = ""
    tool_calls: tuple[tuple[str, str], ...] = ()
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    fail_at_token: int | None = None
    fail_reason: str = "ENGINE_INTERNAL"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScriptedReply:
        """Build a reply from its JSON object; raises ValueError if malformed."""
        known = {
            "match",
            "text",
            "tool_calls",
            "first_token_delay_ms",
            "token_delay_ms",
            "fail_at_token",
            "fail_reason",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown reply fields: {sorted(unknown)}")
        fail_reason = str(data.get("fail_reason", "ENGINE_INTERNAL"))
        if fail_reason not in _FAILURES:
            raise ValueError(f"fail_reason must be one of {sorted(_FAILURES)}")
        calls = tuple(
            (str(c["name"]), json.dumps(c.get("arguments", {}), ensure_ascii=False))
            for c in data.get("tool_calls", [])
        )
        fail_at = data.get("fail_at_token")
        return cls(
            match=data.get("match"),
            text=str(data.get("text", "")),
            tool_calls=calls,
            first_token_delay_s=float(data.get("first_token_delay_ms", 0)) / 1000,
            token_delay_s=float(data.get("token_delay_ms", 0)) / 1000,
            fail_at_token=None if fail_at is None else int(fail_at),
            fail_reason=fail_reason,
        )

    def output_text(self) -> str:
        """The reply as the model would write it, tool calls included."""
        blocks = [
            f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n</tool_call>'
            for name, args in self.tool_calls
        ]
        return self.text + "".join(blocks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Script:
    """A parsed script file."""

    model: str = "scripted"
    max_context_tokens: int = 4096
    replies: tuple[ScriptedReply, ...] = ()
    default: ScriptedReply = field(default_factory=lambda: ScriptedReply(text="Hello."))

    @classmethod
    def load(cls, path: Path) -> Script:
        """Read a script file; raises ValueError with a clear message if malformed."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read script {path}: {e}") from e
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Script:
        """Build a script from its JSON object; raises ValueError if malformed."""
        unknown = set(data) - {"model", "max_context_tokens", "replies", "default"}
        if unknown:
            raise ValueError(f"unknown script fields: {sorted(unknown)}")
        return cls(
            model=str(data.get("model", "scripted")),
            max_context_tokens=int(data.get("max_context_tokens", 4096)),
            replies=tuple(ScriptedReply.from_json(r) for r in data.get("replies", [])),
            default=ScriptedReply.from_json(data.get("default", {"text": "Hello."})),
        )

    def reply_for(self, prompt: str) -> ScriptedReply:
        """The first reply whose `match` occurs in the prompt, else the default."""
        for reply in self.replies:
            if reply.match is None or reply.match in prompt:
                return reply
        return self.default


def encode(text: str, *, add_special_tokens: bool) -> list[int]:
    """Scripted tokenization: UTF-8 bytes, BOS first when special tokens are added."""
    ids = list(text.encode("utf-8"))
    return [BOS_ID, *ids] if add_special_tokens else ids


def decode(ids: list[int], *, skip_special_tokens: bool) -> str:
    """Inverse of `encode` (special tokens dropped or written as markers)."""
    out = bytearray()
    for i in ids:
        if i < 256:
            out.append(i)
        elif not skip_special_tokens:
            out += {BOS_ID: b"<s>", EOS_ID: b"</s>", PAD_ID: b"<pad>"}.get(i, b"")
    return out.decode("utf-8", errors="replace")


def render_chatml(chat: engine_pb2.ChatPrompt) -> str:
    """ChatML rendering with a hermes-style tools block (as the tiny model's template)."""
    messages, tools = chat_to_openai(chat)
    parts: list[str] = []
    if tools:
        system = ""
        if messages and messages[0]["role"] == "system":
            system = f"{messages[0]['content']}\n\n"
            messages = messages[1:]
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        parts.append(
            f"<|im_start|>system\n{system}# Tools\n<tools>\n{listed}\n</tools><|im_end|>\n"
        )
    for m in messages:
        content = str(m["content"])
        for call in m.get("tool_calls", []) or []:  # type: ignore[attr-defined]
            fn = call["function"]
            content += (
                f'\n<tool_call>\n{{"name": {json.dumps(fn["name"])}, '
                f'"arguments": {fn["arguments"]}}}\n</tool_call>'
            )
        parts.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
    if add_generation_prompt(chat):
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def parse_tool_calls(text: str) -> tuple[list[engine_pb2.ToolCall], str]:
    """Hermes-style tool calls in a text, and the text outside them."""
    calls: list[engine_pb2.ToolCall] = []
    for n, match in enumerate(_TOOL_CALL.finditer(text)):
        try:
            body = json.loads(match.group(1))
            name = str(body["name"])
            args = json.dumps(body.get("arguments", {}), ensure_ascii=False)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        calls.append(engine_pb2.ToolCall(id=f"call_{n}", name=name, arguments_json=args))
    content = _TOOL_CALL.sub("", text) if calls else text
    return calls, content.strip() if calls else content


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class ScriptedEngine:
    """The scripted backend (implements `EngineBackend`)."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self._running = 0

    @property
    def max_context_tokens(self) -> int:
        return self._script.max_context_tokens

    def _prompt(self, start: engine_pb2.StartGeneration) -> tuple[str, list[int]]:
        kind = start.WhichOneof("prompt")
        if kind == "prompt_text":
            return start.prompt_text, encode(start.prompt_text, add_special_tokens=True)
        if kind == "chat":
            text = render_chatml(start.chat)
            return text, encode(text, add_special_tokens=False)
        ids = list(start.prompt_token_ids.ids)
        if any(i >= VOCAB_SIZE for i in ids):
            raise errors.InvalidArgumentError(
                f"token ids must be below the vocabulary size {VOCAB_SIZE}",
                metadata={"field": "prompt_token_ids"},
            )
        return decode(ids, skip_special_tokens=True), ids

    async def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        engine_request_id: str,
        progress: RequestProgress,
    ) -> AsyncIterator[GenerationEvent]:
        validate_start(start)
        prompt_text, prompt_ids = self._prompt(start)
        progress.prompt_tokens = len(prompt_ids)
        budget = output_budget(start, len(prompt_ids), self.max_context_tokens)
        reply = self._script.reply_for(prompt_text)
        sampling = start.sampling
        reply_ids = [*encode(reply.output_text(), add_special_tokens=False), EOS_ID]
        stops = list(sampling.stop)
        stop_ids = set(sampling.stop_token_ids)
        skip_special = start.skip_special_tokens if start.HasField("skip_special_tokens") else True
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        produced: list[int] = []
        finish = engine_pb2.FINISH_REASON_LENGTH
        matched: str | int | None = None
        self._running += 1
        try:
            if reply.first_token_delay_s:
                await asyncio.sleep(reply.first_token_delay_s)
            position = 0
            while len(produced) < budget:
                if reply.fail_at_token is not None and len(produced) >= reply.fail_at_token:
                    raise _FAILURES[reply.fail_reason]("scripted failure")
                token = reply_ids[position % len(reply_ids)]
                position += 1
                is_eos = token == EOS_ID
                min_ok = len(produced) >= sampling.min_tokens
                if is_eos and (sampling.ignore_eos or not min_ok):
                    continue
                if (is_eos or token in stop_ids) and min_ok:
                    finish, matched = engine_pb2.FINISH_REASON_STOP, token
                    break
                piece = (
                    decoder.decode(bytes([token]))
                    if token < 256
                    else decode([token], skip_special_tokens=skip_special)
                )
                candidate = text + piece
                hit = next((s for s in stops if s in candidate), None)
                if hit is not None:
                    piece = candidate[: candidate.index(hit)][len(text) :]
                    finish, matched = engine_pb2.FINISH_REASON_STOP_SEQUENCE, hit
                    if piece:
                        text += piece
                    produced.append(token)
                    progress.completion_tokens = len(produced)
                    yield engine_pb2.GenerationDelta(
                        request_id=start.request_id, token_ids=[token], text=piece
                    )
                    break
                text = candidate
                produced.append(token)
                progress.completion_tokens = len(produced)
                if progress.first_token is None:
                    progress.first_token = time.monotonic()
                yield engine_pb2.GenerationDelta(
                    request_id=start.request_id,
                    token_ids=[token],
                    text=piece,
                    logprobs=(
                        [engine_pb2.TokenLogprobs(token_id=token, logprob=0.0)]
                        if sampling.HasField("logprobs")
                        else []
                    ),
                )
                if reply.token_delay_s:
                    await asyncio.sleep(reply.token_delay_s)
                else:
                    await asyncio.sleep(0)
        finally:
            self._running -= 1
        done = engine_pb2.GenerationDone(
            request_id=start.request_id,
            finish_reason=finish,
            usage=engine_pb2.Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(produced)),
        )
        if isinstance(matched, str):
            done.matched_stop_string = matched
        elif matched is not None:
            done.matched_stop_token_id = matched
        now = time.monotonic()
        done.timings.total.CopyFrom(_duration(now - progress.arrival))
        if progress.first_token is not None:
            done.timings.time_to_first_token.CopyFrom(
                _duration(progress.first_token - progress.arrival)
            )
        calls, content = parse_tool_calls(text)
        if calls:
            done.tool_calls.extend(calls)
            done.content = content
        yield done

    async def tokenize(self, request: engine_pb2.TokenizeRequest) -> engine_pb2.TokenizeResponse:
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return engine_pb2.TokenizeResponse(token_ids=encode(request.text, add_special_tokens=add))

    async def detokenize(
        self, request: engine_pb2.DetokenizeRequest
    ) -> engine_pb2.DetokenizeResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        if any(i >= VOCAB_SIZE for i in request.token_ids):
            raise errors.InvalidArgumentError(
                f"token ids must be below the vocabulary size {VOCAB_SIZE}",
                metadata={"field": "token_ids"},
            )
        return engine_pb2.DetokenizeResponse(
            text=decode(list(request.token_ids), skip_special_tokens=skip)
        )

    async def render_chat(
        self, request: engine_pb2.RenderChatRequest
    ) -> engine_pb2.RenderChatResponse:
        if not request.chat.messages:
            raise errors.InvalidArgumentError("the chat is empty", metadata={"field": "chat"})
        validate_start(engine_pb2.StartGeneration(request_id="render", chat=request.chat))
        text = render_chatml(request.chat)
        return engine_pb2.RenderChatResponse(
            prompt_text=text, prompt_token_ids=encode(text, add_special_tokens=False)
        )

    async def count_chat_tokens(
        self, request: engine_pb2.CountChatTokensRequest
    ) -> engine_pb2.CountChatTokensResponse:
        async def length(chat: engine_pb2.ChatPrompt) -> int:
            return len(encode(render_chatml(chat), add_special_tokens=False))

        return await count_chat_tokens(request, length, self.max_context_tokens)

    async def embed(self, request: engine_pb2.EmbedRequest) -> engine_pb2.EmbedResponse:
        out = engine_pb2.EmbedResponse()
        for text in request.texts:
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            raw = [b - 127.5 for b in digest[:EMBEDDING_DIM]]
            norm = math.sqrt(sum(v * v for v in raw)) or 1.0
            out.embeddings.add(values=[v / norm for v in raw])
        return out

    async def model_info(self) -> engine_pb2.GetModelInfoResponse:
        return engine_pb2.GetModelInfoResponse(
            model=self._script.model,
            max_context_tokens=self.max_context_tokens,
            backend=engine_pb2.BACKEND_SCRIPTED,
            tokenizer=engine_pb2.TokenizerInfo(
                vocab_size=VOCAB_SIZE,
                bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
                has_chat_template=True,
            ),
            tool_call_parser="hermes",
            engine_version="scripted",
        )

    async def load(self) -> engine_pb2.GetLoadResponse:
        return engine_pb2.GetLoadResponse(running_requests=self._running)

    async def close(self) -> None:
        return None
