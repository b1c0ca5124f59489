"""Tool calls and structured output as JSON-schema constrained replies.

The service enforces a JSON schema while sampling (``SamplingConfig.json_schema``),
so a constrained reply always follows its schema and ends when the JSON is complete
(only ``max_tokens`` or a stop string can cut it short).

Tool calling: each bound tool is one shape of the reply,
``{"name": "<tool>", "arguments": {<the tool's parameters>}}``, and ``tool_choice``
picks the schema:

- ``"any"`` / ``"required"`` / ``True``: a call of one of the tools (``anyOf`` over them);
- a tool's name (or ``{"type": "function", "function": {"name": ...}}``): a call of that tool;
- ``"auto"`` / ``None``: a call of one of the tools, or ``{"answer": "<text>"}``; the model
  chooses, and an answer becomes the message's text;
- ``"none"`` / ``False``: the tools are left out; the reply is plain text.

A model cannot see the schema its sampler enforces, so the tools (name, description,
parameters) and the reply format are described in a system message: appended to the
conversation's first system message, or a new first message. One tool call per reply;
a tool's parameters admit no properties beyond those it declares.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.json import parse_partial_json
from langchain_core.utils.json_schema import dereference_refs

from parrot.tool_calls import call_schema

ANSWER_KEY = "answer"
FORCED_CHOICES = ("any", "required")
_SCHEMA_KEYS = ("type", "properties", "anyOf", "oneOf", "allOf", "$ref", "enum", "const", "items")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema of an object


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
    """``"auto"``, ``"any"``, ``"none"`` or a tool's name; raises ``ValueError`` for anything else."""
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in FORCED_CHOICES:
        return "any"
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


@dataclass(frozen=True)
class ToolUse:
    """The bound tools and the choice among them, for one invocation."""

    specs: list[ToolSpec]
    choice: str  # "auto", "any" or a tool's name

    @classmethod
    def of(cls, tools: Sequence[Any], tool_choice: Any) -> ToolUse | None:
        """From ``bind_tools``' keywords; ``None`` when the reply is plain text."""
        specs = [_spec(d["function"]) for d in tool_definitions(tools)]
        choice = normalize_tool_choice(tool_choice, [s.name for s in specs])
        if not specs or choice == "none":
            return None
        return cls(specs, choice)

    @property
    def offered(self) -> list[ToolSpec]:
        if self.choice in ("auto", "any"):
            return self.specs
        return [s for s in self.specs if s.name == self.choice]

    def json_schema(self) -> dict[str, Any]:
        options = [_call_schema(spec) for spec in self.offered]
        if self.choice == "auto":
            options.append({"type": "object", "properties": {ANSWER_KEY: {"type": "string"}},
                            "required": [ANSWER_KEY], "additionalProperties": False})
        return options[0] if len(options) == 1 else {"anyOf": options}

    def instructions(self) -> str:
        lines = ["You can call these tools:"]
        for spec in self.specs:
            about = f": {spec.description}" if spec.description else ""
            lines.append(f"- {spec.name}{about} Arguments (JSON schema): {json.dumps(spec.parameters)}")
        lines.append('To call a tool, reply with only {"name": <tool name>, "arguments": <arguments>}.')
        if self.choice == "auto":
            lines.append(f'To answer without a tool, reply with only {{"{ANSWER_KEY}": <your answer>}}.')
        elif self.choice == "any":
            lines.append("Call one of the tools.")
        else:
            lines.append(f"Call the tool {self.choice}.")
        return "\n".join(lines)

    def parse(self, text: str, finish_reason: str | None) -> ParsedReply:
        """The reply as message text, tool calls, or a tool call that could not be read."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            args = data.get("arguments")
            call = ToolCall(name=data["name"], args=args if isinstance(args, dict) else {}, id=new_call_id(),
                            type="tool_call")
            return ParsedReply(tool_calls=[call])
        if isinstance(data, dict) and ANSWER_KEY in data:
            return ParsedReply(content=str(data[ANSWER_KEY]))
        partial = _partial(text)
        if ANSWER_KEY in partial:  # an answer cut short (finish_reason says why)
            return ParsedReply(content=str(partial[ANSWER_KEY]))
        name = partial.get("name")
        error = f"the reply is not a complete tool call (finish_reason: {finish_reason})"
        return ParsedReply(invalid_tool_calls=[InvalidToolCall(
            name=name if isinstance(name, str) else None, args=text, id=new_call_id(), error=error,
            type="invalid_tool_call")])


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


def _spec(function: Mapping[str, Any]) -> ToolSpec:
    parameters = dict(function.get("parameters") or {})
    if "$defs" in parameters or "definitions" in parameters:
        parameters = dereference_refs(parameters)
        parameters.pop("$defs", None)
        parameters.pop("definitions", None)
    parameters.setdefault("type", "object")
    parameters.setdefault("properties", {})
    parameters.setdefault("additionalProperties", False)  # a tool takes the arguments it declares
    return ToolSpec(function["name"], function.get("description") or "", parameters)


def _call_schema(spec: ToolSpec) -> dict[str, Any]:
    # The same call shape the service's OpenAI routes constrain tool calls to.
    return call_schema(spec.name, spec.parameters)


def _partial(text: str) -> dict[str, Any]:
    try:
        data = parse_partial_json(text)
    except (ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}
