"""The SK chat connector conformance suite (``conformance.py``) on a live Parrot service with a
tiny random-weight llama: for ``ParrotChatCompletion``, and for SK's own ``OpenAIChatCompletion``
on the service's OpenAI routes, which shows the suite asks only what any SK connector does."""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI
from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion

from parrot.integrations.semantic_kernel import ParrotChatCompletion
from tests.integrations.semantic_kernel.conformance import ChatCompletionConformance

MODEL = "tiny-llama"






class TestParrotChatCompletion(ChatCompletionConformance):
    @pytest.fixture
    def connector(self, service_url: str) -> ParrotChatCompletion:
        return ParrotChatCompletion(base_url=service_url)

    @pytest.fixture
    def unreachable_connector(self, closed_url: str) -> ParrotChatCompletion:
        return ParrotChatCompletion(base_url=closed_url, max_retries=0)


class TestOpenAIChatCompletion(ChatCompletionConformance):
    @pytest.fixture
    def connector(self, service_url: str) -> OpenAIChatCompletion:
        return OpenAIChatCompletion(ai_model_id=MODEL,
                                    async_client=AsyncOpenAI(base_url=f"{service_url}/v1", api_key="unused"))

    @pytest.fixture
    def unreachable_connector(self, closed_url: str) -> OpenAIChatCompletion:
        client = AsyncOpenAI(base_url=f"{closed_url}/v1", api_key="unused", max_retries=0)
        return OpenAIChatCompletion(ai_model_id=MODEL, async_client=client)
