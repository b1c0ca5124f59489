"""LangChain messages as the messages of a Parrot chat call.

The service renders a chat call's messages with the model's chat template, which
knows the roles ``system``, ``developer``, ``user`` and ``assistant``. LangChain's
other message kinds are written in those terms:

- an ``AIMessage``'s tool calls become its text, after any text it has, as the JSON a
  constrained reply writes them in (``{"tool_calls": [{"name": ..., "arguments": ...}]}``,
  ``parrot.tool_calls``), so a conversation shows the model its own earlier calls as it
  wrote them;
- a ``ToolMessage`` (or legacy ``FunctionMessage``) becomes a ``user`` message
  ``Tool <name> returned: <content>`` (``failed:`` for ``status="error"``).

Contents must be text: text blocks of a list content are joined with newlines (as the
OpenAI routes join text parts); images, audio and files are refused with a
``ValueError`` that names the message.

``split`` lets a caller put semantic variables into the text (a chain compiler whose
prompts refer to values not computed yet): it maps each message's text to the parts,
strings and ``SemanticVariable``s, that ``parrot.chat_call.prepare_chat`` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from parrot.tool_calls import call_message_json
from parrot.variable import SemanticVariable

Part = str | SemanticVariable
TextSplitter = Callable[[str], Sequence[Part]]

# Content blocks that carry no prompt text: tool calls are rendered from ``tool_calls``,
# reasoning is the model's own scratch work.
_SKIPPED_BLOCKS = {"tool_use", "tool_call", "tool_call_chunk", "invalid_tool_call", "reasoning", "thinking"}
_CHAT_ROLES = {"system": "system", "developer": "developer", "user": "user", "human": "user",
               "assistant": "assistant", "ai": "assistant"}


def to_chat_messages(messages: Sequence[BaseMessage], *,
                     split: TextSplitter | None = None) -> list[dict[str, Any]]:
    """The messages as ``prepare_chat`` takes them: ``{"role", "content"[, "name"]}`` dicts."""
    out = []
    for index, message in enumerate(messages):
        role, text = _role_and_text(message, index)
        entry: dict[str, Any] = {"role": role, "content": list(split(text)) if split else [text]}
        if message.name and not isinstance(message, ToolMessage | FunctionMessage):
            entry["name"] = message.name  # a tool's name is in the text already
        out.append(entry)
    return out


def content_text(content: str | list[str | dict[str, Any]], where: str) -> str:
    """The text of a message content; non-text blocks other than tool calls are refused."""
    if isinstance(content, str):
        return content
    texts = []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind not in _SKIPPED_BLOCKS:
            raise ValueError(f"{where} has a {kind!r} content block; Parrot chat models take text only")
    return "\n".join(texts)


def _role_and_text(message: BaseMessage, index: int) -> tuple[str, str]:
    where = f"message {index} ({type(message).__name__})"
    if isinstance(message, SystemMessage):
        return "system", content_text(message.content, where)
    if isinstance(message, HumanMessage):
        return "user", content_text(message.content, where)
    if isinstance(message, AIMessage):
        return "assistant", _assistant_text(message, where)
    if isinstance(message, ToolMessage):
        verb = "failed" if message.status == "error" else "returned"
        text = content_text(message.content, where)
        return "user", f"Tool {message.name or message.tool_call_id} {verb}: {text}"
    if isinstance(message, FunctionMessage):
        return "user", f"Tool {message.name} returned: {content_text(message.content, where)}"
    if isinstance(message, ChatMessage):
        role = _CHAT_ROLES.get(message.role)
        if role is None:
            raise ValueError(f"{where} has role {message.role!r}; Parrot chat models take "
                             f"{', '.join(sorted(_CHAT_ROLES))}")
        return role, content_text(message.content, where)
    raise ValueError(f"{where}: a Parrot chat model cannot send this kind of message")


def _assistant_text(message: AIMessage, where: str) -> str:
    parts = [content_text(message.content, where)]
    if message.tool_calls:
        parts.append(call_message_json([(call["name"], call["args"]) for call in message.tool_calls]))
    return "\n".join(p for p in parts if p)
