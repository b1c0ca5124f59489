"""Tool calling through Parrot's OpenAI routes by the frameworks' own OpenAI connectors
(``langchain_openai.ChatOpenAI``, Semantic Kernel's ``OpenAIChatCompletion``), and
``ChatParrot``'s token counts through ``/tokenize``, on the integrations' live service."""

from __future__ import annotations

from typing import Literal

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.function_choice_behavior import FunctionChoiceBehavior
from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion, OpenAIChatPromptExecutionSettings
from semantic_kernel.functions import KernelArguments

from parrot.integrations.langchain import ChatParrot
from tests.integrations.semantic_kernel.plugins import MagicPlugin


@tool
def get_weather(city: Literal["Paris", "Lima"], days: int) -> str:
    """The weather forecast of a city for some days."""
    return f"sunny in {city} for {days} days"


def chat_openai(service, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{service.url}/v1", api_key="unused", model=service.model, temperature=0,
                      max_tokens=120, max_retries=0, **kwargs)


def test_chat_openai_bind_tools_gets_tool_calls(service):
    model = chat_openai(service).bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False)
    reply = model.invoke("What is the weather in Paris for two days?")
    assert isinstance(reply, AIMessage) and reply.response_metadata["finish_reason"] == "tool_calls"
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert call["args"]["city"] in ("Paris", "Lima") and isinstance(call["args"]["days"], int)
    streamed = None
    for chunk in model.stream("What is the weather in Paris for two days?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and [c["args"] for c in streamed.tool_calls] == [call["args"]]
    sent = [r.body for r in service.requests("POST", "/v1/chat/completions")]
    assert any(b.get("tool_choice") == "required" and b["tools"][0]["function"]["name"] == "get_weather"
               for b in sent)
    # The result goes back as a tool message; the model answers in text when told not to call.
    follow_up = chat_openai(service, max_completion_tokens=4).bind_tools([get_weather], tool_choice="none")
    answer = follow_up.invoke([HumanMessage("Weather in Paris?"), reply,
                               ToolMessage("sunny", tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and not answer.tool_calls


async def test_semantic_kernel_openai_connector_calls_a_kernel_function(service):
    kernel, plugin = Kernel(), MagicPlugin()
    kernel.add_service(OpenAIChatCompletion(
        ai_model_id=service.model, async_client=AsyncOpenAI(base_url=f"{service.url}/v1", api_key="unused")))
    kernel.add_plugin(plugin, plugin_name="magic")

    async def ask(behavior: FunctionChoiceBehavior, seed: int | None) -> str:
        # Greedy for the forced call (sampling at temperature 1 may wander with the cache state).
        settings = OpenAIChatPromptExecutionSettings(function_choice_behavior=behavior, max_tokens=64,
                                                     temperature=0.0 if seed is None else 1.0, seed=seed)
        result = await kernel.invoke_prompt("What is magic_function(3)?",
                                            arguments=KernelArguments(settings=settings))
        return str(result)

    await ask(FunctionChoiceBehavior.Required(), None)
    assert plugin.inputs and all(isinstance(i, int) for i in plugin.inputs)  # SK ran the function
    # (A request is recorded when it ends, so the previous test's last one may show up here too.)
    bodies = [r.body for r in service.requests("POST", "/v1/chat/completions")]
    assert any(b.get("tool_choice") == "required" for b in bodies)
    assert any(m["role"] == "tool" for b in bodies for m in b["messages"])  # the result went back
    # Auto: the model chooses; whatever it does, SK gets a well-formed reply (calls run, text returned).
    service.start_recording()
    before = len(plugin.inputs)
    for seed in range(3):
        await ask(FunctionChoiceBehavior.Auto(), seed)
    asked = [r.body for r in service.requests("POST", "/v1/chat/completions")]
    assert any(b.get("tool_choice") == "auto" and b["tools"][0]["function"]["name"] == "magic-magic_function"
               for b in asked)
    assert len(plugin.inputs) >= before


def test_chat_parrot_counts_tokens_through_the_service(service):
    model = ChatParrot(base_url=service.url)
    tokenizer = service.engine.tokenizer
    assert model.get_token_ids("Hello there") == tokenizer.encode("Hello there")
    assert model.get_num_tokens("Hello there") == len(tokenizer.encode("Hello there"))
    messages = [SystemMessage("Be brief."), HumanMessage("Hi")]
    expected = len(tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}]))
    assert model.get_num_tokens_from_messages(messages) == expected
    with_tools = model.get_num_tokens_from_messages(messages, tools=[get_weather])
    assert with_tools > expected
    # It is what a call costs: the prompt tokens the service reports for the same call.
    reply = model.bind_tools([get_weather]).invoke(messages, max_tokens=1)
    assert reply.usage_metadata["input_tokens"] == with_tools
