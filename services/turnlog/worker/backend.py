"""The port every engine backend implements, and the checks they share.

A backend speaks the engine protocol's messages (`turnlog.engine.v1`): the
proto is the narrow waist, so the gRPC servicer stays a thin adapter and the
vLLM and scripted backends are interchangeable behind it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from turnlog import errors
from turnlog.engine.v1 import engine_pb2

GenerationEvent = engine_pb2.GenerationDelta | engine_pb2.GenerationDone


@dataclass(slots=True, kw_only=True)
class RequestProgress:
    """What a backend has learned about a request so far.

    The servicer reads it to report usage and timings when the request ends
    early (cancelled or failed) and the backend could not say so itself.
    """

    arrival: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None


class EngineBackend(Protocol):
    """An engine that serves the EngineService contract.

    `generate` yields zero or more `GenerationDelta`s and then exactly one
    `GenerationDone`, all with the request's id. It raises a
    `turnlog.errors.TurnlogError` for per-request failures (bad input,
    engine trouble); anything else is reported to clients as an internal
    error without its message. When the consuming task is cancelled, the
    request is aborted in the engine before `CancelledError` propagates.
    The backend must tolerate the same request id on different streams: the
    servicer passes `engine_request_id`, unique per worker, for the engine.
    """

    @property
    def max_context_tokens(self) -> int:
        """Prompt plus output tokens the model can hold."""
        ...

    def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        engine_request_id: str,
        progress: RequestProgress,
    ) -> AsyncIterator[GenerationEvent]:
        """Run one request (see the class docstring for the contract)."""
        ...

    async def tokenize(self, request: engine_pb2.TokenizeRequest) -> engine_pb2.TokenizeResponse:
        """Token ids of a text."""
        ...

    async def detokenize(
        self, request: engine_pb2.DetokenizeRequest
    ) -> engine_pb2.DetokenizeResponse:
        """Text of token ids."""
        ...

    async def render_chat(
        self, request: engine_pb2.RenderChatRequest
    ) -> engine_pb2.RenderChatResponse:
        """A chat rendered through the model's chat template."""
        ...

    async def count_chat_tokens(
        self, request: engine_pb2.CountChatTokensRequest
    ) -> engine_pb2.CountChatTokensResponse:
        """Token counts of a chat's head and of each message (`count_chat_tokens`)."""
        ...

    async def embed(self, request: engine_pb2.EmbedRequest) -> engine_pb2.EmbedResponse:
        """Embeddings, or `UnsupportedByModelError`."""
        ...

    async def model_info(self) -> engine_pb2.GetModelInfoResponse:
        """Facts about the model."""
        ...

    async def load(self) -> engine_pb2.GetLoadResponse:
        """Current load (the servicer sets `draining`)."""
        ...

    async def close(self) -> None:
        """Release the engine. Called once, after every request ended."""
        ...


def validate_start(start: engine_pb2.StartGeneration) -> None:
    """Checks every backend applies before a request reaches its engine.

    Raises:
        InvalidArgumentError: no request id, no prompt or an empty one, or a
            malformed structured-output constraint.
    """
    if not start.request_id:
        raise errors.InvalidArgumentError("request_id is required")
    kind = start.WhichOneof("prompt")
    if kind is None:
        raise errors.InvalidArgumentError("a prompt is required", metadata={"field": "prompt"})
    if (
        (kind == "prompt_token_ids" and not start.prompt_token_ids.ids)
        or (kind == "prompt_text" and not start.prompt_text)
        or (kind == "chat" and not start.chat.messages)
    ):
        raise errors.InvalidArgumentError("the prompt is empty", metadata={"field": kind})
    if kind == "chat":
        for message in start.chat.messages:
            if message.role == engine_pb2.CHAT_ROLE_UNSPECIFIED:
                raise errors.InvalidArgumentError(
                    "every chat message needs a role", metadata={"field": "chat.messages.role"}
                )
        for tool in start.chat.tools:
            parse_json_schema(tool.parameters_json_schema, "chat.tools.parameters_json_schema")
    constraint = start.sampling.structured_output.WhichOneof("constraint")
    if constraint == "json_schema":
        parse_json_schema(
            start.sampling.structured_output.json_schema, "sampling.structured_output.json_schema"
        )
    elif constraint == "choice" and not start.sampling.structured_output.choice.choices:
        raise errors.InvalidArgumentError(
            "choice needs at least one option",
            metadata={"field": "sampling.structured_output.choice"},
        )
    sampling = start.sampling
    if sampling.HasField("temperature") and sampling.temperature < 0:
        raise errors.InvalidArgumentError(
            "temperature must be >= 0", metadata={"field": "sampling.temperature"}
        )
    if sampling.HasField("max_tokens") and sampling.max_tokens == 0:
        raise errors.InvalidArgumentError(
            "max_tokens must be >= 1", metadata={"field": "sampling.max_tokens"}
        )


def parse_json_schema(text: str, field_name: str) -> dict[str, object]:
    """Parse a JSON Schema given as text; empty text means `{}`.

    Raises:
        InvalidArgumentError: not JSON, or not a JSON object.
    """
    if not text:
        return {}
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise errors.InvalidArgumentError(
            f"{field_name} is not valid JSON", metadata={"field": field_name}
        ) from e
    if not isinstance(schema, dict):
        raise errors.InvalidArgumentError(
            f"{field_name} must be a JSON object", metadata={"field": field_name}
        )
    return schema


def output_budget(start: engine_pb2.StartGeneration, prompt_tokens: int, max_context: int) -> int:
    """The max_tokens to run with: the requested one, or what the context leaves.

    Raises:
        ContextLengthExceededError: prompt plus max_tokens exceed the context.
    """
    left = max_context - prompt_tokens
    if start.sampling.HasField("max_tokens"):
        wanted = start.sampling.max_tokens
        if wanted > left:
            raise errors.ContextLengthExceededError(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({wanted}) exceed "
                f"the context length ({max_context})",
                metadata={
                    "promptTokens": str(prompt_tokens),
                    "maxTokens": str(wanted),
                    "maxContextTokens": str(max_context),
                },
            )
        return wanted
    if left < 1:
        raise errors.ContextLengthExceededError(
            f"the prompt ({prompt_tokens} tokens) fills the context length ({max_context})",
            metadata={"promptTokens": str(prompt_tokens), "maxContextTokens": str(max_context)},
        )
    return left


#: The most messages one CountChatTokens request may count.
MAX_COUNTED_MESSAGES = 1000

_PROBE = engine_pb2.ChatMessage(role=engine_pb2.CHAT_ROLE_USER, content="x")


async def count_chat_tokens(
    request: engine_pb2.CountChatTokensRequest,
    rendered_length: Callable[[engine_pb2.ChatPrompt], Awaitable[int]],
    max_context: int,
) -> engine_pb2.CountChatTokensResponse:
    """Counts of a chat's parts through the template, by differences of whole renders.

    `rendered_length(chat)` is the token count of the chat as Generate would
    render it. A message counts as what it adds after the head (so a template
    that renders each message on its own makes the counts add up exactly);
    the generation prompt is what opening the assistant turn adds after a
    probe message. An empty head renders to nothing.

    Raises:
        InvalidArgumentError: a head that is not at most one system message,
            a system message among the counted ones, or too many messages.
    """
    head = request.head
    if len(head.messages) > 1 or any(m.role != engine_pb2.CHAT_ROLE_SYSTEM for m in head.messages):
        raise errors.InvalidArgumentError(
            "the head is at most one system message", metadata={"field": "head.messages"}
        )
    if len(request.messages) > MAX_COUNTED_MESSAGES:
        raise errors.InvalidArgumentError(
            f"at most {MAX_COUNTED_MESSAGES} messages per request",
            metadata={"field": "messages"},
        )
    if any(m.role == engine_pb2.CHAT_ROLE_SYSTEM for m in request.messages):
        raise errors.InvalidArgumentError(
            "a system message belongs in the head", metadata={"field": "messages"}
        )
    validate_start(
        engine_pb2.StartGeneration(
            request_id="count",
            chat=engine_pb2.ChatPrompt(
                messages=[*head.messages, *request.messages], tools=head.tools
            ),
        )
    )

    def chat(messages: Sequence[engine_pb2.ChatMessage], opened: bool) -> engine_pb2.ChatPrompt:
        return engine_pb2.ChatPrompt(
            messages=[*head.messages, *messages], tools=head.tools, add_generation_prompt=opened
        )

    base = await rendered_length(chat((), False)) if head.messages or head.tools else 0
    probe = await rendered_length(chat((_PROBE,), False))
    opened = await rendered_length(chat((_PROBE,), True))
    counts = [await rendered_length(chat((m,), False)) - base for m in request.messages]
    return engine_pb2.CountChatTokensResponse(
        head_tokens=base + opened - probe,
        message_tokens=counts,
        max_context_tokens=max_context,
    )


def chat_to_openai(
    chat: engine_pb2.ChatPrompt,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Messages and tools of a ChatPrompt in the OpenAI chat format chat templates expect."""
    roles = {
        engine_pb2.CHAT_ROLE_SYSTEM: "system",
        engine_pb2.CHAT_ROLE_USER: "user",
        engine_pb2.CHAT_ROLE_ASSISTANT: "assistant",
        engine_pb2.CHAT_ROLE_TOOL: "tool",
    }
    messages: list[dict[str, object]] = []
    for m in chat.messages:
        message: dict[str, object] = {"role": roles[m.role], "content": m.content}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments_json or "{}"},
                }
                for c in m.tool_calls
            ]
        messages.append(message)
    tools: list[dict[str, object]] = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": parse_json_schema(
                    t.parameters_json_schema, "chat.tools.parameters_json_schema"
                )
                or {"type": "object", "properties": {}},
            },
        }
        for t in chat.tools
    ]
    return messages, tools


def add_generation_prompt(chat: engine_pb2.ChatPrompt) -> bool:
    """Whether to open an assistant turn (default true, false when continuing)."""
    if chat.continue_final_message:
        return False
    return chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
