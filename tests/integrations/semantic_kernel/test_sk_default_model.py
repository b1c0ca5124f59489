"""ParrotChatCompletion on the real default model, in embedded mode (no base_url): function calling
and structured output, which need a model that reads the prompt."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import BaseModel
from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.function_choice_behavior import FunctionChoiceBehavior
from semantic_kernel.contents import ChatHistory, FunctionCallContent
from semantic_kernel.functions import KernelArguments

from parrot import embedded
from parrot.integrations.semantic_kernel import ParrotChatCompletion, ParrotPromptExecutionSettings
from tests.integrations.semantic_kernel.plugins import MagicPlugin

pytestmark = pytest.mark.e2e




class Pet(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def connector() -> Iterator[ParrotChatCompletion]:
    try:
        yield ParrotChatCompletion()  # starts the embedded service on the default model
    finally:
        embedded.shutdown_embedded()  # free the model for the tests that follow


@pytest.fixture
def kernel(connector: ParrotChatCompletion) -> tuple[Kernel, MagicPlugin]:
    kernel, plugin = Kernel(), MagicPlugin()
    kernel.add_service(connector)
    kernel.add_plugin(plugin, "math")
    return kernel, plugin


# Auto may call again after a result; two rounds at most keep the test short.
@pytest.mark.parametrize("behavior", [FunctionChoiceBehavior.Required(),
                                      FunctionChoiceBehavior.Auto(maximum_auto_invoke_attempts=2)],
                         ids=["required", "auto"])
async def test_function_calling_runs_the_kernel_function(connector: ParrotChatCompletion,
                                                         kernel: tuple[Kernel, MagicPlugin],
                                                         behavior: FunctionChoiceBehavior) -> None:
    sk, plugin = kernel
    chat = ChatHistory()
    chat.add_user_message("What is magic_function(3)?")
    settings = ParrotPromptExecutionSettings(max_tokens=48, function_choice_behavior=behavior)
    answer = await connector.get_chat_message_content(chat, settings, kernel=sk)
    assert plugin.inputs and set(plugin.inputs) == {3}  # called with the argument the prompt asks for
    [call] = [item for item in chat.messages[1].items if isinstance(item, FunctionCallContent)]
    assert (call.plugin_name, call.function_name) == ("math", "magic_function")
    assert answer is not None and answer.content and answer.ai_model_id == "SmolLM2-135M-Instruct"


async def test_structured_output_parses_into_the_model(kernel: tuple[Kernel, MagicPlugin]) -> None:
    sk, _ = kernel
    settings = ParrotPromptExecutionSettings(max_tokens=48, response_format=Pet)
    result = await sk.invoke_prompt("Tom is a 3 year old cat.", arguments=KernelArguments(settings=settings))
    assert Pet.model_validate_json(str(result)) == Pet(name="Tom", age=3)
