"""ChatParrot on the real default model, in embedded mode (no base_url): the assertions the
tiny random model cannot meet, because they need a model that reads the prompt."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.tools import tool
from pydantic import BaseModel

from parrot import embedded
from parrot.integrations.langchain import ChatParrot

pytestmark = pytest.mark.e2e


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return "It's sunny."


class Pet(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def model() -> Iterator[ChatParrot]:
    try:
        yield ChatParrot(max_tokens=48)  # starts the embedded service on the default model
    finally:
        embedded.shutdown_embedded()  # free the model for the tests that follow


def test_embedded_default_model_answers(model):
    reply = model.invoke("Hi")
    assert reply.content and reply.response_metadata["model_name"] == "SmolLM2-135M-Instruct"


def test_tool_calls_carry_the_arguments_the_prompt_asks_for(model):
    forced = model.bind_tools([magic_function], tool_choice="any")
    reply = forced.invoke("What is the value of magic_function(3)? Use the tool.")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("magic_function", {"input": 3})]
    auto = model.bind_tools([get_weather]).invoke("What is the weather in San Francisco, CA?")
    [call] = auto.tool_calls
    assert call["name"] == "get_weather" and "San Francisco" in call["args"]["location"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_extracts_the_values(model, method):
    pet = model.with_structured_output(Pet, method=method).invoke("Tom is a 3 year old cat.")
    assert pet == Pet(name="Tom", age=3)
