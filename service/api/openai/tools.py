"""Tool calling on the chat route: rendering tools and past calls into the prompt, and
turning a constrained reply (``parrot.tool_calls``) into OpenAI's ``tool_calls``.

Rendering. A chat template that reads ``tools`` gets them, and past calls and results as
OpenAI messages (``tool_calls`` with ``arguments`` parsed to a dict, as Hugging Face
templates expect; ``tool`` messages with ``tool_call_id``). A template that does not is
given a documented fallback that any template can render:

- the tools, with their parameter schemas, in the first system message (a new one first
  when there is none), with the reply format the sampler enforces;
- an assistant message's calls as the JSON the model writes for them
  (``{"tool_calls": [{"name": ..., "arguments": {...}}]}``) after its text;
- tool results as one user message per run of consecutive ``tool`` messages, one JSON
  line each: ``{"tool_call_id": ..., "name": ..., "content": ...}``.

Replies. A call gets an id ``call_<24 hex>``; its ``arguments`` are the JSON text the
model generated, valid against the tool's parameters. A reply that made calls has
``content: null`` and ``finish_reason: "tool_calls"``. A reply cut by ``max_tokens``
(``finish_reason: "length"``) keeps the calls that were complete, or the text an answer
got to; with neither, its raw text is the content.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from parrot.service.api.openai.protocol import (
    ChatMessage,
    ChatResponseMessage,
    ChatTool,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    ToolCallOut,
)
from parrot.tool_calls import (
    ArgumentsDelta,
    CallStarted,
    ContentDelta,
    ToolReplyStream,
    ToolUse,
    call_message_json,
)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return text


def with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``messages`` with ``text`` after the first system message's content, or in a new
    first system message."""
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}" if first["content"] else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def chat_template_messages(messages: list[ChatMessage], use: ToolUse | None,
                           tools: list[ChatTool] | None, *, native_tools: bool
                           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and the tools, for templates that render them) to give the chat
    template; see the module's docstring."""
    if not any(m.tool_calls or m.role == "tool" for m in messages) and use is None:
        return [m.to_template_dict() for m in messages], None
    out = _native(messages) if native_tools else _fallback(messages)
    template_tools = None
    if use is not None:
        if native_tools:
            template_tools = [t.model_dump(exclude_none=True) for t in tools or ()]
        out = with_system_text(out, use.instructions(list_tools=not native_tools))
    return out, template_tools


def _native(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        entry: dict[str, Any] = m.to_template_dict()
        if m.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name,
                                                 "arguments": _arguments(c.function.arguments)}}
                                   for c in m.tool_calls]
        if m.role == "tool":
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out


def _fallback(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # call id -> tool name, for the results
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            name = names.get(m.tool_call_id or "", m.name)
            line = json.dumps({"tool_call_id": m.tool_call_id, "name": name, "content": m.text()},
                              ensure_ascii=False)
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + line
            else:
                out.append({"role": "user", "content": "Tool results:\n" + line, "_tool_results": True})
            continue
        entry: dict[str, Any] = {"role": _role(m), "content": m.text()}
        if m.name:
            entry["name"] = m.name
        if m.tool_calls:
            for c in m.tool_calls:
                names[c.id] = c.function.name
            calls = call_message_json([(c.function.name, c.function.arguments) for c in m.tool_calls])
            entry["content"] = f"{entry['content']}\n{calls}" if entry["content"] else calls
        out.append(entry)
    for entry in out:
        entry.pop("_tool_results", None)
    return out


def reply_message(use: ToolUse, text: str, finish_reason: str | None
                  ) -> tuple[ChatResponseMessage, str | None]:
    """The assistant message of a whole tool-use reply, and its finish reason."""
    reply = use.parse(text)
    if not reply.calls:
        return ChatResponseMessage(content=reply.content), finish_reason
    calls = [ToolCallOut(id=new_call_id(), function=FunctionCallOut(name=c.name, arguments=c.arguments))
             for c in reply.calls]
    return ChatResponseMessage(content=None, tool_calls=calls), (
        "tool_calls" if finish_reason == "stop" else finish_reason)


class ToolDeltas:
    """Turns the text pieces of a streamed tool-use reply into OpenAI chat deltas."""

    def __init__(self) -> None:
        self._stream = ToolReplyStream()
        self.text = ""
        self.emitted = False  # whether any delta came out of the reply so far

    @property
    def made_calls(self) -> bool:
        return self._stream.num_calls > 0

    def feed(self, piece: str) -> list[DeltaMessage]:
        self.text += piece
        deltas: list[DeltaMessage] = []
        calls: list[DeltaToolCall] = []
        for event in self._stream.feed(piece):
            if isinstance(event, ContentDelta):
                deltas.append(DeltaMessage(content=event.text))
            elif isinstance(event, CallStarted):
                calls.append(DeltaToolCall(index=event.index, id=new_call_id(), type="function",
                                           function=DeltaFunctionCall(name=event.name, arguments="")))
            elif isinstance(event, ArgumentsDelta):
                calls.append(DeltaToolCall(index=event.index,
                                           function=DeltaFunctionCall(arguments=event.text)))
        if calls:
            deltas.append(DeltaMessage(tool_calls=calls))
        self.emitted = self.emitted or bool(deltas)
        return deltas

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return "tool_calls" if self.made_calls and finish_reason == "stop" else finish_reason
