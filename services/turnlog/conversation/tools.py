"""Server-side tools: the registry the tool loop executes calls from.

A `ServerTool` is a definition (what the model is offered) plus an async
function from parsed JSON arguments to result text, run under its own
timeout. Tools never see the conversation; a failure becomes a recorded
`ToolCallFailed` whose error text is the tool's own safe message, never an
internal exception's text.

Built-ins (`builtin_tools`): `calculator` (arithmetic on numbers, evaluated
over a restricted syntax tree, never `eval`) and `current_time` (the injected
clock, so tests and replays are deterministic).
"""

from __future__ import annotations

import ast
import asyncio
import datetime
import json
import math
import operator
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from turnlog import errors
from turnlog.domain.events import ToolDefinition


class ToolError(Exception):
    """A tool failed for a reason safe to show the model and the client."""


ToolFunction = Callable[[Mapping[str, Any]], Awaitable[str]]
Clock = Callable[[], int]
"""Returns the current time in microseconds since the Unix epoch."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTool:
    """A tool the service executes itself.

    Attributes:
        definition: What the model is offered (`client_side` is False).
        run: Called with the parsed arguments; returns the result text or
            raises `ToolError`.
        timeout_s: How long one call may take before it fails.
    """

    definition: ToolDefinition
    run: ToolFunction
    timeout_s: float = 10.0


class ToolRegistry:
    """Server-side tools by name."""

    def __init__(self, tools: tuple[ServerTool, ...] = ()) -> None:
        self._tools: dict[str, ServerTool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: ServerTool) -> None:
        """Add a tool; a later registration of a name replaces the earlier one."""
        self._tools[tool.definition.name] = tool

    def get(self, name: str) -> ServerTool | None:
        """The tool of this name, if registered."""
        return self._tools.get(name)

    def names(self) -> tuple[str, ...]:
        """Registered tool names, sorted."""
        return tuple(sorted(self._tools))

    def complete(self, tool: ToolDefinition) -> ToolDefinition:
        """A conversation's tool as recorded: a server tool's blanks filled from its registration.

        Raises:
            InvalidArgumentError: No server tool of that name (and it is not client-side).
        """
        if tool.client_side:
            return tool
        server_tool = self._tools.get(tool.name)
        if server_tool is None:
            raise errors.InvalidArgumentError(
                f"no server-side tool named {tool.name!r}; mark client tools client_side",
                metadata={"tool": tool.name},
            )
        known = server_tool.definition
        return ToolDefinition(
            name=tool.name,
            description=tool.description or known.description,
            parameters_json_schema=(
                tool.parameters_json_schema
                if tool.parameters_json_schema not in ("", "{}")
                else known.parameters_json_schema
            ),
        )

    async def execute(self, name: str, arguments_json: str) -> str:
        """Run one call under the tool's timeout.

        Raises:
            ToolError: Unknown tool, arguments that are not a JSON object, a
                timeout, or the tool's own failure (a safe message).
        """
        tool = self._tools.get(name)
        if tool is None:
            raise ToolError(f"unknown tool {name!r}")
        try:
            arguments = json.loads(arguments_json or "{}")
        except json.JSONDecodeError as e:
            raise ToolError("arguments are not valid JSON") from e
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be a JSON object")
        try:
            async with asyncio.timeout(tool.timeout_s):
                return await tool.run(arguments)
        except TimeoutError as e:
            raise ToolError(f"tool {name!r} timed out after {tool.timeout_s:g}s") from e


_BINARY: Mapping[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: Mapping[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_MAX_EXPRESSION_CHARS = 200
_MAX_EXPONENT = 100


def evaluate_arithmetic(expression: str) -> float | int:
    """Evaluate `+ - * / // % **` and parentheses over numbers.

    Raises:
        ToolError: Anything else (names, calls, huge exponents), or a math error.
    """
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ToolError("expression too long")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise ToolError("not an arithmetic expression") from e

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            if isinstance(node.value, bool):
                raise ToolError("only numbers are allowed")
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            # Exponents are capped so that one call cannot eat the CPU.
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise ToolError("exponent too large")
            result: float | int = _BINARY[type(node.op)](left, right)
            return result
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            unary: float | int = _UNARY[type(node.op)](walk(node.operand))
            return unary
        raise ToolError("only numbers, + - * / // % ** and parentheses are allowed")

    try:
        result = walk(tree)
    except (ArithmeticError, ValueError) as e:
        raise ToolError(f"math error: {type(e).__name__}") from e
    if isinstance(result, float) and not math.isfinite(result):
        raise ToolError("result is not finite")
    return result


def calculator_tool(timeout_s: float = 1.0) -> ServerTool:
    """The `calculator` built-in: `{"expression": "2 * (3 + 4)"}` → `{"result": 14}`."""

    async def run(arguments: Mapping[str, Any]) -> str:
        expression = arguments.get("expression")
        if not isinstance(expression, str):
            raise ToolError("'expression' must be a string")
        return json.dumps({"result": evaluate_arithmetic(expression)})

    schema = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. 2 * (3 + 4)"}},
        "required": ["expression"],
        "additionalProperties": False,
    }
    return ServerTool(
        definition=ToolDefinition(
            name="calculator",
            description="Evaluate an arithmetic expression.",
            parameters_json_schema=json.dumps(schema),
        ),
        run=run,
        timeout_s=timeout_s,
    )


def clock_tool(clock: Clock, timeout_s: float = 1.0) -> ServerTool:
    """The `current_time` built-in: the time of `clock` in UTC, ISO 8601."""

    async def run(arguments: Mapping[str, Any]) -> str:
        now = datetime.datetime.fromtimestamp(clock() / 1_000_000, tz=datetime.UTC)
        return json.dumps({"utc": now.isoformat()})

    return ServerTool(
        definition=ToolDefinition(
            name="current_time",
            description="The current date and time in UTC.",
            parameters_json_schema=json.dumps({"type": "object", "properties": {}}),
        ),
        run=run,
        timeout_s=timeout_s,
    )


def builtin_tools(clock: Clock) -> ToolRegistry:
    """A registry holding the built-in tools."""
    return ToolRegistry((calculator_tool(), clock_tool(clock)))
