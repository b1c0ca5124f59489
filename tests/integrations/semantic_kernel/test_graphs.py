"""Prompt functions as graphs: a template's nested prompt-function calls reach the service with
the outer call as one graph, in every template format and at depth two, and give SK's own result."""

from __future__ import annotations

import pytest
from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.functions import KernelArguments, KernelFunctionFromPrompt, kernel_function

from parrot.chat_call import Stripped
from parrot.integrations.common.placeholders import Placeholders
from parrot.integrations.semantic_kernel import ParrotChatCompletion, enable_graphs
from parrot.variable import SemanticVariable
from tests.integrations.langchain.graphs import inputs, output, posted_graphs

SECTIONS = {"a": "The battery lasts two days.", "b": "The screen is bright and sharp.",
            "c": "The camera is noisy at night."}
NESTED = {  # the outer template's three nested calls, per template format
    "semantic-kernel": "{{{{writer.summarize section=${key}}}}}",
    "jinja2": "{{{{ writer_summarize(section={key}) }}}}",
    "handlebars": "{{{{writer-summarize section={key}}}}}",
}
SETTINGS = {"default": PromptExecutionSettings(extension_data={"max_tokens": 6, "temperature": 0.0})}


def outer_template(fmt: str) -> str:
    parts = "".join(f"- {NESTED[fmt].format(key=key)}\n" for key in SECTIONS)
    return f"Review summaries:\n{parts}\nWrite a verdict."


class Words:
    @kernel_function(name="count")
    def count(self, text: str) -> str:
        return f"{len(text.split())} words"


def build_kernel(url: str, fmt: str = "semantic-kernel", *, graphs: bool, depth: int = 1,
                 outer: str | None = None) -> Kernel:
    kernel = Kernel()
    kernel.add_service(ParrotChatCompletion(base_url=url))
    kernel.add_plugin(Words(), "words")
    if depth == 2:
        kernel.add_function("writer", KernelFunctionFromPrompt(
            function_name="shorten", prompt="Shorten: {{$text}}", prompt_execution_settings=SETTINGS))
        summarize = "Summarize: {{writer.shorten text=$section}}"
    else:
        summarize = "Summarize: {{$section}}"
    kernel.add_function("writer", KernelFunctionFromPrompt(
        function_name="summarize", prompt=summarize, prompt_execution_settings=SETTINGS))
    kernel.add_function("writer", KernelFunctionFromPrompt(
        function_name="combine", prompt=outer or outer_template(fmt), template_format=fmt,
        prompt_execution_settings=SETTINGS))
    return enable_graphs(kernel) if graphs else kernel


async def combine(kernel: Kernel) -> str:
    return str(await kernel.invoke(kernel.get_function("writer", "combine"), KernelArguments(**SECTIONS)))


@pytest.mark.parametrize("fmt", ["semantic-kernel", "jinja2", "handlebars"])
async def test_nested_calls_and_the_outer_call_are_one_graph(service, fmt):
    plain = await combine(build_kernel(service.url, fmt, graphs=False))
    service.start_recording()
    steps = service.engine.num_steps
    graphed = await combine(build_kernel(service.url, fmt, graphs=True))
    graph_steps = service.engine.num_steps - steps
    assert graphed == plain
    [calls] = posted_graphs(service)  # one submission, one session
    *nested, outer = calls
    assert len(nested) == 3 and all(not inputs(c) for c in nested)
    assert inputs(outer) == [output(c) for c in nested]  # edges, in template order
    # The nested calls ran side by side: fewer engine steps than SK's one-by-one run takes.
    service.start_recording()
    steps = service.engine.num_steps
    await combine(build_kernel(service.url, fmt, graphs=False))
    assert graph_steps < 0.75 * (service.engine.num_steps - steps)


async def test_calls_nested_two_deep_form_a_deeper_graph(service):
    plain = await combine(build_kernel(service.url, graphs=False, depth=2))
    service.start_recording()
    graphed = await combine(build_kernel(service.url, graphs=True, depth=2))
    assert graphed == plain
    calls = [c for graph in posted_graphs(service) for c in graph]
    by_output = {output(c): c for c in calls}
    [outer] = [c for c in calls if len(inputs(c)) == 3]
    summaries = [by_output[var] for var in inputs(outer)]
    shortens = [by_output[inputs(s)[0]] for s in summaries]
    assert len(calls) == 7 and all(not inputs(c) for c in shortens)


async def test_a_native_function_reads_the_real_text(service):
    outer = "Counted: {{ words_count(text=writer_summarize(section=a)) }}. Say more."
    plain = await combine(build_kernel(service.url, "jinja2", graphs=False, outer=outer))
    service.start_recording()
    graphed = await combine(build_kernel(service.url, "jinja2", graphs=True, outer=outer))
    assert graphed == plain
    assert "⟦parrot:" not in str(posted_graphs(service))  # the count is of real words


async def test_the_answer_still_streams(service):
    kernel = build_kernel(service.url, graphs=True)
    expected = await combine(kernel)
    service.start_recording()
    chunks = [chunk async for chunk in kernel.invoke_stream(kernel.get_function("writer", "combine"),
                                                            KernelArguments(**SECTIONS))]
    texts = [str(c[0]) for c in chunks if isinstance(c, list) and c]
    assert len(texts) > 1 and "".join(texts) == expected
    [calls] = posted_graphs(service)
    assert len(calls) == 4 and len(inputs(calls[-1])) == 3


async def test_without_graphs_nothing_changes_and_sessions_close(service):
    kernel = build_kernel(service.url, graphs=False)
    service.start_recording()
    await combine(kernel)
    posts = [r.body for r in service.requests("POST", "/v1/graphs") if r.body["calls"]]
    assert len(posts) == 4 and len({p["session_id"] for p in posts}) == 4  # SK's way: one by one
    graphed = build_kernel(service.url, graphs=True)
    assert enable_graphs(graphed) is graphed and len(graphed.function_invocation_filters) == 1
    service.start_recording()
    await combine(graphed)
    assert service.sessions_opened() == 1 and service.wait_sessions_closed()


def test_a_reply_at_the_edge_of_stripped_text_is_stripped_there_too():
    scope = Placeholders()
    a, b = SemanticVariable(name="a"), SemanticVariable(name="b")
    pa, pb = scope.defer(a), scope.defer(b)
    edges = [Stripped(a, "start"), " and ", Stripped(b, "end")]
    assert scope.split(f"{pa} and {pb}", strip_edges=True) == edges
    assert scope.split(pa, strip_edges=True) == [Stripped(a, "both")]
    assert scope.split(f"x {pa} y", strip_edges=True) == ["x ", a, " y"]
    assert scope.split(f"{pa} and {pb}") == [a, " and ", b]
