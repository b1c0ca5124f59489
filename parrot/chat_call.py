"""Chat calls in the native SDK: messages whose contents may hold semantic variables.

    with P.Parrot(url) as vm:
        doc = vm.variable("...")
        summary = P.chat([
            ("system", "You are terse."),
            ("user", ["Summarize: ", doc]),
        ], max_tokens=64)
        answer = P.chat([("user", ["Given ", summary, ", what should we do next?"])])
        print(answer.get(perf=P.LATENCY))

The service renders the messages with the model's chat template once every variable
in them is set, exactly as ``/v1/chat/completions`` renders the same final text, and
generates one reply: the variable ``P.chat`` returns at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from parrot.schemas import CallDecl, InputSegment, MessageDecl, OutputSegment, SamplingConfig, TextSegment
from parrot.sdk import Output, PreparedCall
from parrot.variable import SemanticVariable
from parrot.vm import current_vm


@dataclass(frozen=True)
class Stripped:
    """A variable in a message whose value goes in with whitespace removed from one or both
    ends, as a client that strips the text around it would have sent it."""

    var: SemanticVariable
    side: Literal["start", "end", "both"] = "both"


# ``{"role": ..., "content": ..., "name": ...}`` (name optional) or ``(role, content)``
MessageLike = Mapping[str, Any] | tuple[str, Any]

_MESSAGE_KEYS = {"role", "content", "name"}


def prepare_chat(messages: Sequence[MessageLike], *, name: str | None = None,
                 sampling: SamplingConfig | None = None, **sampling_fields: Any) -> PreparedCall:
    """Build a chat call without submitting it (what ``chat`` sends).

    A message's ``content`` is a string, a ``SemanticVariable``, or a list of both; a
    variable (or a ``Stripped`` one) becomes an input, any other value constant text
    (``str(value)``; ``None`` is empty). Roles:
    ``system``, ``developer`` (rendered as ``system``), ``user``, ``assistant``.
    The reply is sampled per ``sampling`` or the keywords of ``P.Output`` (``max_tokens``,
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``ignore_eos``); greedy by default.
    """
    config = Output(sampling, **sampling_fields).sampling
    inputs: list[SemanticVariable] = []
    decls = []
    for message in messages:
        role, content, message_name = _unpack(message)
        parts = content if isinstance(content, list | tuple) else [content]
        segments: list[TextSegment | InputSegment] = []
        for part in parts:
            if isinstance(part, SemanticVariable | Stripped):
                var = part.var if isinstance(part, Stripped) else part
                if var not in inputs:
                    inputs.append(var)
                side = part.side if isinstance(part, Stripped) else None
                segments.append(InputSegment(var=var.id, strip=side))
                continue
            text = "" if part is None else str(part)
            last = segments[-1] if segments else None
            if isinstance(last, TextSegment):
                segments[-1] = TextSegment(text=last.text + text)
            elif text:
                segments.append(TextSegment(text=text))
        decls.append(MessageDecl(role=role, content=segments, name=message_name))
    label = name or "chat"
    reply = SemanticVariable(name=label)
    decl = CallDecl(id=uuid.uuid4().hex, name=label, kind="llm", messages=decls,
                    output=OutputSegment(var=reply.id, sampling=config))
    return PreparedCall(decl, inputs, [reply])


def chat(messages: Sequence[MessageLike], *, name: str | None = None,
         sampling: SamplingConfig | None = None, **sampling_fields: Any) -> SemanticVariable:
    """Issue a chat call in the current VM; return its reply variable at once.

    Arguments as for ``prepare_chat``; ``name`` names the call in the service's graph.
    """
    vm = current_vm()
    call = prepare_chat(messages, name=name, sampling=sampling, **sampling_fields)
    vm.submit(call.decl, call.inputs, call.outputs)
    return call.outputs[0]


def _unpack(message: MessageLike) -> tuple[Any, Any, str | None]:
    if isinstance(message, tuple):
        if len(message) != 2:
            raise TypeError(f"a message tuple is (role, content), not {len(message)} items")
        return message[0], message[1], None
    if not isinstance(message, Mapping):
        raise TypeError(f"a message is a dict or a (role, content) tuple, not {type(message).__name__}")
    unknown = set(message) - _MESSAGE_KEYS
    if unknown:
        raise TypeError(f"unsupported message keys {sorted(unknown)}; a message has role, content "
                        "and optionally name")
    if "role" not in message or "content" not in message:
        raise TypeError("a message needs a role and a content")
    return message["role"], message["content"], message.get("name")
