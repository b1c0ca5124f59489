"""Prompt functions as graphs: ``enable_graphs(kernel)``.

SK renders a prompt template's nested function calls (``{{plugin.fn $arg}}``, Jinja2's
``{{ plugin_fn(input=x) }}``, Handlebars' ``{{plugin-fn input=x}}``) one after another,
each waiting for its model reply. With graphs on, two kernel filters change that:

- **Function invocation.** The outermost prompt function served by a Parrot connector
  opens one Parrot session (a ``GraphScope``) for its whole run. A prompt function
  called while a template renders inside that run is *deferred*: it renders its own
  template (its nested calls are deferred the same way, at any depth), and instead of
  waiting for the model, its call is submitted to the session and it returns a
  placeholder for the reply. A native function receives real text: placeholders in its
  arguments are replaced by their values first, which waits for those calls.
- **Prompt rendering.** A deferred function's rendered prompt becomes its call (the same
  chat history, or text prompt, and settings SK would send); a placeholder in it becomes
  an input: an edge of the graph.

The outermost function's own call then goes to the same session, with its inputs. The
service has the whole graph before anything is fetched, so independent nested calls run
in parallel, each starting as soon as its inputs exist, and the result (greedy) equals
SK's own sequential run: every prompt is rendered with the same values. The answer still
streams under ``invoke_stream``.

A function whose service is not a Parrot connector of the same service runs as usual, its
prompt's placeholders (if any) replaced by their values first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from contextvars import ContextVar
from html import unescape
from inspect import isasyncgen
from typing import Any, TypeAlias

from semantic_kernel import Kernel
from semantic_kernel.contents.chat_history import ChatHistory
from semantic_kernel.filters.filter_types import FilterTypes
from semantic_kernel.filters.functions.function_invocation_context import FunctionInvocationContext
from semantic_kernel.filters.prompts.prompt_render_context import PromptRenderContext
from semantic_kernel.functions.function_result import FunctionResult
from semantic_kernel.functions.kernel_function_from_prompt import KernelFunctionFromPrompt

from parrot.integrations.common.calls import submit
from parrot.integrations.common.placeholders import PATTERN, Placeholders, substitute
from parrot.integrations.semantic_kernel.chat_completion import ParrotChatCompletion
from parrot.integrations.semantic_kernel.scope import GraphScope, current_scope, graph_scope
from parrot.integrations.semantic_kernel.text_completion import ParrotTextCompletion

Next = Callable[[Any], Awaitable[None]]
ParrotService: TypeAlias = ParrotChatCompletion | ParrotTextCompletion

# True while a prompt template renders: prompt functions invoked then are the template's
# nested calls (a native function resets it for its body, so what it calls runs as usual).
_in_template: ContextVar[bool] = ContextVar("parrot_sk_in_template", default=False)
# True for the prompt function being invoked as a nested call (read by its rendering filter).
_deferred: ContextVar[bool] = ContextVar("parrot_sk_deferred", default=False)


def enable_graphs(kernel: Kernel) -> Kernel:
    """Serve ``kernel``'s prompt functions, nested calls included, as Parrot graphs (see the
    module docs). Calling it again changes nothing."""
    if _on_function_invocation not in _filters(kernel.function_invocation_filters):
        kernel.add_filter(FilterTypes.FUNCTION_INVOCATION, _on_function_invocation)
        kernel.add_filter(FilterTypes.PROMPT_RENDERING, _on_prompt_rendering)
    return kernel


def _filters(registered: list[tuple[int, Any]]) -> list[Any]:
    return [f for _, f in registered]


def _parrot_service(kernel: Kernel, context: Any) -> tuple[ParrotService, Any] | None:
    """The Parrot connector (and settings) that would serve ``context.function``, if any."""
    try:
        service, settings = kernel.select_ai_service(context.function, context.arguments)
    except Exception:  # noqa: BLE001 -- no service at all: SK itself reports that
        return None
    if isinstance(service, ParrotChatCompletion | ParrotTextCompletion):
        return service, settings
    return None


async def _on_function_invocation(context: FunctionInvocationContext, next: Next) -> None:
    scope = current_scope()
    if not isinstance(context.function, KernelFunctionFromPrompt):
        if scope is not None:  # native code reads real text, and what it invokes runs as usual
            await _resolve_arguments(context, scope.placeholders)
        in_template = _in_template.set(False)
        try:
            await next(context)
        finally:
            _in_template.reset(in_template)
        return
    if scope is not None:
        deferred = _deferred.set(_in_template.get())
        try:
            await next(context)
        finally:
            _deferred.reset(deferred)
        return
    selected = _parrot_service(context.kernel, context)
    if selected is None:
        await next(context)
        return
    await _run_outermost(context, next, selected[0])


async def _run_outermost(context: FunctionInvocationContext, next: Next, service: ParrotService) -> None:
    """Run the outermost prompt function in a new session; its nested calls join it."""
    stack = AsyncExitStack()
    vm, model_name = await stack.enter_async_context(service.sessions().asession())
    scope = GraphScope(vm, model_name, service.base_url, Placeholders())
    try:
        with graph_scope(scope):
            await next(context)
    except BaseException:
        await stack.aclose()
        raise
    result = context.result
    if result is not None and isasyncgen(result.value):
        # Streamed: SK reads the reply after this filter returns, so the session stays open,
        # and the scope visible to the connector, until the stream ends.
        result.value = _scoped_stream(result.value, scope, stack)
    else:
        await stack.aclose()


async def _scoped_stream(stream: AsyncIterator[Any], scope: GraphScope,
                         stack: AsyncExitStack) -> AsyncIterator[Any]:
    try:
        with graph_scope(scope):
            async for item in stream:
                yield item
    finally:
        await stack.aclose()


async def _on_prompt_rendering(context: PromptRenderContext, next: Next) -> None:
    scope = current_scope()
    defer = _deferred.get()
    in_template, deferred = _in_template.set(True), _deferred.set(False)
    try:
        await next(context)
    finally:
        _in_template.reset(in_template)
        _deferred.reset(deferred)
    if scope is None or context.rendered_prompt is None or context.function_result is not None:
        return
    selected = _parrot_service(context.kernel, context)
    if selected is None or selected[0].base_url != scope.base_url:
        # Another service: it gets the prompt with real values, as SK would send it.
        values = await scope.placeholders.avalues_for([context.rendered_prompt])
        context.rendered_prompt = substitute(context.rendered_prompt, values)
        return
    if defer:
        service, settings = selected
        context.function_result = _defer(context, service, settings, scope)


def _defer(context: PromptRenderContext, service: ParrotService, settings: Any,
           scope: GraphScope) -> FunctionResult:
    """Submit the rendered prompt's call to the scope's session; the result is its placeholder."""
    rendered = context.rendered_prompt or ""
    if isinstance(service, ParrotChatCompletion):
        call = service.prepare_chat_call(ChatHistory.from_rendered_prompt(rendered), settings,
                                         scope.placeholders)
    else:
        call = service.prepare_text_call(unescape(rendered), settings, scope.placeholders)
    submit(scope.vm, [call])
    reply = call.outputs[-1]
    return FunctionResult(function=context.function.metadata, value=scope.placeholders.defer(reply),
                          rendered_prompt=rendered, metadata={"parrot_call_id": call.decl.id})


async def _resolve_arguments(context: FunctionInvocationContext, placeholders: Placeholders) -> None:
    """Replace placeholders in a native function's string arguments by their values."""
    texts = [v for v in context.arguments.values() if isinstance(v, str) and PATTERN.search(v)]
    if not texts:
        return
    values = await placeholders.avalues_for(texts)
    for key, value in list(context.arguments.items()):
        if isinstance(value, str):
            context.arguments[key] = substitute(value, values)
