"""End to end on the real default model (SmolLM2-135M-Instruct from its shipped GGUF)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from parrot.service.engine.base import GenerateRequest, SamplingParams
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three tips for staying healthy are",
]


async def test_greedy_first_32_tokens_match_transformers(default_model_dir):
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.25))
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}])
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS] + [chat]

    async def run(ids):
        req = GenerateRequest(engine.new_request_id(), ids, SamplingParams(max_new_tokens=32, temperature=0))
        tokens = []
        async for out in engine.generate(req):
            tokens += out.token_ids
        return tokens

    try:
        results = await asyncio.gather(*(run(ids) for ids in prompts))
    finally:
        await engine.shutdown()
    for ids, tokens in zip(prompts, results, strict=True):
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert tokens == ref
    assert engine.tokenizer.decode(results[0]).strip().startswith("Paris")
