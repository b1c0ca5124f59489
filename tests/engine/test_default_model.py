"""End to end on the real default model (SmolLM2-135M-Instruct from its shipped GGUF)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from parrot.service.engine.base import GenerateRequest, SamplingParams
from parrot.service.engine.builtin import quant
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


@pytest.mark.parametrize("quantization", [None, "none"])
async def test_greedy_first_32_tokens_match_transformers(default_model_dir, quantization):
    """By default the matmuls run on the GGUF's own blocks (float32 arithmetic on exactly the
    values transformers de-quantizes); "none" runs the de-quantized matrices themselves.
    Either way greedy decoding follows transformers token for token."""
    options = {} if quantization is None else {"quantization": quantization}
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.25, **options))
    default = "gguf" if quant.kernels_available() else "none"  # "auto" needs the C kernels built
    assert engine.runner.quant.method == (default if quantization is None else "none")
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}])
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS] + [chat]
    results = await _greedy(engine, prompts)
    for ids, tokens in zip(prompts, results, strict=True):
        assert tokens == _reference(hf, ids)
    assert engine.tokenizer.decode(results[0]).strip().startswith("Paris")


async def test_the_files_blocks_read_a_fifth_of_the_bytes_and_give_transformers_logits(default_model_dir):
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.25, quantization="gguf"))
    exact_bytes = sum(p.numel() * 4 for n, p in
                      AutoModelForCausalLM.from_pretrained(default_model_dir).named_parameters()
                      if "proj" in n or "embed" in n)
    assert engine.runner.weight_bytes < exact_bytes / 4.5
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    for text in [PROMPTS[0], " ".join(PROMPTS * 3)]:  # a step of few rows, and of many
        ids = engine.tokenizer.encode(text)
        n = len(ids)
        batch = ForwardBatch(input_ids=torch.tensor(ids), positions=torch.arange(n),
                             out_slots=torch.arange(n), prefills=[(0, n, torch.arange(n))],
                             logit_rows=torch.arange(n))
        logits = engine.runner.forward(batch)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert (logits - ref).abs().max() < 1e-3 * ref.abs().max()
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    await engine.shutdown()
