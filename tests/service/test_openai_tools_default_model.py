"""Tool calling on the real default model through the OpenAI route: the arguments follow the
tool's schema and carry what the user asked for."""

from __future__ import annotations

import json

import openai
import pytest

from parrot import embedded
from tests.engine.test_json_schema import check

pytestmark = pytest.mark.e2e

PARAMS = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 20},
                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": PARAMS}}


def test_default_model_calls_a_tool_with_arguments_in_its_schema():
    try:
        client = openai.OpenAI(base_url=f"{embedded.embedded_url()}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, temperature=0, max_tokens=64, tools=[WEATHER],
            tool_choice="required", parallel_tool_calls=False,
            messages=[{"role": "user", "content": "What is the weather in Paris, in celsius?"}])
    finally:
        embedded.shutdown_embedded()  # free the model for the tests that follow
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    check(arguments, PARAMS)
    assert call.function.name == "get_weather" and "paris" in arguments["city"].lower()
