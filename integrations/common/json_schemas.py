"""JSON schemas for structured output, and the system text that goes with a constrained reply.

The service enforces a JSON schema while sampling (``SamplingConfig.json_schema``), so a
constrained reply always follows its schema. Structured output asks for the schema of a
pydantic class (or any type pydantic can describe), a JSON schema, or OpenAI's
``response_format`` (``response_format_schema``). Tool calls are constrained replies too, in
the one envelope every face uses: ``parrot.tool_calls``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, TypeAdapter

# Keys that make a mapping a JSON schema rather than an OpenAI wrapper around one.
_SCHEMA_KEYS = ("type", "properties", "anyOf", "oneOf", "allOf", "$ref", "enum", "const", "items")
_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def type_schema(tp: type) -> dict[str, Any]:
    """The JSON schema of a pydantic class, or of any type pydantic can describe (a dataclass,
    a TypedDict, ``list[int]``...).

    Its objects are closed where the type leaves extra keys open (pydantic says nothing for
    its default, extras ignored): a reply then holds the fields the type reads and no others,
    as OpenAI's strict structured outputs do.
    """
    schema = tp.model_json_schema() if issubclass(tp, BaseModel) else TypeAdapter(tp).json_schema()
    return _closed(schema)


def _closed(node: Any) -> Any:
    if isinstance(node, dict):
        closed = {k: _closed(v) for k, v in node.items()}
        if closed.get("type") == "object" and "properties" in closed:
            closed.setdefault("additionalProperties", False)
        return closed
    if isinstance(node, list):
        return [_closed(item) for item in node]
    return node


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a structured reply must follow (``None``: plain text).

    ``response_format`` is OpenAI's (``{"type": "text" | "json_object" | "json_schema", ...}``),
    a JSON schema, or a type (``type_schema``). ``ValueError`` for anything else.
    """
    if response_format is None:
        return None
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind == "text" and len(response_format) == 1:
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise ValueError("a response_format of type 'json_schema' needs a 'json_schema' dict")
            return dict(spec.get("schema") or {"type": "object"})
        if isinstance(kind, str) and kind not in _JSON_TYPES:
            raise ValueError(f"response_format type {kind!r} is not supported; use text, json_object, "
                             "json_schema, or a JSON schema")
        if isinstance(response_format.get("schema"), Mapping):  # the inner json_schema spec itself
            return dict(response_format["schema"])
        if any(key in response_format for key in _SCHEMA_KEYS):
            return dict(response_format)
        raise ValueError(f"response_format {dict(response_format)!r} is neither a JSON schema nor OpenAI's "
                         "{'type': 'text' | 'json_object' | 'json_schema', ...}")
    if isinstance(response_format, type):
        return type_schema(response_format)
    raise ValueError(f"response_format must be a type, a JSON schema or OpenAI's response_format dict, "
                     f"not {type(response_format).__name__}")


def with_instructions(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``messages`` with ``text`` (the tools and reply format, which a model cannot see in the
    schema its sampler enforces) appended to the first system message, or in a new first one."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0])
        first["content"] = [*first["content"], "\n\n" + text]
        return [first, *messages[1:]]
    return [{"role": "system", "content": [text]}, *messages]
