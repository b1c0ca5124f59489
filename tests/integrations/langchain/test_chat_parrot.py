"""ChatParrot against a live service on a tiny random-weight model: what reaches the service,
batches as one graph, streams, usage, tools, structured output, errors."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

import parrot as P
from parrot.chat_call import prepare_chat
from parrot.integrations.common.calls import prepare_completion, submit, wait
from parrot.integrations.langchain import ChatParrot
from parrot.integrations.langchain.messages import to_chat_messages
from parrot.schemas import SamplingConfig

CONVERSATION = [SystemMessage("You are terse."), HumanMessage("Hello"), AIMessage("Hi."),
                HumanMessage("Name three colors.")]


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


@tool
def set_level(level: Literal["low", "high"]) -> str:
    """Set the level."""
    return level


@tool
def pick_size(size: Literal["s", "m", "l"]) -> str:
    """Pick a size."""
    return size


class Choice(BaseModel):
    """A pick any model can finish: an enum and a bounded integer."""

    color: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=9)


def chat(service, **fields: Any) -> ChatParrot:
    return ChatParrot(base_url=service.url, **{"max_tokens": 12, **fields})


def graphs(service) -> list[dict]:
    return [r.body for r in service.requests("POST", "/v1/graphs")]


def joined(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts: list[dict] = []
        self.ends: list[str] = []
        self.errors: list[BaseException] = []

    def on_chat_model_start(self, serialized, messages, *, metadata=None, **kwargs) -> None:
        self.starts.append(metadata or {})

    def on_llm_end(self, response, **kwargs) -> None:
        self.ends.append(response.generations[0][0].text)

    def on_llm_error(self, error, **kwargs) -> None:
        self.errors.append(error)


# -- what reaches the service -------------------------------------------------------------------

def test_invoke_is_one_chat_call_in_its_own_session(service):
    reply = chat(service, temperature=0.0, top_k=5, seed=7).invoke(CONVERSATION, stop=["zz"])
    assert isinstance(reply, AIMessage) and reply.content
    [graph] = graphs(service)
    [call] = graph["calls"]
    assert [(m["role"], m["content"]) for m in call["messages"]] == [
        ("system", [{"type": "text", "text": "You are terse."}]),
        ("user", [{"type": "text", "text": "Hello"}]),
        ("assistant", [{"type": "text", "text": "Hi."}]),
        ("user", [{"type": "text", "text": "Name three colors."}])]
    sampling = call["output"]["sampling"]
    assert (sampling["max_tokens"], sampling["top_k"], sampling["seed"]) == (12, 5, 7)
    assert sampling["stop"] == ["zz"]
    assert service.wait_sessions_closed()
    deleted = service.requests("DELETE", "/v1/sessions/")
    assert service.sessions_opened() == 1 and len(deleted) == 1 and graph["session_id"] in deleted[0].path


def test_greedy_reply_equals_chat_openai_on_the_openai_route_token_for_token(service):
    parrot = chat(service, max_tokens=24).invoke(CONVERSATION)
    openai = ChatOpenAI(base_url=f"{service.url}/v1", api_key="none", model=service.model, temperature=0,
                        max_tokens=24, max_retries=0).invoke(CONVERSATION)
    assert parrot.content == openai.content
    assert parrot.usage_metadata["input_tokens"] == openai.usage_metadata["input_tokens"]
    assert parrot.usage_metadata["output_tokens"] == openai.usage_metadata["output_tokens"] == 24
    assert parrot.response_metadata["finish_reason"] == openai.response_metadata["finish_reason"] == "length"
    assert parrot.response_metadata["model_name"] == service.model


def test_usage_metadata_counts_the_prompt_the_reply_and_the_cached_prefix(service):
    model = chat(service, max_tokens=9)
    messages = [HumanMessage("Count the prompt tokens of this message, please.")]
    first, second = model.invoke(messages), model.invoke(messages)
    prompt = [{"role": "user", "content": messages[0].content}]
    prompt_len = len(service.engine.tokenizer.apply_chat_template(prompt))
    for reply in (first, second):
        usage = reply.usage_metadata
        assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
            prompt_len, 9, prompt_len + 9)
    assert second.content == first.content
    assert 0 < second.usage_metadata["input_token_details"]["cache_read"] < prompt_len


# -- batches --------------------------------------------------------------------------------------

def test_batch_is_one_graph_in_one_session_and_keeps_each_inputs_callbacks(service):
    model = chat(service)
    inputs = ["Hello", "Hey", [HumanMessage("Hi there")], "Hello"]
    expected = [model.invoke(i).content for i in inputs]
    service.start_recording()
    handler = Recorder()
    configs = [{"callbacks": [handler], "metadata": {"input": i}, "max_concurrency": 2} for i in range(4)]
    replies = model.batch(inputs, configs)
    assert [r.content for r in replies] == expected
    [graph] = graphs(service)
    assert len(graph["calls"]) == 4
    assert service.sessions_opened() == 1
    assert not service.requests("GET", "/v1/sessions/")  # the post brought every reply and its counts
    assert sorted(s["input"] for s in handler.starts) == [0, 1, 2, 3]  # one run per input, its own config
    assert sorted(handler.ends) == sorted(expected) and not handler.errors
    assert all(r.usage_metadata["output_tokens"] == 12 for r in replies)


async def test_abatch_is_one_graph_and_equals_ainvoke(service):
    model = chat(service)
    inputs = ["one", "two", "three"]
    expected = [(await model.ainvoke(i)).content for i in inputs]
    service.start_recording()
    replies = await model.abatch(inputs)
    assert [r.content for r in replies] == expected
    [graph] = graphs(service)
    assert len(graph["calls"]) == 3


def test_a_chain_batch_reaches_the_model_as_one_graph(service):
    chain = ChatPromptTemplate.from_messages([("human", "Tell me about {topic}")]) | chat(service)
    replies = chain.batch([{"topic": "cats"}, {"topic": "dogs"}, {"topic": "owls"}])
    assert len(replies) == 3 and all(r.content for r in replies)
    assert [len(g["calls"]) for g in graphs(service)] == [3]


def test_batch_with_a_bad_input_returns_its_error_and_runs_the_rest_together(service):
    model = chat(service)
    bad = [HumanMessage([{"type": "image", "url": "https://example.com/cat.png"}])]
    handler = Recorder()
    replies = model.batch(["a", bad, "b"], {"callbacks": [handler]}, return_exceptions=True)
    assert isinstance(replies[1], ValueError) and "'image' content block" in str(replies[1])
    assert isinstance(replies[0], AIMessage) and isinstance(replies[2], AIMessage)
    assert [len(g["calls"]) for g in graphs(service)] == [2]
    assert len(handler.errors) == 1 and len(handler.ends) == 2
    with pytest.raises(ValueError, match="image"):
        model.batch(["a", bad])


def test_batch_against_a_service_that_is_down_fails_each_input_clearly(closed_port_url):
    model = ChatParrot(base_url=closed_port_url, max_retries=0)
    started = time.monotonic()
    replies = model.batch(["a", "b"], return_exceptions=True)
    assert all(isinstance(r, P.ParrotError) and "cannot reach the Parrot service" in str(r) for r in replies)
    assert time.monotonic() - started < 10


# -- streaming --------------------------------------------------------------------------------------

def test_stream_chunks_join_to_the_invoke_reply(service):
    model = chat(service, max_tokens=64)
    reply = model.invoke("Tell me a story.")
    chunks = list(model.stream("Tell me a story."))
    assert len([c for c in chunks if c.content]) > 1  # token deltas, not one block
    full = joined(chunks)
    assert full.content == reply.content
    assert full.usage_metadata["output_tokens"] == reply.usage_metadata["output_tokens"] == 64
    assert full.usage_metadata["input_tokens"] == reply.usage_metadata["input_tokens"]
    assert chunks[-1].chunk_position == "last" and chunks[-1].response_metadata["finish_reason"] == "length"
    assert sum(1 for c in chunks if c.usage_metadata) == 1  # only the last chunk carries usage
    assert full.response_metadata["model_name"] == service.model


async def test_astream_chunks_join_to_the_ainvoke_reply(service):
    model = chat(service, max_tokens=32)
    reply = await model.ainvoke("Tell me a story.")
    chunks = [c async for c in model.astream("Tell me a story.")]
    assert joined(chunks).content == reply.content
    assert joined(chunks).usage_metadata == reply.usage_metadata


# -- tools -------------------------------------------------------------------------------------------

def test_a_forced_tool_call_follows_the_tools_schema(service):
    model = chat(service, max_tokens=32).bind_tools([magic_function, set_level], tool_choice="set_level")
    reply = model.invoke("Turn it up.")
    [call] = reply.tool_calls
    assert call["name"] == "set_level" and call["args"]["level"] in ("low", "high") and call["id"]
    [graph] = graphs(service)
    [decl] = graph["calls"]
    system = decl["messages"][0]
    assert system["role"] == "system"
    assert "magic_function: Apply a magic function" in system["content"][0]["text"]
    schema = decl["output"]["sampling"]["json_schema"]
    assert schema["properties"]["tool_calls"]["items"]["properties"]["name"] == {"const": "set_level"}
    # Streaming gives the same call, whole, in one chunk.
    [chunk] = [c for c in model.stream("Turn it up.") if c.tool_calls or c.content]
    assert [(c["name"], c["args"]) for c in chunk.tool_calls] == [(call["name"], call["args"])]


def test_tool_choice_any_auto_and_none(service):
    base = chat(service, max_tokens=32)
    # Tools whose arguments are enums: any model finishes these calls.
    any_reply = base.bind_tools([pick_size, set_level], tool_choice="any").invoke("Hi")
    assert len(any_reply.tool_calls) == 1 and any_reply.tool_calls[0]["name"] in ("pick_size", "set_level")
    auto_reply = base.bind_tools([set_level]).invoke("Hi")
    # The model picks a call or an answer; either way the message is well-formed.
    assert auto_reply.tool_calls or auto_reply.content or auto_reply.invalid_tool_calls
    none_reply = base.bind_tools([set_level], tool_choice="none").invoke("Hi")
    assert none_reply.content and not none_reply.tool_calls
    any_schema, auto_schema = (g["calls"][0]["output"]["sampling"]["json_schema"]
                               for g in graphs(service)[:2])
    assert len(any_schema["properties"]["tool_calls"]["items"]["anyOf"]) == 2
    assert auto_schema["anyOf"][-1]["required"] == ["content"]
    assert "json_schema" not in graphs(service)[2]["calls"][0]["output"]["sampling"]


def test_a_tool_call_cut_short_is_an_invalid_tool_call_not_an_exception(service):
    reply = chat(service, max_tokens=4).bind_tools([magic_function], tool_choice="any").invoke("Hi")
    assert not reply.tool_calls
    [invalid] = reply.invalid_tool_calls
    assert "not a complete tool call" in invalid["error"]
    assert reply.response_metadata["finish_reason"] == "length"


def test_tool_call_histories_are_sent_as_text(service):
    history = [HumanMessage("What is magic_function(3)?"),
               AIMessage("", tool_calls=[{"name": "magic_function", "args": {"input": 3}, "id": "c1"}]),
               ToolMessage("5", tool_call_id="c1", name="magic_function")]
    reply = chat(service).bind_tools([magic_function]).invoke(history)
    assert isinstance(reply, AIMessage)
    messages = graphs(service)[0]["calls"][0]["messages"]
    texts = [(m["role"], m["content"][0]["text"]) for m in messages[1:]]
    assert texts == [("user", "What is magic_function(3)?"),
                     ("assistant", '{"tool_calls": [{"name": "magic_function", "arguments": {"input": 3}}]}'),
                     ("user", "Tool magic_function returned: 5")]


def test_parallel_tool_calls_allow_several_calls_in_one_reply(service):
    model = chat(service, max_tokens=96).bind_tools([pick_size, set_level], tool_choice="any",
                                                    parallel_tool_calls=True)
    reply = model.invoke("Pick a size and set the level.")
    # The tiny model (greedy, so every run) writes several calls and ends the JSON itself.
    assert len(reply.tool_calls) >= 2 and not reply.invalid_tool_calls
    assert reply.response_metadata["finish_reason"] == "stop"
    assert all(c["name"] in ("pick_size", "set_level") for c in reply.tool_calls)
    assert len({c["id"] for c in reply.tool_calls}) == len(reply.tool_calls)
    streamed = joined(list(model.stream("Pick a size and set the level.")))
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"])
                                                                     for c in reply.tool_calls]
    calls = graphs(service)[0]["calls"][0]["output"]["sampling"]["json_schema"]["properties"]["tool_calls"]
    assert calls["minItems"] == 1 and "maxItems" not in calls
    # Off (the default, or False): at most one call.
    for off in ({}, {"parallel_tool_calls": False}):
        chat(service, max_tokens=32).bind_tools([pick_size], tool_choice="any", **off).invoke("Hi")
    for graph in graphs(service)[2:]:
        schema = graph["calls"][0]["output"]["sampling"]["json_schema"]
        assert schema["properties"]["tool_calls"]["maxItems"] == 1


def test_bad_tool_arguments_are_clear_errors(service):
    model = chat(service)
    with pytest.raises(ValueError, match="'nope' is not one of the bound tools"):
        model.bind_tools([magic_function], tool_choice="nope")
    with pytest.raises(ValueError, match="needs tools"):
        model.invoke("Hi", tool_choice="any")


# -- structured output -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_follows_the_schema(service, method):
    model = chat(service, max_tokens=48).with_structured_output(Choice, method=method)
    result = model.invoke("Pick a color and a count.")
    assert isinstance(result, Choice)
    as_dict = chat(service, max_tokens=48).with_structured_output(Choice.model_json_schema(), method=method)
    assert Choice.model_validate(as_dict.invoke("Pick a color and a count."))


def test_structured_output_include_raw_and_json_mode(service):
    raw = chat(service, max_tokens=48).with_structured_output(Choice, include_raw=True).invoke("Pick.")
    assert isinstance(raw["raw"], AIMessage) and isinstance(raw["parsed"], Choice)
    assert raw["parsing_error"] is None
    assert json.loads(raw["raw"].content) == raw["parsed"].model_dump()
    cut = chat(service, max_tokens=3).with_structured_output(Choice, include_raw=True).invoke("Pick.")
    assert cut["parsed"] is None and cut["parsing_error"] is not None
    assert cut["raw"].response_metadata["finish_reason"] == "length"
    obj = chat(service, max_tokens=48).with_structured_output(method="json_mode").invoke("Any JSON.")
    assert isinstance(obj, dict)
    assert graphs(service)[-1]["calls"][0]["output"]["sampling"]["json_schema"] == {"type": "object"}


# -- the functions a chain compiler reuses -----------------------------------------------------------

def test_a_chat_call_can_read_a_variable_another_call_of_the_session_produces(service):
    sampling = SamplingConfig(max_tokens=6)

    def split(text: str) -> list:
        head, _, tail = text.partition("<topic>")
        return [head, topic, tail] if _ else [text]

    with P.Parrot(service.url) as vm:
        first = prepare_completion("A topic:", sampling)
        topic = first.outputs[0]
        second = prepare_chat(to_chat_messages([HumanMessage("Tell me about <topic> now.")], split=split),
                              sampling=sampling)
        submit(vm, [first, second])  # one graph: the second waits for the first inside the service
        [picked, told] = wait(vm, [first, second], perf=P.LATENCY)
    [graph] = graphs(service)
    assert len(graph["calls"]) == 2
    direct = chat(service, max_tokens=6).invoke(f"Tell me about {picked.text} now.")
    assert told.text == direct.content


# -- errors ----------------------------------------------------------------------------------------

def test_unknown_model_names_it(service):
    with pytest.raises(P.ParrotError, match="does not serve model 'gpt-4o'.*tiny-llama"):
        chat(service, model="gpt-4o").invoke("Hi")
    assert chat(service, model=service.model).invoke("Hi").content


def test_a_service_that_is_down_is_a_clear_connection_error(closed_port_url):
    model = ChatParrot(base_url=closed_port_url, max_retries=1)
    started = time.monotonic()
    with pytest.raises(P.ParrotError, match=f"cannot reach the Parrot service at {closed_port_url}"):
        model.invoke("Hi")
    with pytest.raises(P.ParrotError, match="cannot reach"):
        asyncio.run(model.ainvoke("Hi"))
    with pytest.raises(P.ParrotError, match="cannot reach"):
        list(model.stream("Hi"))
    assert time.monotonic() - started < 10


def test_a_reply_that_takes_too_long_times_out(service):
    model = chat(service, max_tokens=2000, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(P.ParrotTimeoutError):
        model.invoke("Write a long story.")
    assert time.monotonic() - started < 5


def test_bad_input_is_a_clear_error(service):
    model = chat(service)
    with pytest.raises(ValueError, match="unsupported parameters for ChatParrot: frequency_penalty"):
        model.invoke("Hi", frequency_penalty=0.5)
    with pytest.raises(ValueError, match="invalid sampling parameters"):
        model.invoke("Hi", top_p=2.0)
    with pytest.raises(ValueError, match="'audio' content block"):
        model.invoke([HumanMessage([{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])])
    assert not graphs(service)  # nothing was sent
