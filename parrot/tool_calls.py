"""Tool calls as JSON-schema constrained replies: the one design every face uses.

The service enforces a JSON schema while sampling, so a reply that may call tools is asked
for as JSON of a fixed shape and always follows it:

- a call: ``{"name": "<tool>", "arguments": {<the tool's parameters>}}``;
- a reply that must call (``tool_choice`` ``"required"`` or a named function):
  ``{"tool_calls": [<call>, ...]}`` with at least one call, at most one when parallel
  calls are off;
- a reply where the model chooses (``"auto"``): ``anyOf`` that object and
  ``{"content": "<text>"}``; the first key the model writes is its choice.

A model cannot see the schema its sampler enforces, so the tools and the reply format are
also described in words (``instructions``). A tool's parameters admit no properties
beyond those it declares, and local ``$ref``s in them are inlined (they would no longer
point at the root once nested).

``ToolReplyStream`` reads such a reply as it is generated: message text as it grows, each
call's name once written, and its ``arguments`` JSON text piece by piece.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CONTENT_KEY = "content"
CALLS_KEY = "tool_calls"
AUTO = "auto"
REQUIRED = "required"
_DEF_KEYS = ("$defs", "definitions")


def inline_refs(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with each local ``$ref`` replaced by the definition it names, and the
    definitions dropped. A recursive definition cannot be inlined: ``ValueError``."""
    definitions: dict[str, Any] = {}
    for key in _DEF_KEYS:
        for name, definition in (schema.get(key) or {}).items():
            definitions[f"#/{key}/{name}"] = definition

    def resolve(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref in definitions:
                if ref in seen:
                    raise ValueError(f"the schema refers to {ref} recursively; it cannot be inlined")
                target = resolve(definitions[ref], (*seen, ref))
                rest = {k: resolve(v, seen) for k, v in node.items() if k != "$ref"}
                return {**target, **rest}
            return {k: resolve(v, seen) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(item, seen) for item in node]
        return copy.deepcopy(node)

    # Only the root's definitions go: a property may well be called "definitions".
    return resolve({k: v for k, v in schema.items() if k not in _DEF_KEYS}, ())


def object_parameters(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """A tool's parameters as a closed object schema: a tool takes the arguments it declares."""
    schema = inline_refs(parameters or {})
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    schema.setdefault("additionalProperties", False)
    return schema


def call_schema(name: str, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """A call of the tool ``name``: ``{"name": name, "arguments": {...}}``."""
    return {"type": "object",
            "properties": {"name": {"const": name}, "arguments": object_parameters(parameters)},
            "required": ["name", "arguments"], "additionalProperties": False}


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None  # a JSON schema of an object


    @classmethod
    def from_openai(cls, tool: Mapping[str, Any]) -> FunctionTool:
        """A tool in OpenAI's function format, ``{"type": "function", "function": {"name",
        "description", "parameters"}}`` (or the inner ``function`` object alone), the form
        framework integrations hold their tools in. ``ValueError`` for anything else."""
        function = tool.get("function") if "function" in tool else tool
        if tool.get("type", "function") != "function" or not isinstance(function, Mapping):
            raise ValueError(f"tool {dict(tool)!r} is not a function tool; only functions can be called")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"function tool {dict(function)!r} has no name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ValueError(f"the parameters of tool {name!r} must be a JSON schema object")
        return cls(name, function.get("description") or "", parameters)


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str  # JSON text, valid against the tool's parameters


@dataclass
class ToolReply:
    """A whole reply: text, or the calls it makes (then ``content`` is ``None``)."""

    content: str | None = None
    calls: list[FunctionCall] = field(default_factory=list)


@dataclass(frozen=True)
class ToolUse:
    """The tools offered to one reply and how the model must use them.

    ``choice`` is ``"auto"`` (a call or text), ``"required"`` (at least one call) or the
    name of the one tool to call; ``parallel`` allows several calls in one reply."""

    tools: tuple[FunctionTool, ...]
    choice: str = AUTO
    parallel: bool = True

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if not names:
            raise ValueError("tool use needs at least one tool")
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique (got {', '.join(names)})")
        if self.choice not in (AUTO, REQUIRED) and self.choice not in names:
            raise ValueError(f"tool_choice names {self.choice!r}, which is not one of the tools "
                             f"({', '.join(names)})")

    @property
    def offered(self) -> list[FunctionTool]:
        if self.choice in (AUTO, REQUIRED):
            return list(self.tools)
        return [t for t in self.tools if t.name == self.choice]

    def json_schema(self) -> dict[str, Any]:
        options = [call_schema(t.name, t.parameters) for t in self.offered]
        items = options[0] if len(options) == 1 else {"anyOf": options}
        calls: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        if not self.parallel:
            calls["maxItems"] = 1
        schema = {"type": "object", "properties": {CALLS_KEY: calls}, "required": [CALLS_KEY],
                  "additionalProperties": False}
        if self.choice != AUTO:
            return schema
        text = {"type": "object", "properties": {CONTENT_KEY: {"type": "string"}},
                "required": [CONTENT_KEY], "additionalProperties": False}
        return {"anyOf": [schema, text]}

    @classmethod
    def from_openai(cls, tools: Sequence[Mapping[str, Any]], choice: str = AUTO, *,
                    parallel: bool = True) -> ToolUse:
        """Tool use over tools in OpenAI's function format (``FunctionTool.from_openai``)."""
        return cls(tuple(FunctionTool.from_openai(t) for t in tools), choice, parallel)

    def instructions(self, *, list_tools: bool = True) -> str:
        """The tools and the reply format in words, for a system message (``list_tools``
        false: the chat template lists the tools itself)."""
        lines = describe_tools(self.tools) if list_tools else []
        many = "one or more calls" if self.parallel else "one call"
        lines.append(f'To call tools, reply with only {{"{CALLS_KEY}": [{{"name": <tool name>, '
                     f'"arguments": <arguments>}}]}} ({many}).')
        if self.choice == AUTO:
            lines.append(f'To answer without a tool, reply with only {{"{CONTENT_KEY}": <your answer>}}.')
        elif self.choice == REQUIRED:
            lines.append("You must call a tool.")
        else:
            lines.append(f"You must call the tool {self.choice}.")
        return "\n".join(lines)

    def parse(self, text: str) -> ToolReply:
        """A finished reply. One cut short (by ``max_tokens`` or a stop string) keeps what was
        whole: the calls complete so far, or the text an answer got to; anything else comes
        back as ``content``, as generated."""
        scanner = _JsonScanner()
        try:
            scanner.feed(text)
            calls: list[FunctionCall] = []
            names = {t.name for t in self.offered}
            while True:
                name_path, path = (CALLS_KEY, len(calls), "name"), (CALLS_KEY, len(calls), "arguments")
                if name_path not in scanner.ends or path not in scanner.ends:
                    break
                name = json.loads(text[scanner.starts[name_path]:scanner.ends[name_path]])
                arguments = text[scanner.starts[path]:scanner.ends[path]]  # as generated, as streamed
                json.loads(arguments)
                if name not in names:
                    raise ValueError(f"a call of {name!r}, which was not offered")
                calls.append(FunctionCall(name, arguments))
            if calls:
                return ToolReply(calls=calls)
            start = scanner.starts.get((CONTENT_KEY,))
            if start is not None:
                end = scanner.ends.get((CONTENT_KEY,))
                raw = text[start + 1:(end - 1) if end is not None else len(text)]
                return ToolReply(content=_decodable_string(raw))
        except (ValueError, TypeError, IndexError):  # not the constrained shape at all
            pass
        return ToolReply(content=text)


def describe_tools(tools: Sequence[FunctionTool]) -> list[str]:
    """The tools in words, a line each after a heading: names, descriptions, parameters."""
    lines = ["You can call these tools:"]
    for t in tools:
        about = f": {t.description}" if t.description else ""
        parameters = json.dumps(object_parameters(t.parameters))
        lines.append(f"- {t.name}{about} Arguments (JSON schema): {parameters}")
    return lines


def call_message_json(calls: Sequence[tuple[str, Any]]) -> str:
    """Calls already made, as the model writes them (for rendering history): ``(name, arguments)``
    pairs, arguments a dict or its JSON text."""
    items = []
    for name, arguments in calls:
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                pass  # kept as the text the caller sent
        items.append({"name": name, "arguments": arguments})
    return json.dumps({CALLS_KEY: items}, ensure_ascii=False)


# ---- streaming -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStarted:
    index: int
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


StreamEvent = ContentDelta | CallStarted | ArgumentsDelta

_WS = " \t\n\r"


class _JsonScanner:
    """Finds where values start and end in JSON text fed piece by piece.

    Values are named by their path (keys and array indices from the root); the scanner keeps
    only the spans of the paths asked for, and trusts the text to be valid JSON (it is
    constrained to be)."""

    def __init__(self) -> None:
        self.text = ""
        self.starts: dict[tuple[Any, ...], int] = {}
        self.ends: dict[tuple[Any, ...], int] = {}
        self._pos = 0
        self._stack: list[list[Any]] = []  # [kind, key or index, state]
        self._in_string = False
        self._escape = False
        self._string_is_key = False
        self._string_start = 0
        self._scalar_start: int | None = None

    def _path(self) -> tuple[Any, ...]:
        return tuple(frame[1] for frame in self._stack)

    def _begin_value(self, at: int) -> None:
        self.starts[self._path()] = at

    def _end_value(self, at: int) -> None:
        self.ends[self._path()] = at
        if self._stack:
            self._stack[-1][2] = "comma"

    def feed(self, piece: str) -> None:
        self.text += piece
        text = self.text
        while self._pos < len(text):
            i, c = self._pos, text[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    if self._string_is_key:
                        self._stack[-1][1] = json.loads(text[self._string_start:i + 1])
                        self._stack[-1][2] = "colon"
                    else:
                        self._end_value(i + 1)
                continue
            if self._scalar_start is not None:
                if c in _WS or c in ",]}":
                    self._scalar_start = None
                    self._end_value(i)
                else:
                    continue
            state = self._stack[-1][2] if self._stack else "value"
            if c in _WS:
                continue
            if state == "key" and c == '"':
                self._in_string, self._string_is_key, self._string_start = True, True, i
            elif state == "colon" and c == ":":
                self._stack[-1][2] = "value"
            elif c == "," and state == "comma":
                frame = self._stack[-1]
                if frame[0] == "arr":
                    frame[1] += 1
                    frame[2] = "value"
                else:
                    frame[2] = "key"
            elif c in "}]":
                self._stack.pop()
                self._end_value(i + 1)
            elif state == "value":
                self._begin_value(i)
                if c == "{":
                    self._stack.append(["obj", None, "key"])
                elif c == "[":
                    self._stack.append(["arr", 0, "value"])
                elif c == '"':
                    self._in_string, self._string_is_key = True, False
                else:
                    self._scalar_start = i


def _decodable_string(raw: str) -> str:
    """The longest prefix of a JSON string body (between the quotes), decoded; an escape cut
    in the middle waits for the rest."""
    for cut in range(len(raw), max(len(raw) - 6, 0) - 1, -1):
        try:
            return json.loads(f'"{raw[:cut]}"')
        except ValueError:
            continue
    return ""


class ToolReplyStream:
    """Reads a tool-use reply as it is generated (see the module's docstring)."""

    def __init__(self) -> None:
        self._scanner = _JsonScanner()
        self._content_sent = 0
        self._announced = 0  # calls whose name was reported
        self._arguments_sent: list[int] = []

    @property
    def num_calls(self) -> int:
        return self._announced

    def feed(self, piece: str) -> list[StreamEvent]:
        scanner = self._scanner
        scanner.feed(piece)
        text, events = scanner.text, list[StreamEvent]()
        content_start = scanner.starts.get((CONTENT_KEY,))
        if content_start is not None:
            end = scanner.ends.get((CONTENT_KEY,))
            raw = text[content_start + 1:(end - 1) if end is not None else len(text)]
            decoded = _decodable_string(raw)
            if len(decoded) > self._content_sent:
                events.append(ContentDelta(decoded[self._content_sent:]))
                self._content_sent = len(decoded)
        while True:  # calls are reported in order, each once its name is complete
            index = self._announced
            name_path = (CALLS_KEY, index, "name")
            if name_path not in scanner.ends:
                break
            name = json.loads(text[scanner.starts[name_path]:scanner.ends[name_path]])
            events.append(CallStarted(index, name if isinstance(name, str) else str(name)))
            self._announced += 1
            self._arguments_sent.append(0)
        for index in range(self._announced):
            path = (CALLS_KEY, index, "arguments")
            start = scanner.starts.get(path)
            if start is None:
                continue
            end = scanner.ends.get(path, len(text))
            sent = self._arguments_sent[index]
            if end - start > sent:
                events.append(ArgumentsDelta(index, text[start + sent:end]))
                self._arguments_sent[index] = end - start
        return events
