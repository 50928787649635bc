"""Tool-call guardrails: an allow-list and JSON-schema validation of arguments.

Both check tool calls the model generated, so they run in the
SANITIZE_RESPONSE stage, after the response text and before any tool is
executed: a blocked call is never run.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.protocols
import jsonschema.validators

from turnlog.domain.events import ToolCall, ToolDefinition
from turnlog.guardrails.contracts import ToolCallCheck


@dataclass(frozen=True, slots=True)
class ToolAllowList:
    """Allows a call only to a tool that was offered and, if set, is listed.

    Args:
        allowed: Tool names the profile allows; None allows every offered tool.
    """

    allowed: frozenset[str] | None = None
    name: str = "tool_allow_list"
    version: str = "1"

    @classmethod
    def of(cls, allowed: Iterable[str] | None) -> ToolAllowList:
        """Build from any iterable of names (None: every offered tool)."""
        return cls(None if allowed is None else frozenset(allowed))

    def check_call(self, call: ToolCall, tools: Mapping[str, ToolDefinition]) -> ToolCallCheck:
        """Block a call to a tool that was not offered or is not allowed."""
        if call.name not in tools:
            return ToolCallCheck(
                call=call,
                block_reason=f"tool call {call.call_id!r} names tool {call.name!r}, "
                "which was not offered",
            )
        if self.allowed is not None and call.name not in self.allowed:
            return ToolCallCheck(
                call=call,
                block_reason=f"tool {call.name!r} is not on the allow-list",
            )
        return ToolCallCheck(call=call, reason=f"tool {call.name!r} is allowed")


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> jsonschema.protocols.Validator:
    """Return a validator for a schema text; raises on an invalid schema."""
    schema: Any = json.loads(schema_json)
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise jsonschema.exceptions.SchemaError("a schema is an object or a boolean")
    validator_class = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    validator_class.check_schema(schema)
    return validator_class(schema)


def _location(error: jsonschema.exceptions.ValidationError) -> str:
    return error.json_path if error.path else "the arguments"


@dataclass(frozen=True, slots=True)
class ToolArgumentsSchema:
    """Blocks a call whose arguments do not satisfy its tool's JSON schema.

    The schema is the definition's `parameters_json_schema` (JSON Schema; the
    dialect named by `$schema`, draft 2020-12 when none is named). A call to a
    tool with no definition, arguments that are not JSON, and a definition
    whose schema is itself invalid are all blocks. Reasons name the failing
    location and schema keyword, never the argument values (they may be PII).
    """

    name: str = "tool_arguments_schema"
    version: str = "1"

    def check_call(self, call: ToolCall, tools: Mapping[str, ToolDefinition]) -> ToolCallCheck:
        """Validate `call.arguments_json` against its tool's schema."""
        definition = tools.get(call.name)
        if definition is None:
            return ToolCallCheck(
                call=call, block_reason=f"tool {call.name!r} has no definition to validate against"
            )
        try:
            validator = _validator(definition.parameters_json_schema or "{}")
        except (ValueError, jsonschema.exceptions.SchemaError):
            return ToolCallCheck(
                call=call,
                block_reason=f"the parameter schema of tool {call.name!r} is not a valid JSON schema",
            )
        try:
            arguments: Any = json.loads(call.arguments_json or "{}")
        except ValueError:
            return ToolCallCheck(
                call=call,
                block_reason=f"the arguments of tool call {call.call_id!r} are not valid JSON",
            )
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        if error is not None:
            return ToolCallCheck(
                call=call,
                block_reason=f"the arguments of tool call {call.call_id!r} fail the schema of "
                f"{call.name!r} at {_location(error)} (keyword {error.validator!r})",
            )
        return ToolCallCheck(call=call, reason=f"arguments match the schema of {call.name!r}")
