"""``compile(runnable)``: run an LCEL chain so that all its LLM calls reach Parrot as one graph.

The compiled chain runs the same steps on the same inputs, inside one Parrot session
(see ``deferred.py``). Its Parrot models submit their calls at once and hand on
placeholders for the replies; the steps in between are sorted by whether they may see
a placeholder:

- carried through as they are: ``RunnableSequence``, ``RunnableParallel`` (and dict
  steps), ``RunnablePassthrough`` (``.assign``, ``.pick``), ``.map()``, ``.bind()`` /
  ``.with_config()``, ``StrOutputParser``, and the Parrot models themselves;
- prompt templates (f-string, jinja2 with plain ``{{ name }}`` fields, chat templates with
  ``MessagesPlaceholder``) splice a string or message value into the prompt verbatim,
  so a placeholder there becomes an input segment of the next call; a value they would
  not insert verbatim (a list, an object, a field with a format spec or a conversion, a
  mustache field, which HTML-escapes) is resolved to its real text first;
- everything else (other output parsers, lambdas, routing, retrievers, other models)
  gets real values: its input is resolved first, which waits for the calls it needs.

The chain's output is resolved too, so the result is exactly the one the chain gives
without Parrot's deferral; only the calls were known to the service ahead of time.
``invoke`` fetches with ``P.LATENCY``, ``batch`` runs every input in one session and
fetches with ``P.THROUGHPUT``.
"""

from __future__ import annotations

import re
import string
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import BasePromptTemplate, ChatPromptTemplate, MessagesPlaceholder, PromptTemplate
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
    RunnableSequence,
)
from langchain_core.runnables.base import RunnableEach, coerce_to_runnable
from langchain_core.runnables.passthrough import RunnableAssign, RunnablePick

import parrot as P
from parrot.integrations.langchain.base import ParrotModelFields
from parrot.integrations.langchain.chat_models import ChatParrot
from parrot.integrations.langchain.deferred import (
    DeferredScope,
    current_scope,
    deferred_scope,
    has_placeholder,
)

_JINJA_FIELD = re.compile(r"{{(.*?)}}", re.S)
_NAME = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*")


def compile(runnable: Runnable | Mapping[str, Any]) -> Runnable:  # noqa: A001 - the name users expect
    """A Runnable that runs ``runnable`` with its Parrot models' calls submitted as one graph."""
    runnable = coerce_to_runnable(runnable)  # type: ignore[arg-type]
    models = list(_parrot_models(runnable))
    if not models:
        return runnable  # nothing to defer
    services = {m.base_url for m in models}
    if len(services) > 1:
        raise ValueError("the Parrot models of one compiled chain must use one service; "
                         f"found {sorted(map(str, services))}")
    return CompiledChain(_rewrite(runnable), models[0], name=runnable.get_name())


class CompiledChain(Runnable[Any, Any]):
    """``compile``'s result: the rewritten chain, run in one deferred scope per call."""

    def __init__(self, chain: Runnable, model: ParrotModelFields, name: str | None = None) -> None:
        self.chain = chain
        self.model = model
        self.name = name

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return self.chain.InputType

    @property
    def OutputType(self) -> Any:  # noqa: N802
        return self.chain.OutputType

    def get_input_schema(self, config: RunnableConfig | None = None) -> Any:
        return self.chain.get_input_schema(config)

    def get_output_schema(self, config: RunnableConfig | None = None) -> Any:
        return self.chain.get_output_schema(config)

    @contextmanager
    def _scope(self, criterion: P.Criterion) -> Iterator[DeferredScope]:
        if current_scope() is not None:  # nested in another compiled chain: share its graph
            yield current_scope()  # type: ignore[misc]
            return
        with self.model.session() as (vm, model):
            with deferred_scope(DeferredScope(vm, model, criterion)) as scope:
                yield scope

    @asynccontextmanager
    async def _ascope(self, criterion: P.Criterion) -> AsyncIterator[DeferredScope]:
        if current_scope() is not None:
            yield current_scope()  # type: ignore[misc]
            return
        async with self.model.asession() as (vm, model):
            with deferred_scope(DeferredScope(vm, model, criterion)) as scope:
                yield scope

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        with self._scope(P.LATENCY) as scope:
            return scope.resolve(self.chain.invoke(input, config, **kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        async with self._ascope(P.LATENCY) as scope:
            return await scope.aresolve(await self.chain.ainvoke(input, config, **kwargs))

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        with self._scope(P.THROUGHPUT) as scope:
            outputs = self.chain.batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
            return [out if isinstance(out, Exception) else scope.resolve(out) for out in outputs]

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None,
                     *, return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        async with self._ascope(P.THROUGHPUT) as scope:
            outputs = await self.chain.abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
            return [out if isinstance(out, Exception) else await scope.aresolve(out) for out in outputs]

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield self.invoke(input, config, **kwargs)  # the whole result once: it is resolved at the end

    async def astream(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[Any]:
        yield await self.ainvoke(input, config, **kwargs)


# ---- the rewrite ---------------------------------------------------------------------------
def _rewrite(node: Runnable) -> Runnable:
    if isinstance(node, RunnableSequence):
        return RunnableSequence(*[_rewrite(step) for step in node.steps], name=node.name)
    if isinstance(node, RunnableParallel):
        return RunnableParallel({key: _rewrite(step) for key, step in node.steps__.items()})
    if isinstance(node, RunnableAssign):
        return RunnableAssign(mapper=_rewrite(node.mapper))  # type: ignore[arg-type]
    if isinstance(node, RunnablePassthrough):
        return node if node.func is None and node.afunc is None else _resolving(node)
    if isinstance(node, RunnablePick):
        return node
    if isinstance(node, RunnableEach):
        return node.__class__(bound=_rewrite(node.bound))
    if isinstance(node, RunnableBinding):
        return node.model_copy(update={"bound": _rewrite(node.bound)})
    if isinstance(node, ChatParrot | StrOutputParser):
        return node  # (ParrotLLM's template calls tokenize an input apart: it gets real values)
    if isinstance(node, BasePromptTemplate):
        return _guarded(node) if _verbatim(node) else _resolving(node)
    return _resolving(node)


def _resolving(node: Runnable) -> Runnable:
    """``node`` on real values: placeholders in its input are resolved first."""

    def run(value: Any, config: RunnableConfig) -> Any:
        scope = current_scope()
        return node.invoke(scope.resolve(value) if scope else value, config)

    async def arun(value: Any, config: RunnableConfig) -> Any:
        scope = current_scope()
        return await node.ainvoke(await scope.aresolve(value) if scope else value, config)

    return RunnableLambda(run, afunc=arun, name=node.get_name())


def _guarded(template: BasePromptTemplate) -> Runnable:
    """A template that inserts strings and messages verbatim: those keep their placeholders,
    any other value is resolved first."""

    def to_resolve(value: Any) -> Any:
        """What of ``value`` the template would not insert as it is (None: nothing)."""
        if isinstance(value, dict):
            unsafe = {k: v for k, v in value.items() if not _inserted_verbatim(v) and has_placeholder(v)}
            return unsafe or None
        return None if isinstance(value, str) else value

    def with_real(value: Any, real: Any) -> Any:
        return value | real if isinstance(value, dict) else real

    def run(value: Any, config: RunnableConfig) -> Any:
        scope, part = current_scope(), to_resolve(value)
        if scope is not None and part is not None:
            value = with_real(value, scope.resolve(part))
        return template.invoke(value, config)

    async def arun(value: Any, config: RunnableConfig) -> Any:
        scope, part = current_scope(), to_resolve(value)
        if scope is not None and part is not None:
            value = with_real(value, await scope.aresolve(part))
        return await template.ainvoke(value, config)

    return RunnableLambda(run, afunc=arun, name=template.get_name())


def _inserted_verbatim(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(isinstance(m, BaseMessage) and isinstance(m.content, str)
                                           for m in value)


def _verbatim(template: BasePromptTemplate) -> bool:
    """Whether every field of ``template`` inserts its value's text as it is."""
    if isinstance(template, PromptTemplate):
        return _verbatim_text(template.template, template.template_format)
    if not isinstance(template, ChatPromptTemplate):
        return False
    for message in template.messages:
        if isinstance(message, MessagesPlaceholder | BaseMessage):
            continue
        prompt = getattr(message, "prompt", None)  # a message template: one prompt, or text and images
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not all(isinstance(p, PromptTemplate) and _verbatim(p) for p in prompts):
            return False
    return True


def _verbatim_text(text: str, template_format: str) -> bool:
    if template_format == "f-string":
        return all(name is None or (name.isidentifier() and not spec and conversion is None)
                   for _, name, spec, conversion in string.Formatter().parse(text))
    if template_format == "jinja2":
        return "{%" not in text and all(_NAME.fullmatch(f) for f in _JINJA_FIELD.findall(text))
    return False  # mustache HTML-escapes what it inserts


def _parrot_models(node: Runnable) -> Iterator[ParrotModelFields]:
    if isinstance(node, ParrotModelFields):
        yield node
        return
    children: Sequence[Any] = ()
    if isinstance(node, RunnableSequence):
        children = node.steps
    elif isinstance(node, RunnableParallel):
        children = list(node.steps__.values())
    elif isinstance(node, RunnableAssign):
        children = [node.mapper]
    elif isinstance(node, RunnableEach | RunnableBinding):
        children = [node.bound]
    for child in children:
        yield from _parrot_models(child)
