"""The builtin engine's ``prefill``: a prefill-only request that caches a prefix's KV."""

from __future__ import annotations

import pytest
import torch

from parrot.service.engine.base import InvalidRequestError, SamplingParams
from tests.conftest import run_request as run

PREFIX = "You are a careful assistant. Read the report below and answer in one sentence. " * 3


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


async def test_prefill_caches_the_prefix_and_generates_nothing(tiny_engine_factory, tokenizer):
    engine, hf = tiny_engine_factory()
    prefix = tokenizer.encode(PREFIX)
    prompt = prefix + tokenizer.encode(" The report: rain fell all week.")
    try:
        await engine.prefill(prefix)
        assert len(engine.cache.match_prefix(prefix)[0]) == len(prefix)
        assert not engine.scheduler.has_work and not engine._requests  # finished, no output left
        assert engine.cache.total_size == len(prefix)  # the prefix only: no generated token
        tokens, _, last = await run(engine, prompt, SamplingParams(max_new_tokens=12, temperature=0))
        assert last.num_cached_tokens == len(prefix)
        assert tokens == hf_greedy(hf, prompt, 12)  # the prefilled KV gives the same output
        engine.cache.check_integrity()
    finally:
        await engine.shutdown()


async def test_prefill_of_a_cached_prefix_adds_nothing(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    prefix = tokenizer.encode(PREFIX)
    try:
        await engine.prefill(prefix)
        steps, computed = engine.num_steps, engine.scheduler.num_prefill_tokens
        await engine.prefill(prefix)
        # Only the last token runs again (one single-token step), as for any fully cached prompt.
        assert engine.scheduler.num_prefill_tokens == computed
        assert engine.num_steps == steps + 1
        assert engine.cache.total_size == len(prefix)
    finally:
        await engine.shutdown()


async def test_prefill_without_prefix_caching_is_a_no_op(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory(prefix_caching=False)
    try:
        await engine.prefill(tokenizer.encode(PREFIX))
        assert engine.num_steps == 0 and engine.cache.total_size == 0
    finally:
        await engine.shutdown()


async def test_prefill_of_a_prompt_the_engine_cannot_take_raises(tiny_engine_factory):
    engine, _ = tiny_engine_factory(max_context_len=64)
    try:
        with pytest.raises(InvalidRequestError, match="context length"):
            await engine.prefill([5] * 100)
        await engine.prefill([])  # nothing to do
        assert engine.num_steps == 0
    finally:
        await engine.shutdown()
