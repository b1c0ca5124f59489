"""A real uvicorn server on a free loopback port, serving a tiny random-weight llama."""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import openai
import pytest

from parrot.service.app import create_app
from parrot.service.engine.builtin.engine import BuiltinEngine


@dataclass
class LiveServer:
    base_url: str
    engine: BuiltinEngine
    hf_model: object  # the transformers model the engine was built from

    @property
    def model(self) -> str:
        return self.engine.model_name

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0,
                             timeout=30)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0,
                                  timeout=30)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)


@pytest.fixture
def live_server_factory(tiny_engine_factory, serve_app):
    """Start servers on tiny engines; keyword arguments go to the engine config."""
    with ExitStack() as servers:

        def start(**engine_config) -> LiveServer:
            engine, hf_model = tiny_engine_factory(**engine_config)
            base_url = servers.enter_context(serve_app(create_app(engine)))
            return LiveServer(base_url, engine, hf_model)

        yield start


@pytest.fixture
def live_server(live_server_factory) -> LiveServer:
    return live_server_factory()


def read_metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            got = ",".join(sorted(filter(None, (m.group(2) or "").split(","))))
            if got == want:
                return float(m.group(3))
    return 0.0


@pytest.fixture
def metric():
    """``metric(text, name, **labels)``: read one sample from a /metrics page."""
    return read_metric

