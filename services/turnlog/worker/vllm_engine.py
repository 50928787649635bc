"""The vLLM backend: `AsyncLLM` streaming deltas behind the `EngineBackend` port.

Prompts go through the engine's own renderer (chat template included), so
what `RenderChat` returns is what `Generate` runs. Structured output maps to
`StructuredOutputsParams`; tool calls are parsed from the finished text with
vLLM's tool parsers. Cancelling the task that consumes `generate` aborts the
request inside vLLM (AsyncLLM does this on `CancelledError`).

vLLM starts its engine core in a child process with `spawn`: any program that
builds a `VllmEngine` needs an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
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

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VllmOptions:
    """Engine options exposed by `turnlog worker`.

    Attributes:
        model: model folder or name.
        dtype: weights/activations dtype ("auto", "bfloat16", "float16", "float32").
        max_model_len: context length; None takes the model's.
        kv_cache_bytes: KV cache size; None lets vLLM size it.
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes.
        block_size: KV block size in tokens; None takes the platform default.
        tensor_parallel_size: GPUs per model replica.
        tool_call_parser: a vLLM tool parser name (e.g. "hermes"), or None.
        seed: engine seed (per-request seeds still apply).
        enforce_eager: skip graph capture/compilation (faster start, CPU tests).
        stream_interval: deliver a request's tokens every N tokens (the first
            at once, the last with the end): vLLM's `stream_interval`. Fewer,
            larger deltas cost every hop (engine front end, worker stream,
            service, client) less host CPU per token.
        scheduler_stats: collect vLLM's per-step statistics, so that
            `GetLoad` splits running from waiting requests and reports KV
            cache usage. They cost the front end CPU on every engine step
            (about a tenth of its busy time here); without them `GetLoad`
            counts every unfinished request as running (the sum, which the
            service balances on, is exact either way).
    """

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_bytes: int | None = None
    enable_prefix_caching: bool = True
    block_size: int | None = None
    tensor_parallel_size: int = 1
    tool_call_parser: str | None = None
    seed: int = 0
    enforce_eager: bool = False
    stream_interval: int = 1
    scheduler_stats: bool = False


class _LoadRecorder:
    """Keeps the latest scheduler stats vLLM reports (a vLLM StatLoggerBase)."""

    latest: Any = None

    def __init__(self, sink: _LoadSink) -> None:
        self._sink = sink

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._sink.latest = scheduler_stats

    def log_engine_initialized(self) -> None:
        return None

    def log(self) -> None:
        return None

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        return None


@dataclasses.dataclass(slots=True)
class _LoadSink:
    latest: Any = None


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return d


class VllmEngine:
    """The vLLM backend (implements `EngineBackend`). Build it with `start`."""

    def __init__(self, engine: Any, options: VllmOptions, load: _LoadSink) -> None:
        self._engine = engine
        self._options = options
        self._load = load
        self._tokenizer = engine.get_tokenizer()
        self._renderer = engine.renderer
        self._max_len = int(engine.model_config.max_model_len)
        self._vocab_size = len(self._tokenizer)
        self._tool_parser_cls: Any = None
        if options.tool_call_parser:
            from vllm.tool_parsers import ToolParserManager

            self._tool_parser_cls = ToolParserManager.get_tool_parser(options.tool_call_parser)

    @classmethod
    async def start(cls, options: VllmOptions) -> VllmEngine:
        """Load the model and start the engine (blocks for the load time)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = _LoadSink()

        class Recorder(_LoadRecorder, StatLoggerBase):  # type: ignore[misc]  # vLLM is untyped here
            pass

        kwargs: dict[str, Any] = {
            "model": options.model,
            "dtype": options.dtype,
            "enable_prefix_caching": options.enable_prefix_caching,
            "tensor_parallel_size": options.tensor_parallel_size,
            "seed": options.seed,
            "enforce_eager": options.enforce_eager,
            "disable_log_stats": True,
            "stream_interval": options.stream_interval,
        }
        if options.max_model_len is not None:
            kwargs["max_model_len"] = options.max_model_len
        if options.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = options.kv_cache_bytes
        if options.block_size is not None:
            kwargs["block_size"] = options.block_size
        engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**kwargs),
            stat_loggers=[lambda config, index: Recorder(sink)]
            if options.scheduler_stats
            else None,
        )
        backend = cls(engine, options, sink)
        await backend._warm_up()
        # As vLLM's own server does once it is up: read VLLM_* settings once,
        # not from the environment on every access (the front end reads
        # some on every step).
        import vllm.envs

        vllm.envs.enable_envs_cache()
        return backend

    async def _warm_up(self) -> None:
        """Run one short request so the first client request does not pay for lazy setup."""
        start = engine_pb2.StartGeneration(
            request_id="warm-up",
            prompt_text="Warm-up request: the quick brown fox jumps over the lazy dog.",
            sampling=engine_pb2.SamplingParams(max_tokens=2, ignore_eos=True),
        )
        async for _ in self.generate(
            start, engine_request_id="turnlog-warm-up", progress=RequestProgress()
        ):
            pass

    @property
    def max_context_tokens(self) -> int:
        return self._max_len

    # -- prompts -----------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int], field: str) -> None:
        if any(i >= self._vocab_size for i in ids):
            raise errors.InvalidArgumentError(
                f"token ids must be below the vocabulary size {self._vocab_size}",
                metadata={"field": field},
            )

    async def _render_chat(self, chat: engine_pb2.ChatPrompt) -> dict[str, Any]:
        from vllm.renderers import ChatParams

        messages, tools = chat_to_openai(chat)
        params = ChatParams(
            chat_template_kwargs={
                "add_generation_prompt": add_generation_prompt(chat),
                "continue_final_message": chat.continue_final_message,
                "tools": tools or None,
            }
        )
        tok_params = dataclasses.replace(
            self._renderer.default_chat_tok_params, max_total_tokens=None
        )
        try:
            _, inputs = await self._renderer.render_chat_async([messages], params, tok_params)
        except Exception as e:
            log.info("chat rendering failed", exc_info=True)
            raise errors.InvalidArgumentError(
                "the chat template could not render these messages", metadata={"field": "chat"}
            ) from e
        result: dict[str, Any] = inputs[0]
        return result

    async def _render(self, start: engine_pb2.StartGeneration) -> dict[str, Any]:
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        kind = start.WhichOneof("prompt")
        if kind == "chat":
            return await self._render_chat(start.chat)
        if kind == "prompt_token_ids":
            ids = list(start.prompt_token_ids.ids)
            self._check_ids(ids, "prompt_token_ids")
            prompt: object = {"prompt_token_ids": ids}
        else:
            prompt = start.prompt_text
        tok_params = dataclasses.replace(
            self._renderer.default_cmpl_tok_params, max_total_tokens=None
        )
        (engine_input,) = await self._renderer.render_cmpl_async(
            [parse_model_prompt(self._engine.model_config, prompt)], tok_params
        )
        result: dict[str, Any] = engine_input
        return result

    def _sampling_params(self, start: engine_pb2.StartGeneration, max_tokens: int) -> Any:
        from vllm.sampling_params import (
            RequestOutputKind,
            SamplingParams,
            StructuredOutputsParams,
        )

        s = start.sampling
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "output_kind": RequestOutputKind.DELTA,
            "ignore_eos": s.ignore_eos,
            "skip_special_tokens": (
                start.skip_special_tokens if start.HasField("skip_special_tokens") else True
            ),
        }
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "min_tokens",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "logprobs",
        ):
            if s.HasField(name):
                kwargs[name] = getattr(s, name)
        if s.stop:
            kwargs["stop"] = list(s.stop)
        if s.stop_token_ids:
            self._check_ids(s.stop_token_ids, "sampling.stop_token_ids")
            kwargs["stop_token_ids"] = list(s.stop_token_ids)
        so = s.structured_output
        constraint = so.WhichOneof("constraint")
        if constraint == "json_schema":
            kwargs["structured_outputs"] = StructuredOutputsParams(json=so.json_schema)
        elif constraint == "regex":
            kwargs["structured_outputs"] = StructuredOutputsParams(regex=so.regex)
        elif constraint == "choice":
            kwargs["structured_outputs"] = StructuredOutputsParams(choice=list(so.choice.choices))
        elif constraint == "grammar":
            kwargs["structured_outputs"] = StructuredOutputsParams(grammar=so.grammar)
        try:
            return SamplingParams(**kwargs)
        except Exception as e:
            log.info("sampling parameters rejected", exc_info=True)
            raise errors.InvalidArgumentError(
                "the engine rejected the sampling parameters", metadata={"field": "sampling"}
            ) from e

    # -- generation --------------------------------------------------------------

    async def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        engine_request_id: str,
        progress: RequestProgress,
    ) -> AsyncIterator[GenerationEvent]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        validate_start(start)
        engine_input = await self._render(start)
        prompt_tokens = len(engine_input["prompt_token_ids"])
        progress.prompt_tokens = prompt_tokens
        max_tokens = output_budget(start, prompt_tokens, self._max_len)
        params = self._sampling_params(start, max_tokens)
        rid = start.request_id
        want_logprobs = start.sampling.HasField("logprobs")
        collect_text = self._tool_parser_cls is not None
        text_parts: list[str] = []
        completion_tokens = 0
        try:
            async for out in self._engine.generate(engine_input, params, engine_request_id):
                if out.num_cached_tokens:
                    progress.cached_prompt_tokens = out.num_cached_tokens
                c = out.outputs[0]
                if c.token_ids:
                    if progress.first_token is None:
                        progress.first_token = time.monotonic()
                    completion_tokens += len(c.token_ids)
                    progress.completion_tokens = completion_tokens
                    delta = engine_pb2.GenerationDelta(
                        request_id=rid, token_ids=c.token_ids, text=c.text
                    )
                    if want_logprobs and c.logprobs:
                        delta.logprobs.extend(self._logprobs(c.token_ids, c.logprobs))
                    if collect_text:
                        text_parts.append(c.text)
                    yield delta
                if out.finished:
                    yield self._done(
                        rid,
                        c,
                        prompt_tokens,
                        completion_tokens,
                        progress,
                        "".join(text_parts),
                        start,
                    )
                    return
        except (EngineDeadError, RuntimeError) as e:
            if isinstance(e, EngineDeadError) or self._engine.errored:
                raise errors.EngineUnavailableError("the engine stopped") from e
            raise
        except (VLLMValidationError, ValueError) as e:
            log.info("request %s rejected by the engine", rid, exc_info=True)
            raise errors.InvalidArgumentError("the engine rejected the request") from e
        raise errors.EngineInternalError("the engine ended the request without a result")

    @staticmethod
    def _logprobs(
        token_ids: Sequence[int], entries: Sequence[Any]
    ) -> list[engine_pb2.TokenLogprobs]:
        out: list[engine_pb2.TokenLogprobs] = []
        for token, entry in zip(token_ids, entries, strict=False):
            sampled = entry.get(token)
            item = engine_pb2.TokenLogprobs(
                token_id=token, logprob=sampled.logprob if sampled is not None else 0.0
            )
            for tid, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0):
                item.top.add(token_id=tid, logprob=lp.logprob, token=lp.decoded_token or "")
            out.append(item)
        return out

    def _done(
        self,
        rid: str,
        c: Any,
        prompt_tokens: int,
        completion_tokens: int,
        progress: RequestProgress,
        text: str,
        start: engine_pb2.StartGeneration,
    ) -> engine_pb2.GenerationDone:
        reason = c.finish_reason
        if reason == "error":
            raise errors.EngineInternalError("the engine failed the request")
        done = engine_pb2.GenerationDone(
            request_id=rid,
            usage=engine_pb2.Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_prompt_tokens=progress.cached_prompt_tokens,
            ),
        )
        if reason == "length":
            done.finish_reason = engine_pb2.FINISH_REASON_LENGTH
        elif reason == "abort":
            done.finish_reason = engine_pb2.FINISH_REASON_CANCELLED
        elif isinstance(c.stop_reason, str):
            done.finish_reason = engine_pb2.FINISH_REASON_STOP_SEQUENCE
            done.matched_stop_string = c.stop_reason
        else:
            done.finish_reason = engine_pb2.FINISH_REASON_STOP
            if isinstance(c.stop_reason, int):
                done.matched_stop_token_id = c.stop_reason
            elif self._tokenizer.eos_token_id is not None:
                done.matched_stop_token_id = self._tokenizer.eos_token_id
        now = time.monotonic()
        done.timings.total.CopyFrom(_duration(now - progress.arrival))
        if progress.first_token is not None:
            done.timings.time_to_first_token.CopyFrom(
                _duration(progress.first_token - progress.arrival)
            )
        if self._tool_parser_cls is not None and text:
            self._parse_tool_calls(done, text, start)
        return done

    def _parse_tool_calls(
        self, done: engine_pb2.GenerationDone, text: str, start: engine_pb2.StartGeneration
    ) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        messages: list[dict[str, object]] = [{"role": "user", "content": ""}]
        tools: list[dict[str, object]] = []
        if start.WhichOneof("prompt") == "chat":
            messages, tools = chat_to_openai(start.chat)
        try:
            request = ChatCompletionRequest.model_validate(
                {"messages": messages, "model": "", "tools": tools or None}
            )
            parser = self._tool_parser_cls(self._tokenizer, request.tools)
            info = parser.extract_tool_calls(text, request)
        except Exception:
            log.warning("tool-call parsing failed for %s", done.request_id, exc_info=True)
            return
        if info.tools_called:
            for call in info.tool_calls:
                done.tool_calls.add(
                    id=call.id or "",
                    name=call.function.name,
                    arguments_json=call.function.arguments or "{}",
                )
            done.content = info.content or ""

    # -- unary -------------------------------------------------------------------

    async def tokenize(self, request: engine_pb2.TokenizeRequest) -> engine_pb2.TokenizeResponse:
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = self._tokenizer.encode(request.text, add_special_tokens=add)
        return engine_pb2.TokenizeResponse(token_ids=ids)

    async def detokenize(
        self, request: engine_pb2.DetokenizeRequest
    ) -> engine_pb2.DetokenizeResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        self._check_ids(request.token_ids, "token_ids")
        text = self._tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
        return engine_pb2.DetokenizeResponse(text=text)

    async def render_chat(
        self, request: engine_pb2.RenderChatRequest
    ) -> engine_pb2.RenderChatResponse:
        validate_start(engine_pb2.StartGeneration(request_id="render", chat=request.chat))
        engine_input = await self._render_chat(request.chat)
        ids = list(engine_input["prompt_token_ids"])
        text = engine_input.get("prompt") or self._tokenizer.decode(ids, skip_special_tokens=False)
        return engine_pb2.RenderChatResponse(prompt_text=text, prompt_token_ids=ids)

    async def count_chat_tokens(
        self, request: engine_pb2.CountChatTokensRequest
    ) -> engine_pb2.CountChatTokensResponse:
        async def length(chat: engine_pb2.ChatPrompt) -> int:
            return len((await self._render_chat(chat))["prompt_token_ids"])

        return await count_chat_tokens(request, length, self._max_len)

    async def embed(self, request: engine_pb2.EmbedRequest) -> engine_pb2.EmbedResponse:
        raise errors.UnsupportedByModelError(
            "this worker serves a generative model; embeddings need a pooling model",
            metadata={"model": self._options.model},
        )

    async def model_info(self) -> engine_pb2.GetModelInfoResponse:
        import vllm

        tok = self._tokenizer
        info = engine_pb2.TokenizerInfo(
            vocab_size=self._vocab_size,
            has_chat_template=bool(getattr(tok, "chat_template", None)),
        )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tok, name, None)
            if value is not None:
                setattr(info, name, int(value))
        return engine_pb2.GetModelInfoResponse(
            model=self._options.model,
            max_context_tokens=self._max_len,
            backend=engine_pb2.BACKEND_VLLM,
            tokenizer=info,
            tool_call_parser=self._options.tool_call_parser or "",
            engine_version=str(vllm.__version__),
        )

    async def load(self) -> engine_pb2.GetLoadResponse:
        # The front end's count of unfinished requests is exact; the scheduler's
        # last report (which may lag a step) only splits it into running/waiting.
        unfinished = int(self._engine.get_num_unfinished_requests())
        stats = self._load.latest
        waiting = min(int(stats.num_waiting_reqs), unfinished) if stats is not None else 0
        usage = float(stats.kv_cache_usage) if stats is not None else 0.0
        return engine_pb2.GetLoadResponse(
            running_requests=unfinished - waiting,
            waiting_requests=waiting,
            kv_cache_usage=usage,
        )

    async def close(self) -> None:
        self._engine.shutdown()
