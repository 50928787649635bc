"""Guardrail factories and named profiles.

A profile names, per stage, which guardrails run and with which options; a
conversation chooses a profile by name. Profiles are data (`GuardrailSpec`s
naming registered factories), so they can come from configuration; the
registry builds each profile's `GuardrailPipeline` once and caches it.

`default_registry` holds the built-in factories and the profiles "none",
"default" and "strict" (see docs/guardrails.md for what each does).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from turnlog import errors
from turnlog.domain.events import GuardrailStage
from turnlog.guardrails.contracts import (
    Guardrail,
    RequestIntercept,
    TextGuardrail,
    ToolCallGuardrail,
)
from turnlog.guardrails.execution import (
    ExecutionIntercept,
    ModelFallback,
    RetryBeforeFirstDelta,
    Sleep,
)
from turnlog.guardrails.limits import MaxLength
from turnlog.guardrails.normalize import NormalizeText
from turnlog.guardrails.pii import PiiRedactor
from turnlog.guardrails.pipeline import GuardrailPipeline
from turnlog.guardrails.response import ResponseMode
from turnlog.guardrails.terms import BlockedTerms
from turnlog.guardrails.tools import ToolAllowList, ToolArgumentsSchema

Options = Mapping[str, object]
GuardrailFactory = Callable[[Options], Guardrail]
"""Builds a guardrail from its options; raises InvalidArgumentError on bad options."""

_EMPTY: Options = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardrailSpec:
    """One guardrail in a profile: a registered factory and its options."""

    factory: str
    options: Options = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardrailProfile:
    """A named arrangement of guardrails, stage by stage, in running order.

    Attributes:
        name: What conversations choose it by.
        request_intercepts: Stage 1, `RequestIntercept`s.
        sanitize_request: Stage 2, `TextGuardrail`s on the user text.
        conditional_execution: Stage 3, `TextGuardrail`s that may block.
        execution_intercepts: Stage 4, `ExecutionIntercept`s, outermost first.
        sanitize_response: Stage 5, `TextGuardrail`s on the response text.
        tool_calls: Stage 5, `ToolCallGuardrail`s on generated tool calls.
        response_mode: STREAMING (retract on a block) or BUFFERED.
    """

    name: str
    request_intercepts: tuple[GuardrailSpec, ...] = ()
    sanitize_request: tuple[GuardrailSpec, ...] = ()
    conditional_execution: tuple[GuardrailSpec, ...] = ()
    execution_intercepts: tuple[GuardrailSpec, ...] = ()
    sanitize_response: tuple[GuardrailSpec, ...] = ()
    tool_calls: tuple[GuardrailSpec, ...] = ()
    response_mode: ResponseMode = ResponseMode.STREAMING


def _invalid(message: str, **metadata: str) -> errors.InvalidArgumentError:
    return errors.InvalidArgumentError(message, metadata=metadata)


class GuardrailRegistry:
    """Guardrail factories and profiles by name; builds and caches pipelines."""

    def __init__(self, *, default_profile: str = "default") -> None:
        """Start empty; `default_profile` is what the profile name "" means."""
        self.default_profile = default_profile
        self._factories: dict[str, GuardrailFactory] = {}
        self._profiles: dict[str, GuardrailProfile] = {}
        self._pipelines: dict[str, GuardrailPipeline] = {}
        self._lock = threading.Lock()

    def register_factory(
        self, name: str, factory: GuardrailFactory, *, replace: bool = False
    ) -> None:
        """Make `factory` available to profiles as `name`.

        Raises:
            ValueError: When `name` is taken and `replace` is false.
        """
        with self._lock:
            if name in self._factories and not replace:
                raise ValueError(f"guardrail factory {name!r} is registered already")
            self._factories[name] = factory
            self._pipelines.clear()

    def register_profile(self, profile: GuardrailProfile, *, replace: bool = False) -> None:
        """Add (or with `replace`, redefine) a profile; it is built on first use.

        Raises:
            ValueError: When the name is taken and `replace` is false.
        """
        with self._lock:
            if profile.name in self._profiles and not replace:
                raise ValueError(f"guardrail profile {profile.name!r} is registered already")
            self._profiles[profile.name] = profile
            self._pipelines.pop(profile.name, None)

    @property
    def profile_names(self) -> tuple[str, ...]:
        """The registered profile names, sorted."""
        return tuple(sorted(self._profiles))

    def profile(self, name: str) -> GuardrailProfile:
        """Return profile `name` ("" means the default profile).

        Raises:
            turnlog.errors.InvalidArgumentError: When no such profile exists.
        """
        resolved = name or self.default_profile
        profile = self._profiles.get(resolved)
        if profile is None:
            raise _invalid(
                f"unknown guardrail profile {resolved!r}; known: {', '.join(self.profile_names)}",
                guardrailProfile=resolved,
            )
        return profile

    def pipeline(self, name: str) -> GuardrailPipeline:
        """Return the (cached) pipeline of profile `name` ("" means the default).

        Raises:
            turnlog.errors.InvalidArgumentError: When no such profile exists,
                or it names an unknown factory, bad options, or a guardrail
                of the wrong kind for its stage.
        """
        profile = self.profile(name)
        with self._lock:
            cached = self._pipelines.get(profile.name)
        if cached is not None:
            return cached
        built = self._build(profile)
        with self._lock:
            return self._pipelines.setdefault(profile.name, built)

    def create(self, spec: GuardrailSpec) -> Guardrail:
        """Build one guardrail from its spec.

        Raises:
            turnlog.errors.InvalidArgumentError: Unknown factory or bad options.
        """
        factory = self._factories.get(spec.factory)
        if factory is None:
            raise _invalid(f"unknown guardrail {spec.factory!r}", guardrail=spec.factory)
        return factory(spec.options)

    def _build(self, profile: GuardrailProfile) -> GuardrailPipeline:
        # `kind` is a runtime-checkable Protocol, which `type[...]` cannot name.
        def build(specs: Iterable[GuardrailSpec], kind: Any, stage: str) -> list[Any]:
            built: list[Any] = []
            for spec in specs:
                guardrail = self.create(spec)
                if not isinstance(guardrail, kind):
                    raise _invalid(
                        f"guardrail {spec.factory!r} cannot run in stage {stage} "
                        f"of profile {profile.name!r}",
                        guardrail=spec.factory,
                        guardrailProfile=profile.name,
                    )
                built.append(guardrail)
            return built

        return GuardrailPipeline(
            profile=profile.name,
            request_intercepts=build(
                profile.request_intercepts, RequestIntercept, GuardrailStage.REQUEST_INTERCEPT
            ),
            sanitize_request=build(
                profile.sanitize_request, TextGuardrail, GuardrailStage.SANITIZE_REQUEST
            ),
            conditional_execution=build(
                profile.conditional_execution, TextGuardrail, GuardrailStage.CONDITIONAL_EXECUTION
            ),
            execution_intercepts=build(
                profile.execution_intercepts,
                ExecutionIntercept,
                GuardrailStage.EXECUTION_INTERCEPT,
            ),
            sanitize_response=build(
                profile.sanitize_response, TextGuardrail, GuardrailStage.SANITIZE_RESPONSE
            ),
            tool_calls=build(profile.tool_calls, ToolCallGuardrail, "tool_calls"),
            response_mode=profile.response_mode,
        )


# --- options ----------------------------------------------------------------


def _strings(options: Options, key: str, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _invalid(f"guardrail option {key!r} must be a list of strings", option=key)
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise _invalid(f"guardrail option {key!r} must be a list of strings", option=key)
    return tuple(str(item) for item in items)


def _int(options: Options, key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(f"guardrail option {key!r} must be a non-negative integer", option=key)
    return value


def _floats(options: Options, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    value = options.get(key, default)
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _invalid(f"guardrail option {key!r} must be a list of numbers", option=key)
    items = tuple(value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in items):
        raise _invalid(f"guardrail option {key!r} must be a list of numbers", option=key)
    return tuple(float(v) for v in items)


def _str(options: Options, key: str) -> str:
    value = options.get(key)
    if not isinstance(value, str) or not value:
        raise _invalid(f"guardrail option {key!r} must be a non-empty string", option=key)
    return value


def _no_unknown(options: Options, known: Iterable[str], factory: str) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise _invalid(
            f"guardrail {factory!r} has no option(s) {', '.join(map(repr, unknown))}",
            guardrail=factory,
        )


# --- built-ins --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BuiltinSettings:
    """Service-level settings of the built-in profiles.

    Attributes:
        blocked_terms: Terms blocked in requests and responses ("default", "strict").
        max_input_chars: Maximum user text length in "default".
        strict_max_input_chars: Maximum user text length in "strict".
        allowed_tools: Tool names allowed in "strict" (None: every offered tool).
        fallback_model: A model to fall back to ("" for none).
        retry_attempts: Attempts in all for the retry intercept.
        retry_backoff_s: Backoff before each retry.
        sleep: What the retry intercept awaits to back off.
    """

    blocked_terms: tuple[str, ...] = ()
    max_input_chars: int = 32_000
    strict_max_input_chars: int = 8_000
    allowed_tools: tuple[str, ...] | None = None
    fallback_model: str = ""
    retry_attempts: int = 3
    retry_backoff_s: tuple[float, ...] = (0.05, 0.2)
    sleep: Sleep = asyncio.sleep


def _register_builtin_factories(registry: GuardrailRegistry, settings: BuiltinSettings) -> None:
    def normalize_text(options: Options) -> Guardrail:
        _no_unknown(options, (), "normalize_text")
        return NormalizeText()

    def pii_redaction(options: Options) -> Guardrail:
        _no_unknown(options, (), "pii_redaction")
        return PiiRedactor()

    def blocked_terms(options: Options) -> Guardrail:
        _no_unknown(options, ("terms",), "blocked_terms")
        return BlockedTerms(_strings(options, "terms", settings.blocked_terms) or ())

    def max_input_length(options: Options) -> Guardrail:
        _no_unknown(options, ("max_chars",), "max_input_length")
        return MaxLength(_int(options, "max_chars", settings.max_input_chars))

    def max_output_length(options: Options) -> Guardrail:
        _no_unknown(options, ("max_chars",), "max_output_length")
        return MaxLength(_int(options, "max_chars", 100_000), name="max_output_length")

    def tool_allow_list(options: Options) -> Guardrail:
        _no_unknown(options, ("allowed",), "tool_allow_list")
        return ToolAllowList.of(_strings(options, "allowed", settings.allowed_tools))

    def tool_arguments_schema(options: Options) -> Guardrail:
        _no_unknown(options, (), "tool_arguments_schema")
        return ToolArgumentsSchema()

    def retry(options: Options) -> Guardrail:
        _no_unknown(options, ("max_attempts", "backoff_s"), "retry_before_first_delta")
        attempts = _int(options, "max_attempts", settings.retry_attempts)
        if attempts < 1:
            raise _invalid(
                "guardrail option 'max_attempts' must be at least 1", option="max_attempts"
            )
        return RetryBeforeFirstDelta(
            max_attempts=attempts,
            backoff_s=_floats(options, "backoff_s", settings.retry_backoff_s),
            sleep=settings.sleep,
        )

    def fallback(options: Options) -> Guardrail:
        _no_unknown(options, ("fallback_model",), "model_fallback")
        return ModelFallback(_str(options, "fallback_model"))

    for name, factory in (
        ("normalize_text", normalize_text),
        ("pii_redaction", pii_redaction),
        ("blocked_terms", blocked_terms),
        ("max_input_length", max_input_length),
        ("max_output_length", max_output_length),
        ("tool_allow_list", tool_allow_list),
        ("tool_arguments_schema", tool_arguments_schema),
        ("retry_before_first_delta", retry),
        ("model_fallback", fallback),
    ):
        registry.register_factory(name, factory)


def _builtin_profiles(settings: BuiltinSettings) -> tuple[GuardrailProfile, ...]:
    execution: tuple[GuardrailSpec, ...] = (GuardrailSpec(factory="retry_before_first_delta"),)
    if settings.fallback_model:
        # Outermost: retry the first model, then fall back (and retry that).
        execution = (
            GuardrailSpec(
                factory="model_fallback", options={"fallback_model": settings.fallback_model}
            ),
            *execution,
        )
    common = {
        "request_intercepts": (GuardrailSpec(factory="normalize_text"),),
        "sanitize_request": (GuardrailSpec(factory="pii_redaction"),),
        "execution_intercepts": execution,
        "sanitize_response": (
            GuardrailSpec(factory="pii_redaction"),
            GuardrailSpec(factory="blocked_terms"),
        ),
    }
    return (
        GuardrailProfile(name="none"),
        GuardrailProfile(
            name="default",
            request_intercepts=common["request_intercepts"],
            sanitize_request=common["sanitize_request"],
            conditional_execution=(
                GuardrailSpec(factory="blocked_terms"),
                GuardrailSpec(factory="max_input_length"),
            ),
            execution_intercepts=common["execution_intercepts"],
            sanitize_response=common["sanitize_response"],
            tool_calls=(
                GuardrailSpec(factory="tool_allow_list", options={"allowed": None}),
                GuardrailSpec(factory="tool_arguments_schema"),
            ),
            response_mode=ResponseMode.STREAMING,
        ),
        GuardrailProfile(
            name="strict",
            request_intercepts=common["request_intercepts"],
            sanitize_request=common["sanitize_request"],
            conditional_execution=(
                GuardrailSpec(factory="blocked_terms"),
                GuardrailSpec(
                    factory="max_input_length",
                    options={"max_chars": settings.strict_max_input_chars},
                ),
            ),
            execution_intercepts=common["execution_intercepts"],
            sanitize_response=common["sanitize_response"],
            tool_calls=(
                GuardrailSpec(factory="tool_allow_list"),
                GuardrailSpec(factory="tool_arguments_schema"),
            ),
            response_mode=ResponseMode.BUFFERED,
        ),
    )


def default_registry(settings: BuiltinSettings | None = None) -> GuardrailRegistry:
    """Return a new registry with the built-in factories and profiles.

    Factories: normalize_text, pii_redaction, blocked_terms, max_input_length,
    max_output_length, tool_allow_list, tool_arguments_schema,
    retry_before_first_delta, model_fallback. Profiles: "none", "default"
    (the default), "strict". Add or replace profiles with `register_profile`.
    """
    settings = settings or BuiltinSettings()
    registry = GuardrailRegistry(default_profile="default")
    _register_builtin_factories(registry, settings)
    for profile in _builtin_profiles(settings):
        registry.register_profile(profile)
    return registry
