"""A real uvicorn server on a free loopback port, serving a tiny random-weight llama."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from parrot.service.app import create_app
from parrot.service.engine.builtin.engine import BuiltinEngine
from tests.conftest import make_tiny_model
from tests.service.engine.sglang_standin import Received, create_sglang_standin


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
    """The sum of the samples of ``name`` whose labels include ``labels``, in Prometheus text
    format (0 when none): labels not named are summed over."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name and want <= set(filter(None, (m.group(2) or "").split(","))):
            total += float(m.group(3))
    return total


@pytest.fixture
def metric():
    """``metric(text, name, **labels)``: read one sample from a /metrics page."""
    return read_metric



@dataclass
class Upstream:
    """A second, real ``parrot serve`` process on loopback, serving ``tiny-llama`` (the same
    weights and name as ``tiny_engine_factory``'s engines)."""

    url: str  # the server root; the API is under /v1
    model: str
    folder: Path  # the model it serves (weights and tokenizer files)

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    async def completion(self, prompt: list[int], **params: Any) -> dict:
        """The server's own (non-streamed) answer to a greedy completion."""
        async with httpx.AsyncClient(base_url=self.api, timeout=60) as http:
            r = await http.post("/completions", json={"prompt": prompt, "temperature": 0, **params})
        assert r.status_code == 200, r.text
        return r.json()

    def metric(self, name: str, **labels: str) -> float:
        return read_metric(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)


def wait_for_http(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 120) -> None:
    """Wait until ``url`` answers 200, or fail with the end of the process's log."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} did not come up:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def parrot_serve(tokenizer, folder: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``parrot serve`` process on loopback serving a tiny random llama saved in
    ``folder`` (named after the folder), with extra CLI ``args``: (its URL, the process)."""
    make_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    log_path = folder / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parrot.service", "serve", "--model", str(folder), "--port", str(port),
             "--device", "cpu", "--threads", "1", "--log-level", "warning", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", proc, log_path)
        yield url, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def upstream(tokenizer, tmp_path_factory) -> Iterator[Upstream]:
    folder = tmp_path_factory.mktemp("upstream") / "tiny-llama"
    with parrot_serve(tokenizer, folder, "--kv-cache-gib", "0.05") as (url, _):
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        yield Upstream(url, model, folder)


@dataclass
class StandIn:
    url: str
    app: FastAPI
    engine: BuiltinEngine

    def received(self, path: str) -> list[Received]:
        return [r for r in self.app.state.requests if r.path == path]

    def generate_bodies(self) -> list[dict[str, Any]]:
        return [r.body for r in self.received("/generate")]


@pytest.fixture
def standin(tiny_engine_factory, serve_app) -> Iterator[Any]:
    """``standin(engine=None, **options)``: a stand-in SGLang server on a loopback port, serving
    ``engine`` or a new tiny builtin engine."""
    built: list[BuiltinEngine] = []
    with ExitStack() as servers:

        def start(engine: BuiltinEngine | None = None, **options: Any) -> StandIn:
            if engine is None:
                engine, _ = tiny_engine_factory()
                built.append(engine)
            app = create_sglang_standin(engine, **options)
            return StandIn(servers.enter_context(serve_app(app)), app, engine)

        yield start
    for engine in built:
        asyncio.run(engine.shutdown())
