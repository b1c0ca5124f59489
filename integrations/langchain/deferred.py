"""Deferred replies: how a compiled chain's LLM calls reach the service as one graph.

Inside a compiled chain (see ``compiler.py``) a Parrot model does not wait for its
reply: it submits the call to the chain's Parrot session and returns a placeholder,
the text ``⟦parrot:<variable id>⟧`` standing for the reply's semantic variable.
Steps that only carry or splice text (prompt templates, ``StrOutputParser``,
passthrough, parallel branches) pass it on unchanged, so a later model call finds it
in its prompt and the service gets an input segment there: an edge of the graph.
Everything that must read real text gets real values first: ``resolve`` replaces
every placeholder inside a value (strings, messages, prompt values, lists, dicts)
with the variable's value, fetching it from the service, which waits for the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue

import parrot as P
from parrot.integrations.common.placeholders import PATTERN, Placeholders, substitute


def has_placeholder(value: Any) -> bool:
    """Whether a placeholder occurs anywhere inside ``value``."""
    return any(PATTERN.search(text) is not None for text in _strings(value))


class DeferredScope(Placeholders):
    """One compiled-chain run: its Parrot session and the replies it deferred."""

    def __init__(self, vm: P.Parrot, model_name: str, criterion: P.Criterion = P.LATENCY) -> None:
        super().__init__(criterion)
        self.vm = vm
        self.model_name = model_name

    # ---- real values ------------------------------------------------------------------
    def resolve(self, value: Any) -> Any:
        """``value`` with every placeholder of this run replaced by its variable's value."""
        return _substitute(value, self.values_for(_strings(value)))

    async def aresolve(self, value: Any) -> Any:
        return _substitute(value, await self.avalues_for(_strings(value)))


_scope: ContextVar[DeferredScope | None] = ContextVar("parrot_langchain_deferred_scope", default=None)


def current_scope() -> DeferredScope | None:
    """The compiled-chain run this code runs in, if any (LangChain copies context into its
    worker threads, so ``batch`` branches see it too)."""
    return _scope.get()


@contextmanager
def deferred_scope(scope: DeferredScope) -> Iterator[DeferredScope]:
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)


# ---- walking values -----------------------------------------------------------------------
def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, BaseMessage):
        yield from _strings(value.content)
        yield from _strings(value.additional_kwargs)
    elif isinstance(value, StringPromptValue):
        yield value.text
    elif isinstance(value, ChatPromptValue):
        yield from _strings(value.messages)
    elif isinstance(value, Document):
        yield value.page_content
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _substitute(value: Any, values: dict[str, str]) -> Any:
    if not values:
        return value
    if isinstance(value, str):
        return substitute(value, values)
    if isinstance(value, BaseMessage):
        return value.model_copy(update={"content": _substitute(value.content, values),
                                        "additional_kwargs": _substitute(value.additional_kwargs, values)})
    if isinstance(value, StringPromptValue):
        return StringPromptValue(text=_substitute(value.text, values))
    if isinstance(value, ChatPromptValue):
        return ChatPromptValue(messages=_substitute(value.messages, values))
    if isinstance(value, Document):
        return value.model_copy(update={"page_content": _substitute(value.page_content, values)})
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    if isinstance(value, tuple):
        return tuple(_substitute(v, values) for v in value)
    return value
