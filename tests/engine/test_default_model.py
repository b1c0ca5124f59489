"""End to end on the real default model (SmolLM2-135M-Instruct from its shipped GGUF)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from parrot.service.engine.base import GenerateRequest, SamplingParams
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
from parrot.service.engine.builtin.model import ForwardBatch

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three tips for staying healthy are",
]


async def _greedy(engine, prompts: list[list[int]], n: int = 32) -> list[list[int]]:
    async def run(ids):
        req = GenerateRequest(engine.new_request_id(), ids, SamplingParams(max_new_tokens=n, temperature=0))
        tokens = []
        async for out in engine.generate(req):
            tokens += out.token_ids
        return tokens

    try:
        return list(await asyncio.gather(*(run(ids) for ids in prompts)))
    finally:
        await engine.shutdown()


def _reference(hf, ids: list[int], n: int = 32) -> list[int]:
    return hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


async def test_greedy_first_32_tokens_match_transformers_exactly_by_default(default_model_dir):
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.25))
    assert engine.runner.quant.method == "none"
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}])
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS] + [chat]
    results = await _greedy(engine, prompts)
    for ids, tokens in zip(prompts, results, strict=True):
        assert tokens == _reference(hf, ids)
    assert engine.tokenizer.decode(results[0]).strip().startswith("Paris")


@pytest.mark.parametrize("quantization", ["gguf", "auto"])
async def test_the_files_4_bit_blocks_serve_close_to_transformers(default_model_dir, quantization):
    """The matmuls run on the GGUF's own Q4_1 codes (checked at load to give exactly the weights
    transformers de-quantizes), in bfloat16: the logits stay within about 1% of transformers' on
    the same weights, and the answers start the same."""
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.25, quantization=quantization))
    exact_bytes = sum(p.numel() * 4 for n, p in
                      AutoModelForCausalLM.from_pretrained(default_model_dir).named_parameters()
                      if "proj" in n or "embed" in n)
    assert engine.runner.quant.method == "gguf"
    assert engine.runner.weight_bytes < exact_bytes / 4
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    n = len(prompts[0])
    batch = ForwardBatch(input_ids=torch.tensor(prompts[0]), positions=torch.arange(n),
                         out_slots=torch.arange(n), prefills=[(0, n, torch.arange(n))],
                         logit_rows=torch.arange(n))
    logits = engine.runner.forward(batch)
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[0]])).logits[0]
    assert (logits - ref).abs().max() < 0.03 * ref.abs().max()
    results = await _greedy(engine, prompts, n=8)
    for ids, tokens in zip(prompts, results, strict=True):
        assert tokens[:4] == _reference(hf, ids, 4)
    assert engine.tokenizer.decode(results[0]).strip().startswith("Paris")
