"""The builtin engine's thread serves everyone: whatever one request makes fail (a seed torch
cannot take, a degenerate distribution) fails that request alone, with the cause."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

from parrot.service.engine.base import SamplingParams
from parrot.service.engine.builtin.sampler import make_generator, sample
from tests.conftest import run_request as run


def test_sampling_params_take_64_bit_seeds_and_refuse_wider_ones():
    for seed in (0, 2**63, 2**64 - 1, -(2**63)):
        make_generator(SamplingParams(seed=seed), torch.device("cpu"))  # torch takes each
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValidationError, match="seed"):
            SamplingParams(seed=seed)


def test_tiny_temperatures_are_greedy_and_degenerate_rows_do_not_raise():
    assert SamplingParams(temperature=1e-300).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy
    logits = torch.randn(3, 50) * 10
    logits[1] = float("-inf")  # every token masked
    params = [SamplingParams(temperature=1e-5), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, top_p=1e-300)]  # top_p underflows float32 to 0
    tokens = sample(logits, params, [torch.Generator().manual_seed(0) for _ in params])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert 0 <= tokens[1] < 50


async def test_a_request_that_fails_to_start_fails_alone(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode("Once upon a time")
    # Past the schema's checks (as a bug could let through): making its generator raises.
    bad = SamplingParams.model_construct(**{**SamplingParams().model_dump(), "max_new_tokens": 4,
                                            "temperature": 1.0, "seed": "not a seed"})
    good = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    try:
        results = await asyncio.wait_for(asyncio.gather(
            run(engine, ids, good), run(engine, ids, bad), run(engine, ids, good)), 30)
        assert "TypeError" in (results[1][2].error or "") and results[1][2].finish_reason == "abort"
        for tokens, _, last in (results[0], results[2]):
            assert last.error is None and len(tokens) == 6
        # The thread still serves: a later request completes, and nothing stays counted.
        tokens, _, last = await asyncio.wait_for(run(engine, ids, good), 30)
        assert last.error is None and len(tokens) == 6
        assert engine.load().num_running == engine.load().num_waiting == 0
        assert engine._thread is not None and engine._thread.is_alive()
    finally:
        await engine.shutdown()


async def test_a_row_that_fails_to_sample_fails_only_its_request(tiny_engine_factory, tokenizer,
                                                                monkeypatch):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode("In a distant galaxy")
    poison = SamplingParams(max_new_tokens=4, temperature=0.7, seed=7)
    good = SamplingParams(max_new_tokens=5, temperature=0.9, seed=1, ignore_eos=True)
    real = sample

    def flaky(logits, params, generators):  # a sampler that breaks on one request's rows
        if any(p is poison for p in params):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generators)

    monkeypatch.setattr("parrot.service.engine.builtin.engine.sample", flaky)
    try:
        results = await asyncio.wait_for(asyncio.gather(
            run(engine, ids, good), run(engine, ids, poison), run(engine, ids, good)), 30)
        assert "probability tensor" in (results[1][2].error or "")
        for tokens, _, last in (results[0], results[2]):
            assert last.error is None and len(tokens) == 5
    finally:
        await engine.shutdown()
