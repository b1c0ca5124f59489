"""ParrotChatCompletion and ParrotTextCompletion: settings, the native calls they build, and their
replies on a live service with a tiny random-weight llama, compared with SK's own OpenAI
connector on the same service's OpenAI routes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import reduce
from typing import Any

import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, TypeAdapter
from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.function_choice_behavior import FunctionChoiceBehavior
from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion, OpenAIChatPromptExecutionSettings
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.contents import (
    AuthorRole,
    ChatHistory,
    ChatMessageContent,
    FinishReason,
    FunctionCallContent,
    FunctionResultContent,
    ImageContent,
    TextContent,
)
from semantic_kernel.exceptions import (
    ServiceInvalidExecutionSettingsError,
    ServiceInvalidRequestError,
    ServiceResponseException,
)
from semantic_kernel.functions import KernelArguments

import parrot as P
from parrot.integrations.common.calls import CallOutcome
from parrot.integrations.common.placeholders import Placeholders
from parrot.integrations.semantic_kernel import (
    ParrotChatCompletion,
    ParrotPromptExecutionSettings,
    ParrotTextCompletion,
)
from parrot.integrations.semantic_kernel.chat_completion import reply_contents
from parrot.integrations.semantic_kernel.connector import UNKNOWN_MODEL_ID
from parrot.integrations.semantic_kernel.scope import GraphScope, graph_scope
from parrot.integrations.semantic_kernel.settings import sampling_config, tool_use
from parrot.schemas import InputSegment, OutputSegment, SamplingConfig, TextSegment
from parrot.variable import SemanticVariable
from tests.integrations.semantic_kernel.plugins import MagicPlugin

MODEL = "tiny-llama"
GREEDY = {"temperature": 0.0, "max_tokens": 12}


class Pet(BaseModel):
    name: str
    age: int


class Point(BaseModel):  # numbers only: the tiny model never ends a JSON string
    x: int
    y: int


@dataclass
class Size:
    width: int








@pytest.fixture
def chat(service_url: str) -> ParrotChatCompletion:
    return ParrotChatCompletion(base_url=service_url)


@pytest.fixture
def openai_chat(service_url: str) -> OpenAIChatCompletion:
    client = AsyncOpenAI(base_url=f"{service_url}/v1", api_key="unused")
    return OpenAIChatCompletion(ai_model_id=MODEL, async_client=client)


def history(*turns: tuple[str, str]) -> ChatHistory:
    messages = [ChatMessageContent(role=AuthorRole(role), content=text) for role, text in turns]
    return ChatHistory(messages=messages)


def texts(call: Any) -> list[str]:
    """Each message of a prepared chat call as text (inputs as ``<var id>``)."""
    return ["".join(s.text if isinstance(s, TextSegment) else f"<{s.var}>" for s in m.content)
            for m in call.decl.messages]


def magic_tools(choice: str) -> ParrotPromptExecutionSettings:
    parameters = {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]}
    tool = {"type": "function", "function": {
        "name": "math-magic_function", "description": "Apply a magic function to an input.",
        "parameters": parameters}}
    return ParrotPromptExecutionSettings(tools=[tool], tool_choice=choice)


# -- settings --------------------------------------------------------------------------------------

def test_settings_map_to_the_native_sampling() -> None:
    fields = {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 4, "seed": 3}
    settings = ParrotPromptExecutionSettings(**fields, stop="\n")
    assert sampling_config(settings) == SamplingConfig(**fields, stop=["\n"])
    # Greedy and the service's length by default.
    assert sampling_config(ParrotPromptExecutionSettings()) == SamplingConfig()


def test_other_connectors_settings_convert(chat: ParrotChatCompletion) -> None:
    generic = PromptExecutionSettings(max_tokens=5, stop=["."])
    assert sampling_config(chat.get_prompt_execution_settings_from_settings(generic)) == SamplingConfig(
        max_tokens=5, stop=["."])
    openai = OpenAIChatPromptExecutionSettings(max_completion_tokens=9, temperature=0, response_format=Point)
    assert sampling_config(chat.get_prompt_execution_settings_from_settings(openai)) == SamplingConfig(
        max_tokens=9, json_schema={**Point.model_json_schema(), "additionalProperties": False})


@pytest.mark.parametrize(("response_format", "schema"), [
    (Pet, {**Pet.model_json_schema(), "additionalProperties": False}),
    (Size, {**TypeAdapter(Size).json_schema(), "additionalProperties": False}),
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "pet", "schema": {"type": "array"}}}, {"type": "array"}),
    ({"type": "object", "properties": {"n": {"type": "integer"}}},
     {"type": "object", "properties": {"n": {"type": "integer"}}}),
])
def test_response_format_becomes_the_json_schema(response_format: Any, schema: dict[str, Any]) -> None:
    settings = ParrotPromptExecutionSettings(response_format=response_format)
    assert sampling_config(settings).json_schema == schema


@pytest.mark.parametrize(("settings", "problem"), [
    (ParrotPromptExecutionSettings(frequency_penalty=0.5), "unsupported settings .*frequency_penalty"),
    (ParrotPromptExecutionSettings(number_of_responses=2), "number_of_responses=2"),
    (ParrotPromptExecutionSettings(response_format={"type": "xml"}), "type 'xml' is not supported"),
    (magic_tools("auto").model_copy(update={"response_format": Pet}), "function calling and response_format"),
    (magic_tools("auto").model_copy(update={"tools": (magic_tools("auto").tools or []) * 2}),
     "tool names must be unique"),
])
def test_unsupported_settings_are_refused(settings: ParrotPromptExecutionSettings, problem: str) -> None:
    with pytest.raises(ServiceInvalidExecutionSettingsError, match=problem):
        sampling_config(settings)


# -- connection and replies ------------------------------------------------------------------------

def test_connection_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARROT_BASE_URL", "http://parrot.test:8000/")
    monkeypatch.setenv("PARROT_API_KEY", "secret")
    chat = ParrotChatCompletion()
    assert (chat.base_url, chat.service_url()) == ("http://parrot.test:8000",) * 2
    assert chat.api_key is not None and chat.api_key.get_secret_value() == "secret"
    assert (chat.ai_model_id, chat.service_id) == (UNKNOWN_MODEL_ID, "parrot")  # until the service says
    named = ParrotTextCompletion(ai_model_id="tiny-llama", base_url="http://elsewhere:1")
    assert (named.ai_model_id, named.service_id, named.base_url) == ("tiny-llama", "tiny-llama", "http://elsewhere:1")


async def test_the_model_name_is_learned_from_the_service(chat: ParrotChatCompletion) -> None:
    assert chat.ai_model_id == UNKNOWN_MODEL_ID
    settings = ParrotPromptExecutionSettings(**GREEDY)
    [reply] = await chat.get_chat_message_contents(history(("user", "Hi")), settings)
    assert reply.ai_model_id == chat.ai_model_id == MODEL


@pytest.mark.parametrize(("text", "finish", "expected"), [
    ('{"tool_calls": [{"name": "math-magic_function", "arguments": {"input": 3}}]}', "stop",
     (("math", "magic_function", '{"input": 3}'), FinishReason.TOOL_CALLS)),
    ('{"content": "It is 5."}', "stop", ("It is 5.", FinishReason.STOP)),
    ('{"content": "It is', "length", ("It is", FinishReason.LENGTH)),  # cut short: what there is
    ('{"tool_calls": [{"name": "math-magic_fun', "length",
     ('{"tool_calls": [{"name": "math-magic_fun', FinishReason.LENGTH)),
    # A name the tools do not have is no call: the text as it is.
    ('{"tool_calls": [{"name": "math-other", "arguments": {}}]}', "stop",
     ('{"tool_calls": [{"name": "math-other", "arguments": {}}]}', FinishReason.STOP)),
])
def test_constrained_replies_become_function_calls_or_text(text: str, finish: str, expected: Any) -> None:
    tools = tool_use(magic_tools("auto"))
    assert tools is not None and tool_use(magic_tools("none")) is None
    outcome = CallOutcome(text=text, prompt_tokens=9, output_tokens=7, cached_tokens=0, finish_reason=finish)
    [item], finish_reason = reply_contents(outcome, MODEL, tools)
    if isinstance(item, FunctionCallContent):
        assert (item.plugin_name, item.function_name, item.arguments) == expected[0]
        assert item.id and item.id.startswith("call_")
    else:
        assert isinstance(item, TextContent) and item.text == expected[0]
    assert finish_reason == expected[1]


# -- the native calls ------------------------------------------------------------------------------

def test_tool_calls_and_results_are_written_as_text(chat: ParrotChatCompletion) -> None:
    chat_history = history(("system", "Be brief."), ("user", "magic_function(3)?"))
    chat_history.add_message(ChatMessageContent(role=AuthorRole.ASSISTANT, items=[
        FunctionCallContent(id="call_1", name="math-magic_function", arguments='{"input": 3}')]))
    chat_history.add_message(ChatMessageContent(role=AuthorRole.TOOL, items=[
        FunctionResultContent(id="call_1", name="math-magic_function", result=5)]))
    call = chat.prepare_chat_call(chat_history, ParrotPromptExecutionSettings())
    assert [m.role for m in call.decl.messages] == ["system", "user", "assistant", "user"]
    assert texts(call)[2:] == ['{"tool_calls": [{"name": "math-magic_function", "arguments": {"input": 3}}]}',
                               "Tool math-magic_function returned: 5"]


@pytest.mark.parametrize("choice", ["auto", "required", "none"])
def test_tools_are_described_and_constrain_the_reply(chat: ParrotChatCompletion, choice: str) -> None:
    call = chat.prepare_chat_call(history(("system", "Be brief."), ("user", "Hi")), magic_tools(choice))
    system = texts(call)[0]
    assert system.startswith("Be brief.\n\nYou can call these tools:\n- math-magic_function: Apply a magic")
    schema = call.decl.output.sampling.json_schema
    if choice == "none":
        assert schema is None and system.endswith("Do not call a tool now: answer in plain text.")
        return
    shapes = schema["anyOf"] if choice == "auto" else [schema]
    calls = shapes[0]["properties"]["tool_calls"]
    assert (calls["minItems"], calls["maxItems"]) == (1, 1)  # one call per reply
    assert calls["items"]["properties"]["name"] == {"const": "math-magic_function"}
    assert calls["items"]["properties"]["arguments"]["additionalProperties"] is False
    assert [list(s["properties"]) for s in shapes[1:]] == ([["content"]] if choice == "auto" else [])
    assert system.endswith("You must call a tool." if choice == "required" else
                           'To answer without a tool, reply with only {"content": <your answer>}.')


def test_placeholders_become_inputs(chat: ParrotChatCompletion, service_url: str) -> None:
    placeholders = Placeholders()
    summary = SemanticVariable(name="summary")
    known, stranger = placeholders.defer(summary), f"⟦parrot:{'0' * 32}⟧"
    call = chat.prepare_chat_call(history(("user", f"Improve {known} but keep {stranger}.")),
                                  ParrotPromptExecutionSettings(), placeholders)
    [message] = call.decl.messages
    assert message.content == [TextSegment(text="Improve "), InputSegment(var=summary.id),
                               TextSegment(text=f" but keep {stranger}.")]
    assert call.inputs == [summary]
    text_call = ParrotTextCompletion(base_url=service_url).prepare_text_call(
        f"Improve {known}:", ParrotPromptExecutionSettings(max_tokens=4), placeholders)
    segments = text_call.decl.segments
    assert segments[:3] == [TextSegment(text="Improve "), InputSegment(var=summary.id), TextSegment(text=":")]
    assert isinstance(segments[3], OutputSegment) and segments[3].sampling.max_tokens == 4


async def test_images_are_refused_before_anything_is_sent(closed_url: str) -> None:
    chat_history = ChatHistory(messages=[ChatMessageContent(role=AuthorRole.USER, items=[
        TextContent(text="What is this?"), ImageContent(uri="https://example.com/cat.png")])])
    refusal = r"message 0 \(user\) has an item of type ImageContent"
    with pytest.raises(ServiceInvalidRequestError, match=refusal):
        await ParrotChatCompletion(base_url=closed_url).get_chat_message_contents(
            chat_history, ParrotPromptExecutionSettings())


# -- replies, next to SK's OpenAI connector ----------------------------------------------------------

async def test_greedy_reply_equals_the_openai_connectors(chat: ParrotChatCompletion,
                                                         openai_chat: OpenAIChatCompletion) -> None:
    chat_history = history(("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."),
                           ("user", "Name three colors."))
    [ours] = await chat.get_chat_message_contents(chat_history, ParrotPromptExecutionSettings(**GREEDY))
    [theirs] = await openai_chat.get_chat_message_contents(chat_history,
                                                           OpenAIChatPromptExecutionSettings(**GREEDY))
    assert ours.content == theirs.content and ours.content
    assert ours.finish_reason == theirs.finish_reason
    assert ours.ai_model_id == theirs.ai_model_id == MODEL
    usage, their_usage = ours.metadata["usage"], theirs.metadata["usage"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (their_usage.prompt_tokens,
                                                              their_usage.completion_tokens)


async def test_one_line_swap_gives_the_same_output(service_url: str,
                                                   openai_chat: OpenAIChatCompletion) -> None:
    outputs = []
    for service in (openai_chat, ParrotChatCompletion(base_url=service_url)):
        kernel = Kernel()
        kernel.add_service(service)  # the one line that differs
        function = kernel.add_function(plugin_name="writer", function_name="title",
                                       prompt="A title for {{$topic}}:",
                                       prompt_execution_settings=PromptExecutionSettings(**GREEDY))
        arguments = KernelArguments(topic="a talking parrot")
        result = await kernel.invoke(function, arguments)
        streamed = [str(c[0]) async for c in kernel.invoke_stream(function, arguments)]
        outputs.append((str(result), "".join(streamed)))
    assert outputs[0] == outputs[1] and outputs[0][0] == outputs[0][1] != ""


async def test_a_repeated_prompt_reads_the_prefix_cache(chat: ParrotChatCompletion) -> None:
    chat_history = history(("user", f"Parrot keeps finished prompts in its prefix cache. {time.time()} " * 4))
    settings = ParrotPromptExecutionSettings(max_tokens=2)
    [first] = await chat.get_chat_message_contents(chat_history, settings)
    [again] = await chat.get_chat_message_contents(chat_history, settings)
    usage, usage_again = first.metadata["usage"], again.metadata["usage"]
    assert usage.prompt_tokens == usage_again.prompt_tokens > 40
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached < usage.prompt_tokens // 2 <= usage_again.prompt_tokens_details.cached_tokens


async def test_text_stream_joins_to_the_completion(service_url: str) -> None:
    text = ParrotTextCompletion(base_url=service_url)
    settings = ParrotPromptExecutionSettings(**GREEDY)
    [whole] = await text.get_text_contents("Once upon a time", settings)
    chunks = [c[0] async for c in text.get_streaming_text_contents("Once upon a time", settings)]
    assert {c.choice_index for c in chunks} == {0} and {c.ai_model_id for c in chunks} == {MODEL}
    assert str(reduce(lambda a, b: a + b, chunks)) == whole.text != ""
    assert chunks[-1].metadata["usage"].completion_tokens == whole.metadata["usage"].completion_tokens == 12


async def test_escaped_prompt_streams_as_it_completes(service_url: str) -> None:
    text = ParrotTextCompletion(base_url=service_url)
    kernel = Kernel()
    kernel.add_service(text)
    function = kernel.add_function(plugin_name="q", function_name="quote", prompt="Quote: {{$input}}",
                                   prompt_execution_settings=PromptExecutionSettings(**GREEDY))
    arguments = KernelArguments(input='a <b> & "c"')
    result = await kernel.invoke(function, arguments)
    assert result is not None and "&lt;b&gt;" in (result.rendered_prompt or "")  # SK escaped the value
    streamed = "".join([str(c[0]) async for c in kernel.invoke_stream(function, arguments)])
    [direct] = await text.get_text_contents('Quote: a <b> & "c"', ParrotPromptExecutionSettings(**GREEDY))
    assert streamed == str(result) == direct.text != ""


# -- function calling and structured output (the tiny model: valid shapes, arbitrary values) --------

async def test_required_function_call_runs_the_kernel_function(chat: ParrotChatCompletion) -> None:
    kernel, plugin = Kernel(), MagicPlugin()
    kernel.add_plugin(plugin, "math")
    chat_history = history(("user", "What is magic_function(3)?"))
    behavior = FunctionChoiceBehavior.Required()
    settings = ParrotPromptExecutionSettings(max_tokens=48, function_choice_behavior=behavior)
    reply = await chat.get_chat_message_content(chat_history, settings, kernel=kernel)
    assert len(plugin.inputs) == 1 and isinstance(plugin.inputs[0], int)
    call, result = chat_history.messages[1].items[0], chat_history.messages[2].items[0]
    assert isinstance(call, FunctionCallContent) and isinstance(result, FunctionResultContent)
    assert (call.plugin_name, call.function_name, result.id) == ("math", "magic_function", call.id)
    assert result.result == plugin.inputs[0] + 2
    assert reply is not None and reply.content  # the last request offers no tools: a text answer


async def test_streamed_auto_function_call_runs_the_kernel_function(chat: ParrotChatCompletion) -> None:
    kernel, plugin = Kernel(), MagicPlugin()
    kernel.add_plugin(plugin, "math")
    behavior = FunctionChoiceBehavior.Auto(maximum_auto_invoke_attempts=1)
    settings = ParrotPromptExecutionSettings(max_tokens=48, function_choice_behavior=behavior)
    items = []
    # With this prompt the tiny model calls the function (greedy, so every run does); with others
    # it answers, which auto allows.
    chat_history = history(("user", "Use the tool."))
    async for batch in chat.get_streaming_chat_message_contents(chat_history, settings, kernel=kernel):
        items += [item for message in batch for item in message.items]
    # The call's result is streamed back.
    calls = [i for i in items if isinstance(i, FunctionCallContent)]
    results = [i for i in items if isinstance(i, FunctionResultContent)]
    assert len(calls) == len(results) == len(plugin.inputs) == 1
    assert results[0].id == calls[0].id and results[0].result == plugin.inputs[0] + 2


async def test_structured_output_follows_the_schema(chat: ParrotChatCompletion) -> None:
    settings = ParrotPromptExecutionSettings(max_tokens=48, response_format=Point)
    reply = await chat.get_chat_message_content(history(("user", "A point, please.")), settings)
    assert reply is not None
    assert isinstance(Point.model_validate_json(reply.content), Point)


# -- errors ----------------------------------------------------------------------------------------

async def test_a_service_that_is_down_fails_fast_and_says_so(closed_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceResponseException, match=f"cannot reach the Parrot service at {closed_url}"):
        await ParrotChatCompletion(base_url=closed_url).get_chat_message_contents(history(("user", "Hi")),
                                                                                  ParrotPromptExecutionSettings())
    assert time.monotonic() - started < 5  # two retries with a short backoff


async def test_an_unknown_model_is_named(service_url: str) -> None:
    chat = ParrotChatCompletion(base_url=service_url, ai_model_id="no-such-model")
    with pytest.raises(ServiceResponseException, match="does not serve model 'no-such-model'"):
        await chat.get_chat_message_contents(history(("user", "Hi")), ParrotPromptExecutionSettings())


# -- graph scopes ------------------------------------------------------------------------------------

async def test_in_a_graph_scope_calls_join_its_session(chat: ParrotChatCompletion, service_url: str) -> None:
    settings = ParrotPromptExecutionSettings(max_tokens=6)
    text = ParrotTextCompletion(base_url=service_url)
    async with P.Parrot(service_url) as vm:
        first = chat.prepare_chat_call(history(("user", "Say something.")), settings)
        vm.submit(first.decl, first.inputs, first.outputs)
        placeholders = Placeholders()
        marker = placeholders.defer(first.outputs[0])
        with graph_scope(GraphScope(vm, MODEL, chat.base_url, placeholders)):
            [reply] = await chat.get_chat_message_contents(history(("user", f"Repeat: {marker}")), settings)
            [completion] = await text.get_text_contents(f"Repeat: {marker}", settings)
        with graph_scope(GraphScope(vm, MODEL, "http://another.service:8000", placeholders)):
            [elsewhere] = await chat.get_chat_message_contents(history(("user", "Hi")), settings)
        value = await first.outputs[0].aget()
        graph = await vm.agraph()
    # The two calls made in the scope read the first call's reply: edges of the session's graph.
    # The call for another service went to a session of its own.
    assert len(graph.calls) == 3 and completion.text
    assert [(e.source, e.var) for e in graph.edges] == [(first.decl.id, first.outputs[0].id)] * 2
    [direct] = await chat.get_chat_message_contents(history(("user", f"Repeat: {value}")), settings)
    assert reply.content == direct.content  # a chat call renders its messages' final text
    assert reply.ai_model_id == elsewhere.ai_model_id == MODEL
