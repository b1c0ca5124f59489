"""The builtin engine against transformers' own generate, on tiny random-weight models."""

from __future__ import annotations

import asyncio

import pytest
import torch

from parrot.service.engine.base import GenerateRequest, InvalidRequestError, SamplingParams
from tests.conftest import run_request as run

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "In a distant galaxy",
    "def add(a, b):\n    return",
    "Once upon a time there lived a king who had three daughters and a",
]


def greedy(n: int = 24, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def hf_greedy(hf, ids, n):
    """transformers' generate; stops at EOS like the engine does."""
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("num_kv_heads,arch", [(2, "llama"), (4, "llama"), (2, "qwen3")])
async def test_greedy_matches_transformers_unbatched_and_batched(
    tiny_engine_factory, tokenizer, num_kv_heads, arch
):
    engine, hf = tiny_engine_factory(num_kv_heads=num_kv_heads, arch=arch)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = [hf_greedy(hf, ids, 24) for ids in prompts]
    try:
        for ids, exp in zip(prompts, expected, strict=True):  # one at a time, cache cold
            engine.cache.reset()
            assert (await run(engine, ids, greedy()))[0] == exp
        # all at once (continuous batching), then again with every prompt cached (warm)
        for _ in range(2):
            results = await asyncio.gather(*(run(engine, ids, greedy()) for ids in prompts))
            assert [r[0] for r in results] == expected
        assert [r[2].num_cached_tokens for r in results] == [len(ids) - 1 for ids in prompts]
        engine.cache.check_integrity()
    finally:
        await engine.shutdown()


async def test_shared_prefix_batch_matches_transformers_with_and_without_two_phase(
    tiny_engine_factory, tokenizer
):
    system = "You are a helpful assistant. Answer briefly and precisely. " * 12
    prompts = [tokenizer.encode(system + f"Question {i}: what is {i} plus {i}?") for i in range(6)]
    for min_saved in (None, 1):  # two-phase off, then on for every shared prefix
        engine, hf = tiny_engine_factory(two_phase_min_saved_tokens=min_saved)
        expected = [hf_greedy(hf, ids, 16) for ids in prompts]
        try:
            await run(engine, prompts[0], greedy(1))  # caches the shared system prompt
            results = await asyncio.gather(*(run(engine, ids, greedy(16)) for ids in prompts))
            assert [r[0] for r in results] == expected
            assert all(r[2].num_cached_tokens >= len(tokenizer.encode(system)) - 1 for r in results[1:])
        finally:
            await engine.shutdown()


async def test_child_prompt_extending_parent_output_hits_the_cache(tiny_engine_factory, tokenizer):
    engine, hf = tiny_engine_factory()
    try:
        parent = tokenizer.encode("Write a poem about the sea:")
        tokens, _, _ = await run(engine, parent, greedy(12, ignore_eos=True))
        child = parent + tokens + tokenizer.encode(" Now summarize it.")
        child_tokens, _, last = await run(engine, child, greedy(8))
        # everything but the parent's last sampled token (never fed) came from the cache
        assert last.num_cached_tokens == len(parent) + len(tokens) - 1
        assert child_tokens == hf_greedy(hf, child, 8)
    finally:
        await engine.shutdown()


async def test_chunked_prefill_and_preemption_keep_outputs_exact(tiny_engine_factory, tokenizer):
    # A 16-token step budget splits every prompt into chunks; a pool of 256 slots
    # (its minimum) cannot hold all requests at once, so some are preempted and resumed.
    engine, hf = tiny_engine_factory(max_step_tokens=16, kv_cache_gib=200 * 512 / 2**30)
    assert engine.allocator.num_slots == 256  # the floor: fewer than the ~275 tokens needed
    prompts = [tokenizer.encode(p * 3) for p in PROMPTS]
    expected = [hf_greedy(hf, ids, 40) for ids in prompts]
    try:
        results = await asyncio.gather(*(run(engine, ids, greedy(40)) for ids in prompts))
        assert [r[0] for r in results] == expected
        assert engine.scheduler.num_preemptions > 0
        engine.cache.check_integrity()
        assert engine.load().num_running == 0
    finally:
        await engine.shutdown()


def add_request(engine, request_id, ids, n, objective):
    """Queue a greedy request on the runner side (tests drive ``engine.step()`` themselves)."""
    engine._add(GenerateRequest(request_id, list(ids), greedy(n), objective=objective))
    return engine._requests[request_id]


def test_latency_arrivals_pause_and_preempt_throughput_work_and_outputs_stay_exact(
    tiny_engine_factory, tokenizer
):
    # Three throughput requests fill max_running; two latency requests arrive mid-decode:
    # each preempts the newest throughput request, and their prompts (over the 8-token
    # cap) pause the one left. Stepping by hand makes the interleaving deterministic.
    engine, hf = tiny_engine_factory(max_running=3, latency_step_tokens=8)
    background_ids = [tokenizer.encode(p) for p in PROMPTS[:3]]
    urgent_ids = [tokenizer.encode(p * 2) for p in (PROMPTS[0], PROMPTS[3])]
    background = [
        add_request(engine, f"bg{i}", ids, 24, "throughput") for i, ids in enumerate(background_ids)]
    while any(r.num_output_tokens < 3 for r in background):
        engine.step()
    urgent = [add_request(engine, f"fast{i}", ids, 16, "latency") for i, ids in enumerate(urgent_ids)]
    assert engine.load().num_latency == 2
    while engine.scheduler.has_work:
        engine.step()
    assert [r.output_ids for r in background] == [hf_greedy(hf, ids, 24) for ids in background_ids]
    assert [r.output_ids for r in urgent] == [hf_greedy(hf, ids, 16) for ids in urgent_ids]
    assert engine.scheduler.num_preemptions >= 2 and engine.scheduler.num_paused > 0
    assert engine.load().num_latency == 0
    engine.cache.check_integrity()
    assert engine.cache.locked_size == 0


async def test_without_prefix_caching_no_compute_is_shared_and_outputs_stay_exact(
    tiny_engine_factory, tokenizer
):
    # The pool's floor of 256 slots is too small for all four: preempted requests recompute.
    engine, hf = tiny_engine_factory(prefix_caching=False, max_step_tokens=16,
                                     kv_cache_gib=200 * 512 / 2**30)
    prompts = [tokenizer.encode(p * 3) for p in PROMPTS]
    expected = [hf_greedy(hf, ids, 40) for ids in prompts]
    try:
        for _ in range(2):  # the second round repeats every prompt
            results = await asyncio.gather(*(run(engine, ids, greedy(40)) for ids in prompts))
            assert [r[0] for r in results] == expected
            assert [r[2].num_cached_tokens for r in results] == [0] * len(prompts)
        assert engine.scheduler.num_preemptions > 0
        assert engine.cache.total_size == 0
        assert engine.allocator.num_free == engine.allocator.num_slots
    finally:
        await engine.shutdown()


async def test_flush_drops_the_prefix_cache_but_keeps_what_pins_hold(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    pinned = tokenizer.encode("You are a careful assistant. " * 4)
    other = tokenizer.encode("Translate to French: good morning. " * 4)

    async def cached_len(ids):
        return (await run(engine, ids, greedy(1)))[2].num_cached_tokens

    try:
        await engine.pin_prefix("system", pinned)
        for ids in (pinned, other):
            await cached_len(ids)
        assert await cached_len(other) == len(other) - 1
        steps, busy = engine.load().num_steps, engine.load().busy_s
        assert steps == engine.num_steps > 0 and busy > 0

        assert await engine.flush_cache() is True
        assert engine.cache.total_size == len(pinned)  # all but the pinned prefix went
        engine.cache.check_integrity()
        assert await cached_len(other) == 0
        assert await cached_len(pinned) == len(pinned) - 1
        assert engine.load().num_steps > steps and engine.load().busy_s > busy  # counters only grow

        await engine.unpin_prefix("system")
        assert await engine.flush_cache() is True
        assert engine.cache.total_size == 0
    finally:
        await engine.shutdown()


async def test_pinned_prefix_survives_eviction_pressure_until_unpinned(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory(kv_cache_gib=200 * 512 / 2**30)  # 256 slots
    pinned = tokenizer.encode("You are a careful assistant. " * 4)
    unpinned = tokenizer.encode("Translate to French: good morning. " * 4)
    flood = [tokenizer.encode(f"Story {i}: " + PROMPTS[i % 4] * 6) for i in range(6)]

    async def cached_len(ids):
        return (await run(engine, ids, greedy(1)))[2].num_cached_tokens

    async def flood_the_pool():
        for ids in flood:  # ~400 tokens through a 256-slot pool: older entries get evicted
            await run(engine, ids, greedy(2))

    try:
        await engine.pin_prefix("system", pinned)  # not cached yet: protected once computed
        await cached_len(pinned)
        await cached_len(unpinned)
        await flood_the_pool()
        assert await cached_len(pinned) == len(pinned) - 1
        assert await cached_len(unpinned) < len(unpinned) - 1  # evicted
        engine.cache.check_integrity()

        await engine.unpin_prefix("system")
        assert engine.cache.locked_size == 0
        await flood_the_pool()
        assert await cached_len(pinned) < len(pinned) - 1  # evictable again
        engine.cache.check_integrity()
    finally:
        await engine.shutdown()


async def test_stop_strings_stop_token_ids_and_length(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[0])
    try:
        tokens, text, last = await run(engine, ids, greedy(30, ignore_eos=True))
        assert last.finish_reason == "length" and len(tokens) == 30
        full = tokenizer.decode(tokens, skip_special_tokens=True)
        assert text == full
        stop = full[len(full) // 2:len(full) // 2 + 3]
        head = full[: full.index(stop)]
        _, stopped_text, last = await run(engine, ids, greedy(30, ignore_eos=True, stop=(stop,)))
        assert last.finish_reason == "stop" and stopped_text == head
        stop_at = tokens.index(tokens[4])
        _, text, last = await run(engine, ids, greedy(30, ignore_eos=True, stop_token_ids=(tokens[4],)))
        assert last.finish_reason == "stop" and last.num_output_tokens == stop_at + 1
        assert text == tokenizer.decode(tokens[:stop_at], skip_special_tokens=True)  # without its text
    finally:
        await engine.shutdown()


async def test_eos_stops_generation_like_transformers(tiny_engine_factory, tokenizer):
    engine, hf = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[0])
    try:
        free_run = hf_greedy(hf, ids, 20)
        eos = free_run[6]  # a token greedy decoding reaches: make it the model's EOS
        engine.eos_token_ids = frozenset({eos})
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=eos,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        tokens, _, last = await run(engine, ids, greedy(20))
        assert tokens == ref == free_run[: free_run.index(eos) + 1]
        assert last.finish_reason == "stop"
        tokens, _, last = await run(engine, ids, greedy(20, ignore_eos=True))
        assert tokens == free_run and last.finish_reason == "length"
    finally:
        await engine.shutdown()


async def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[1])
    try:
        seeded = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
        a = (await run(engine, ids, seeded))[0]
        b = (await run(engine, ids, seeded))[0]
        assert a == b
        others = [(await run(engine, ids, seeded.model_copy(update={"seed": s})))[0] for s in range(4)]
        assert any(o != a for o in others)
        top1 = SamplingParams(max_new_tokens=16, temperature=0.8, top_k=1, ignore_eos=True)
        assert (await run(engine, ids, top1))[0] == (await run(engine, ids, greedy(16, ignore_eos=True)))[0]
    finally:
        await engine.shutdown()


async def test_abort_ends_the_stream_and_frees_the_request(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[2])
    try:
        rid = "to-abort"
        seen = []
        async for out in engine.generate(GenerateRequest(rid, ids, greedy(1000, ignore_eos=True))):
            seen.append(out)
            if len(seen) == 3:
                await engine.abort(rid)
        assert seen[-1].finished and seen[-1].finish_reason == "abort"
        assert seen[-1].num_output_tokens < 1000
        assert engine.load().num_running == 0
        # A consumer that walks away mid-stream aborts its request too.
        stream = engine.generate(GenerateRequest("walk-away", ids, greedy(1000, ignore_eos=True)))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if engine.load().num_running == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.load().num_running == 0
        # The engine still serves afterwards.
        assert len((await run(engine, ids, greedy(4, ignore_eos=True)))[0]) == 4
    finally:
        await engine.shutdown()


async def test_prefill_only_request_caches_the_prompt(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[3])
    try:
        tokens, _, last = await run(engine, ids, greedy(0))
        assert tokens == [] and last.finish_reason == "length"
        _, _, last = await run(engine, ids + [42], greedy(2))
        assert last.num_cached_tokens == len(ids)
    finally:
        await engine.shutdown()


async def test_bad_requests_raise_clear_errors_and_engine_keeps_serving(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory(max_context_len=64)
    try:
        with pytest.raises(InvalidRequestError, match="context length"):
            await run(engine, list(range(5, 60)), greedy(32))
        with pytest.raises(InvalidRequestError, match="empty"):
            await run(engine, [], greedy(4))
        with pytest.raises(InvalidRequestError, match="token ids"):
            await run(engine, [len(tokenizer) + 5], greedy(4))
        with pytest.raises(ValueError):
            SamplingParams(max_new_tokens=-1)
        assert len((await run(engine, [5, 6, 7], greedy(3, ignore_eos=True)))[0]) == 3
    finally:
        await engine.shutdown()
