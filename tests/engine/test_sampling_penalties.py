"""Penalties, logit bias, min_tokens and logprobs: the sampler's batched stages against simple
per-row references, then end to end on the builtin engine with a tiny random-weight model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from pydantic import ValidationError

from parrot.service.engine.base import (
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
    TokenLogprob,
)
from parrot.service.engine.builtin.sampler import (
    TOP_P_HEAD,
    TokenHistory,
    _top_p,
    apply_penalties,
    sample,
    token_logprobs,
)

VOCAB = 40


def reference_row(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int],
                  end_ids: tuple[int, ...]) -> torch.Tensor:
    """One row, token by token, as the definitions read (vLLM's order: repetition, then
    frequency and presence, then bias, then min_tokens)."""
    row = logits.clone()
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1.0:
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t, b in p.logit_bias.items():
        row[t] += b
    if len(output) < p.min_tokens:
        for t in end_ids:
            row[t] = float("-inf")
    return row


def test_batched_penalties_match_a_per_row_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=gen) * 3
    prompts = [[1, 2, 3, 3], [4, 5], [6], [7, 8, 9], [10]]
    outputs = [[3, 3, 11, 12], [5, 5, 5], [], [13], [1, 2]]
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(repetition_penalty=1.7, logit_bias={0: 5.0, 39: -100.0}),
        SamplingParams(min_tokens=3),  # no history needed
        SamplingParams(),  # untouched
        SamplingParams(presence_penalty=-1.5, repetition_penalty=0.8, min_tokens=4),
    ]
    end_ids = [(), (), (2, 30), (2,), (2, 1)]
    histories = [TokenHistory(VOCAB, pr, out, torch.device("cpu")) if p.has_penalties else None
                 for p, pr, out in zip(params, prompts, outputs, strict=True)]
    got = apply_penalties(logits, params, histories, [len(o) for o in outputs], end_ids)
    for i, p in enumerate(params):
        want = reference_row(logits[i], p, prompts[i], outputs[i], end_ids[i])
        torch.testing.assert_close(got[i], want)
    assert torch.equal(logits[3], got[3])


def test_rows_without_any_pay_nothing():
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(min_tokens=2)]
    # min_tokens already reached: nothing to do either
    assert apply_penalties(logits, params, [None] * 3, [0, 0, 5], [(2,), (2,), (2,)]) is logits


def test_a_penalized_row_without_history_is_an_error():
    with pytest.raises(ValueError, match="history"):
        apply_penalties(torch.zeros(1, VOCAB), [SamplingParams(presence_penalty=1.0)], [None], [0], [()])


def test_history_counts_output_tokens_and_sees_the_prompt():
    h = TokenHistory(VOCAB, [1, 2], [3], torch.device("cpu"))
    h.add(3)
    h.add(4)
    assert h.counts[3] == 2 and h.counts[4] == 1 and h.counts[1] == 0
    assert h.seen[[1, 2, 3, 4]].all() and not h.seen[5]


def test_logprobs_greedy_token_is_the_row_max_and_top_is_sorted():
    logits = torch.randn(4, VOCAB) * 4
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 4, [None] * 4)
    got = token_logprobs(logits, [0, 2, 3], [5, 0, 20], [tokens[0], tokens[2], 7])
    full = torch.log_softmax(logits, dim=-1)
    assert got[0].logprob == pytest.approx(float(full[0].max()))
    assert [t for t, _ in got[0].top] == full[0].topk(5).indices.tolist()
    values = [lp for _, lp in got[2].top]
    assert len(got[2].top) == 20 and values == sorted(values, reverse=True)
    assert got[1].top == [] and got[1].logprob == pytest.approx(float(full[2].max()))
    assert got[2].logprob == pytest.approx(float(full[3, 7]))


def test_batched_sampling_respects_top_k_and_top_p_per_row():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=gen) * 2
    params = [SamplingParams(top_k=3, temperature=1.0), SamplingParams(top_p=0.3, temperature=1.0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=1)]
    allowed_k = set(logits[0].topk(3).indices.tolist())
    probs = torch.softmax(logits[1], -1)
    sorted_probs, order = probs.sort(descending=True)
    head = int(((sorted_probs.cumsum(0) - sorted_probs) < 0.3).sum())
    allowed_p = set(order[:head].tolist())
    for seed in range(30):
        gens = [torch.Generator().manual_seed(seed) for _ in params]
        tokens = sample(logits, params, gens)
        assert tokens[0] in allowed_k and tokens[1] in allowed_p
        assert tokens[2] == int(logits[2].argmax()) and tokens[3] == int(logits[3].argmax())
    again = sample(logits, params, [torch.Generator().manual_seed(5) for _ in params])
    assert again == sample(logits, params, [torch.Generator().manual_seed(5) for _ in params])


def reference_top_p(row: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = row.sort(descending=True)
    drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
    drop[0] = False
    return torch.zeros_like(row).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))


def test_top_p_matches_a_full_sort_for_peaked_and_flat_rows():
    vocab = 4 * TOP_P_HEAD
    peaked = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 6, dim=-1)
    flat = torch.softmax(torch.linspace(0.0, -0.5, vocab), dim=-1)  # a nucleus past TOP_P_HEAD
    for probs, top_p in ((peaked, 0.9), (flat, 0.6), (peaked, 1e-30)):
        assert torch.equal(_top_p(probs, top_p), reference_top_p(probs, top_p))
    assert int((_top_p(flat, 0.6) > 0).sum()) > TOP_P_HEAD
    assert int((_top_p(peaked, 1e-30) > 0).sum()) == 1


def test_draws_follow_the_distribution():
    target = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = target.log().expand(4000, -1).contiguous()
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens = sample(logits, [SamplingParams(temperature=1.0)] * 4000, gens)
    freq = torch.bincount(torch.tensor(tokens), minlength=5).float() / 4000
    assert freq[4] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(freq, target, atol=0.03, rtol=0)


def test_a_draw_that_rounds_up_to_the_total_takes_the_last_possible_token(monkeypatch):
    import parrot.service.engine.builtin.sampler as sampler

    probs = torch.tensor([0.25, 0.0, 0.75, 0.0, 0.0])
    monkeypatch.setattr(sampler.torch, "rand", lambda *a, **k: torch.ones(1, dtype=torch.float64))
    assert sampler._draw(probs, None) == 2
    monkeypatch.setattr(sampler.torch, "rand", lambda *a, **k: torch.zeros(1, dtype=torch.float64))
    assert sampler._draw(probs, None) == 0
    assert sampler._draw(torch.tensor([0.0, 0.0, 1.0]), None) == 2  # never a token of no probability


def test_sampling_params_check_the_new_fields():
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0},
                {"logit_bias": {5: 101}}, {"logit_bias": {-1: 1}}, {"min_tokens": -1},
                {"logprobs": 21}, {"prompt_logprobs": -1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            SamplingParams(**bad)


# ---- end to end on the builtin engine ------------------------------------------------------


async def collect(engine, ids, sampling) -> tuple[list[int], str, list[TokenLogprob], GenerateOutput]:
    tokens, text, logprobs, first, last = [], "", [], None, None
    async for out in engine.generate(GenerateRequest(engine.new_request_id(), list(ids), sampling)):
        first = first or out
        tokens += out.token_ids
        text += out.text
        logprobs += out.logprobs or []
        last = out
    assert last is not None and first is not None and last.error is None, last
    last.prompt_logprobs = first.prompt_logprobs
    return tokens, text, logprobs, last


def greedy(n: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


async def test_logit_bias_forces_a_token_and_frequency_penalty_stops_repeats(tiny_engine_factory, tokenizer):
    engine, hf = tiny_engine_factory()
    ids = tokenizer.encode("Once upon a time")
    try:
        forced = tokenizer.encode(" banana")[0]
        tokens, *_ = await collect(engine, ids, greedy(6, ignore_eos=True, logit_bias={forced: 100.0}))
        assert tokens == [forced] * 6
        # A +20 bias makes the token repeat for good; the strongest penalties (2 per occurrence,
        # and 2 once present) overcome it after a few.
        repeat = greedy(24, ignore_eos=True, logit_bias={forced: 20.0})
        assert (await collect(engine, ids, repeat))[0] == [forced] * 24
        penalized, *_ = await collect(engine, ids, repeat.model_copy(
            update={"frequency_penalty": 2.0, "presence_penalty": 2.0}))
        assert 1 <= penalized.count(forced) <= 8
        assert max(penalized.count(t) for t in penalized) <= 8
        plain, *_ = await collect(engine, ids, greedy(24, ignore_eos=True))
        # The same history-free request is unchanged: greedy equality holds without penalties.
        assert (await collect(engine, ids, greedy(24, ignore_eos=True)))[0] == plain
        assert plain == hf_greedy(hf, ids, 24)
    finally:
        await engine.shutdown()


async def test_min_tokens_holds_back_eos(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode("Hello")
    eos = sorted(engine.eos_token_ids)[0]
    try:
        # The bias makes EOS the greedy choice at once; min_tokens keeps it out for 5 tokens.
        tokens, _, _, last = await collect(engine, ids, greedy(20, logit_bias={eos: 100.0}))
        assert tokens == [eos] and last.finish_reason == "stop"
        tokens, _, _, last = await collect(engine, ids, greedy(20, logit_bias={eos: 100.0}, min_tokens=5))
        assert len(tokens) == 6 and eos not in tokens[:5] and tokens[5] == eos
        assert last.finish_reason == "stop"
    finally:
        await engine.shutdown()


async def test_logprobs_follow_the_tokens_and_greedy_takes_the_row_max(tiny_engine_factory, tokenizer):
    engine, hf = tiny_engine_factory()
    ids = tokenizer.encode("The quick brown fox")
    try:
        tokens, _, logprobs, _ = await collect(engine, ids, greedy(8, ignore_eos=True, logprobs=4))
        assert [lp.token_id for lp in logprobs] == tokens
        with torch.no_grad():
            logits = hf(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
        want = torch.log_softmax(logits, dim=-1)
        for i, lp in enumerate(logprobs):
            assert lp.logprob == pytest.approx(float(want[i].max()), abs=1e-4)
            assert lp.top[0][0] == tokens[i] and len(lp.top) == 4
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        # Sampled (temperature 1.5): each logprob is the token's own, before temperature.
        sampled = SamplingParams(max_new_tokens=8, temperature=1.5, seed=3, ignore_eos=True, logprobs=0)
        tokens, _, logprobs, _ = await collect(engine, ids, sampled)
        with torch.no_grad():
            logits = hf(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
        want = torch.log_softmax(logits, dim=-1)
        assert [lp.logprob for lp in logprobs] == pytest.approx(
            [float(want[i, t]) for i, t in enumerate(tokens)], abs=1e-4)
        assert all(lp.top == [] for lp in logprobs)
    finally:
        await engine.shutdown()


async def test_prompt_logprobs_match_transformers_cold_and_cached(tiny_engine_factory, tokenizer):
    engine, hf = tiny_engine_factory(max_step_tokens=16)  # several prefill chunks
    ids = tokenizer.encode("It was the best of times, it was the worst of times, it was the age of "
                           "wisdom, it was the age of foolishness")
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    try:
        plain, *_ = await collect(engine, ids, greedy(6))
        for _ in range(2):  # the second time the prompt comes from the cache
            tokens, _, _, last = await collect(engine, ids, greedy(6, prompt_logprobs=2))
            got = last.prompt_logprobs
            assert got is not None and len(got) == len(ids) and got[0] is None
            for i in range(1, len(ids)):
                entry = got[i]
                assert entry is not None and entry.token_id == ids[i]
                assert entry.logprob == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-4)
                assert [t for t, _ in entry.top] == want[i - 1].topk(2).indices.tolist()
            assert tokens == plain  # the extra pass leaves the cache as it was
        assert last.num_cached_tokens == len(ids) - 1
        engine.cache.check_integrity()
        # Prefill only (max_new_tokens 0): the prompt's logprobs alone.
        tokens, _, _, last = await collect(engine, ids, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
        assert tokens == [] and last.prompt_logprobs is not None and len(last.prompt_logprobs) == len(ids)
    finally:
        await engine.shutdown()


async def test_the_engine_refuses_bias_for_unknown_tokens(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    try:
        with pytest.raises(InvalidRequestError, match="logit_bias"):
            await collect(engine, tokenizer.encode("Hi"), greedy(2, logit_bias={10**7: 1.0}))
    finally:
        await engine.shutdown()


def test_outputs_with_logprobs_survive_json_as_the_remote_engine_sends_them():
    out = GenerateOutput("r", [5], "x", 3, 0, 1,
                         logprobs=[TokenLogprob(5, -0.25, [(5, -0.25), (9, float("-inf"))])],
                         prompt_logprobs=[None, TokenLogprob(7, -1.5, [])])
    again = GenerateOutput(**json.loads(json.dumps(dataclasses.asdict(out))))
    assert again == out
