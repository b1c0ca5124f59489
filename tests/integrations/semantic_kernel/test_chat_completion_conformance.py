"""The SK chat connector conformance suite (``conformance.py``) on a live Parrot service with a
tiny random-weight llama: for ``ParrotChatCompletion``, and for SK's own ``OpenAIChatCompletion``
on the service's OpenAI routes, which shows the suite asks only what any SK connector does."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from openai import AsyncOpenAI
from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion

from parrot.integrations.semantic_kernel import ParrotChatCompletion
from parrot.service.app import create_app
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
from tests.conftest import make_tiny_model, serve_in_thread
from tests.integrations.semantic_kernel.conformance import ChatCompletionConformance

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def service_url(tokenizer) -> Iterator[str]:
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.05),
                           hf_model=make_tiny_model(len(tokenizer)), tokenizer=tokenizer, model_name=MODEL)
    with serve_in_thread(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def closed_url() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


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
