"""Tool calls and structured output as JSON-schema constrained replies.

The service enforces a JSON schema while sampling (``SamplingConfig.json_schema``),
so a constrained reply always follows its schema and ends when the JSON is complete
(only ``max_tokens`` or a stop string can cut it short).

Tool calling is ``parrot.tool_calls.ToolUse``, the design every face of Parrot shares: the
reply is ``{"tool_calls": [{"name": "<tool>", "arguments": {...}}, ...]}``, or for
``"auto"`` that or ``{"content": "<text>"}``. ``tool_choice`` picks the schema:

- ``"any"`` / ``"required"`` / ``True``: at least one call, of any of the tools;
- a tool's name (or ``{"type": "function", "function": {"name": ...}}``): a call of that tool;
- ``"auto"`` / ``None``: calls, or a text answer; the model chooses, and an answer becomes
  the message's text;
- ``"none"`` / ``False``: the tools are left out; the reply is plain text.

One call per reply unless ``bind_tools(..., parallel_tool_calls=True)``. The tools and the
reply format are described in a system message (``ToolUse.instructions``): appended to the
conversation's first system message, or a new first message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool

from parrot.tool_calls import AUTO, REQUIRED, CallStarted, ToolReplyStream, ToolUse

FORCED_CHOICES = ("any", "required")
_SCHEMA_KEYS = ("type", "properties", "anyOf", "oneOf", "allOf", "$ref", "enum", "const", "items")


@dataclass
class ParsedReply:
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def tool_definitions(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Tools (LangChain tools, functions, pydantic classes, JSON schemas, OpenAI tool dicts)
    in OpenAI's function format, the form ``bind_tools`` binds them in."""
    formatted = []
    for tool in tools:
        definition = convert_to_openai_tool(tool)
        if definition.get("type") != "function" or "function" not in definition:
            raise ValueError(f"tool {definition!r} is not a function tool; Parrot chat models call "
                             "functions only")
        formatted.append(definition)
    return formatted


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str:
    """``"auto"``, ``"required"``, ``"none"`` or a tool's name; ``ValueError`` for anything else."""
    if tool_choice is None or tool_choice == "auto":
        return AUTO
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in FORCED_CHOICES:
        return REQUIRED
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not isinstance(name, str):
            raise ValueError(f"tool_choice {tool_choice!r} names no function")
        tool_choice = name
    if isinstance(tool_choice, str):
        if tool_choice not in names:
            raise ValueError(f"tool_choice {tool_choice!r} is not one of the bound tools "
                             f"({', '.join(names) or 'none bound'})")
        return tool_choice
    raise ValueError(f"tool_choice must be 'auto', 'any', 'required', 'none', a bool, a tool name or "
                     f"{{'type': 'function', 'function': {{'name': ...}}}}, not {tool_choice!r}")


def bound_tool_use(tools: Sequence[Any], tool_choice: Any,
                   parallel_tool_calls: bool | None = None) -> ToolUse | None:
    """The tool use of an invocation, from ``bind_tools``' keywords; ``None`` when the reply is
    plain text. Parallel calls are off unless ``parallel_tool_calls`` is true."""
    definitions = _distinct(tool_definitions(tools))
    choice = normalize_tool_choice(tool_choice, [d["function"]["name"] for d in definitions])
    if not definitions or choice == "none":
        return None
    use = ToolUse.from_openai(definitions, choice, parallel=bool(parallel_tool_calls))
    use.json_schema()  # a tool schema that cannot be used (a recursive $ref) fails now
    return use


def parse_reply(use: ToolUse, text: str, finish_reason: str | None) -> ParsedReply:
    """The reply as message text, tool calls, or a tool call that could not be read (one cut
    short by ``max_tokens`` or a stop string; ``finish_reason`` says which)."""
    reply = use.parse(text)
    calls = [ToolCall(name=c.name, args=_arguments(c.arguments), id=new_call_id(), type="tool_call")
             for c in reply.calls]
    if reply.content is not None and reply.content != text:  # an answer, whole or cut short
        return ParsedReply(content=reply.content)
    # Calls begun whose names were written: one past the complete calls is the one cut short.
    try:
        started = [e.name for e in ToolReplyStream().feed(text) if isinstance(e, CallStarted)]
    except (ValueError, TypeError, IndexError):  # not the constrained shape at all
        started = []
    if calls and len(started) <= len(calls):
        return ParsedReply(tool_calls=calls)
    name = started[len(calls)] if len(started) > len(calls) else None
    error = f"the reply is not a complete tool call (finish_reason: {finish_reason})"
    invalid = InvalidToolCall(name=name, args=text, id=new_call_id(), error=error, type="invalid_tool_call")
    return ParsedReply(tool_calls=calls, invalid_tool_calls=[invalid])


def output_json_schema(schema: Any) -> dict[str, Any]:
    """The JSON schema of a structured output: a pydantic class (v1 or v2), a TypedDict, a JSON
    schema, or an OpenAI tool / response-format spec."""
    if isinstance(schema, Mapping):
        if schema.get("type") == "function" and isinstance(schema.get("function"), Mapping):
            return dict(schema["function"].get("parameters") or {"type": "object"})
        if "name" in schema and isinstance(schema.get("schema"), Mapping):  # response_format's json_schema
            return dict(schema["schema"])
        if any(key in schema for key in _SCHEMA_KEYS):
            return dict(schema)
    return convert_to_json_schema(schema)


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) as a JSON schema."""
    if isinstance(response_format, Mapping) and "type" in response_format:
        kind = response_format["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            return dict(spec.get("schema") or {"type": "object"})
        raise ValueError(f"response_format type {kind!r} is not supported; use text, json_object or "
                         "json_schema")
    return output_json_schema(response_format)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments(text: str) -> dict[str, Any]:
    args = json.loads(text)  # constrained to the tool's parameters, an object
    return args if isinstance(args, dict) else {}


def _distinct(definitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The definitions with repeats dropped: a call names its tool, so two tools of one name must
    be one tool. They may differ in titles only (a pydantic class and its JSON schema do), which
    constrain nothing; otherwise ``ValueError``."""
    kept: dict[str, dict[str, Any]] = {}
    for definition in definitions:
        name = definition["function"]["name"]
        first = kept.setdefault(name, definition)
        if first is not definition and _untitled(first["function"]) != _untitled(definition["function"]):
            raise ValueError(f"two different tools are named {name!r}; a call names its tool, so tool "
                             "names must be unique")
    return list(kept.values())


def _untitled(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _untitled(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(node, list):
        return [_untitled(item) for item in node]
    return node
