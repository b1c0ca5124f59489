"""Shared fixtures: tiny random-weight llama models that use the default model's tokenizer."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import uvicorn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from parrot.service.engine.base import GenerateRequest
from parrot.service.engine.builtin import loader
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model converted from its shipped GGUF (once per machine, then cached)."""
    return loader.resolve_model(None)[1]


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return loader.load_tokenizer(default_model_dir)


def make_tiny_model(vocab_size: int, *, num_kv_heads: int = 2, arch: str = "llama", seed: int = 0):
    """A 2-layer model with random weights. Large init keeps next-token distributions peaked,
    so greedy decoding has clear winners and backends can be compared token for token."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=2048,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.eval()


@pytest.fixture
def tiny_engine_factory(tokenizer):
    """Build a BuiltinEngine on a tiny model; returns (engine, hf_model)."""

    def build(num_kv_heads: int = 2, arch: str = "llama", **config) -> tuple[BuiltinEngine, object]:
        hf = make_tiny_model(len(tokenizer), num_kv_heads=num_kv_heads, arch=arch)
        cfg = BuiltinEngineConfig(device="cpu", **{"kv_cache_gib": 0.05, **config})
        return BuiltinEngine(cfg, hf_model=hf, tokenizer=tokenizer, model_name="tiny-llama"), hf

    return build


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yield its base URL.

    ``app`` may also be a function of the base URL that returns the app (an app that
    must know its own address, like an engine process registering with a service)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # NODELAY: embedded.py
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    if inspect.isfunction(app):
        app = app(f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                          timeout_keep_alive=75))  # as parrot serve: pooled clients
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def serve_app():
    """``serve_app(app)``: a context manager serving any app on a free loopback port."""
    return serve_in_thread


async def run_request(engine, ids, sampling, request_id=None):
    """Collect a request's stream on ``engine``: (token ids, text, final output)."""
    rid = request_id or engine.new_request_id()
    tokens, text, last = [], "", None
    async for out in engine.generate(GenerateRequest(rid, list(ids), sampling)):
        tokens += out.token_ids
        text += out.text
        last = out
    return tokens, text, last


def run_under_triton_interpreter(test_file: str, keyword: str) -> str:
    """Run the tests of ``test_file`` selected by ``keyword`` in a child pytest with
    ``TRITON_INTERPRET=1`` (Triton reads it once, at import, so the parent process cannot
    switch); fail with the child's output unless it passed; return its summary line."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-k", keyword,
         test_file],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
