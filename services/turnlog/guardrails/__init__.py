"""The guardrail pipeline: request, execution and response guardrails by profile.

Pure application code (no gRPC, no database, no clock): the turn orchestration
calls it and records each `GuardrailDecision` as a `GuardrailDecided` event.
See docs/guardrails.md for the stages, the built-ins, the profiles and what a
streaming client sees when a response is blocked.
"""

from turnlog.guardrails.contracts import (
    Guardrail,
    InterceptResult,
    RequestIntercept,
    RequestSubject,
    ResponseContext,
    ScanStep,
    StreamingTextGuardrail,
    TextCheck,
    TextGuardrail,
    TextScanner,
    ToolCallCheck,
    ToolCallGuardrail,
    ToolCallSubject,
)
from turnlog.guardrails.execution import (
    ExecutionEvent,
    ExecutionIntercept,
    GenerationCall,
    GenerationFinished,
    GenerationRequest,
    ModelFallback,
    RetryBeforeFirstDelta,
    TextDelta,
)
from turnlog.guardrails.limits import MaxLength
from turnlog.guardrails.normalize import NormalizeText
from turnlog.guardrails.pii import PiiRedactor
from turnlog.guardrails.pipeline import (
    GuardrailPipeline,
    RequestOutcome,
    ResponseSubject,
)
from turnlog.guardrails.records import (
    Block,
    GuardrailDecision,
    decisions_to_events,
    text_digest,
    tool_call_text,
)
from turnlog.guardrails.registry import (
    BuiltinSettings,
    GuardrailFactory,
    GuardrailProfile,
    GuardrailRegistry,
    GuardrailSpec,
    default_registry,
)
from turnlog.guardrails.response import (
    EmitText,
    ResponseMode,
    ResponseOutcome,
    ResponseStreamFilter,
    RetractText,
    StopResponse,
    StreamAction,
    ToolCallOutcome,
)
from turnlog.guardrails.sanitize import (
    FieldKind,
    FieldRefusedError,
    RequestField,
    TextOutcome,
    ToolCallSanitizer,
    check_json_or_text,
    conversation_fields,
    sampling_fields,
)
from turnlog.guardrails.terms import BlockedTerms
from turnlog.guardrails.tools import ToolAllowList, ToolArgumentsSchema

__all__ = [
    "Block",
    "BlockedTerms",
    "BuiltinSettings",
    "EmitText",
    "ExecutionEvent",
    "ExecutionIntercept",
    "FieldKind",
    "FieldRefusedError",
    "GenerationCall",
    "GenerationFinished",
    "GenerationRequest",
    "Guardrail",
    "GuardrailDecision",
    "GuardrailFactory",
    "GuardrailPipeline",
    "GuardrailProfile",
    "GuardrailRegistry",
    "GuardrailSpec",
    "InterceptResult",
    "MaxLength",
    "ModelFallback",
    "NormalizeText",
    "PiiRedactor",
    "RequestField",
    "RequestIntercept",
    "RequestOutcome",
    "RequestSubject",
    "ResponseContext",
    "ResponseMode",
    "ResponseOutcome",
    "ResponseStreamFilter",
    "ResponseSubject",
    "RetractText",
    "RetryBeforeFirstDelta",
    "ScanStep",
    "StopResponse",
    "StreamAction",
    "StreamingTextGuardrail",
    "TextCheck",
    "TextDelta",
    "TextGuardrail",
    "TextOutcome",
    "TextScanner",
    "ToolAllowList",
    "ToolArgumentsSchema",
    "ToolCallCheck",
    "ToolCallGuardrail",
    "ToolCallOutcome",
    "ToolCallSanitizer",
    "ToolCallSubject",
    "check_json_or_text",
    "conversation_fields",
    "decisions_to_events",
    "default_registry",
    "sampling_fields",
    "text_digest",
    "tool_call_text",
]
