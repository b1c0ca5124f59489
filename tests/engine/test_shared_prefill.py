"""A prefix shared by waiting requests and not cached yet is prefilled once, then reused."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from parrot.service.engine.base import GenerateRequest, SamplingParams
from parrot.service.engine.builtin.radix_cache import RadixCache
from parrot.service.engine.builtin.request import Request
from parrot.service.engine.builtin.scheduler import Scheduler, SchedulerConfig
from parrot.service.engine.builtin.slots import SlotAllocator

PREFIX = list(range(1000, 1100))  # 100 tokens shared by every request below
_arrivals = itertools.count(1)


def make(num_slots: int = 1024, **config) -> Scheduler:
    """A scheduler holding requests that share 32 uncached tokens or more (the tests' numbers
    are chosen around that threshold, whatever the default is)."""
    alloc = SlotAllocator(num_slots)
    config = {"shared_prefill_min_tokens": 32, **config}
    return Scheduler(SchedulerConfig(**config), alloc, RadixCache(alloc.free))


def request(rid: str, tokens: list[int], objective: str = "latency") -> Request:
    seq = next(_arrivals)
    return Request(rid, list(tokens), len(tokens), SamplingParams(max_new_tokens=8), None,
                   objective=objective, seq=seq, group_seq=seq)  # type: ignore[arg-type]


def with_suffix(i: int, prefix: list[int] = PREFIX, n: int = 10) -> list[int]:
    return prefix + list(range(2000 + 100 * i, 2000 + 100 * i + n))


def run_step(sched: Scheduler):
    """Schedule and commit one step, appending a fake sampled token to finished prefills."""
    batch = sched.schedule()
    sched.commit(batch)
    for req in batch.decodes + [r for r, _ in batch.prefills]:
        if req.num_computed == len(req.token_ids):
            req.token_ids.append(99)
    return batch


def prefill_tokens(batch) -> int:
    return sum(n for _, n in batch.prefills)


def test_waiting_requests_prefill_their_shared_prefix_once_then_reuse_it():
    sched = make()
    reqs = [request(f"r{i}", with_suffix(i)) for i in range(4)]
    for r in reqs:
        sched.add(r)
    first = run_step(sched)
    assert [r for r, _ in first.prefills] == [reqs[0]]  # the others wait for its prefix
    assert prefill_tokens(first) == 110
    assert sched.waiting == reqs[1:]
    second = run_step(sched)
    assert [(r, n) for r, n in second.prefills] == [(r, 10) for r in reqs[1:]]
    assert [r.num_cached_tokens for r in reqs] == [0, 100, 100, 100]
    assert sched.num_prefill_tokens == 100 + 4 * 10
    sched.cache.check_integrity()


def test_chunked_producer_holds_others_until_the_shared_part_is_cached():
    # A 64-token budget: the producer's first chunk caches 64 of the 100 shared tokens;
    # 36 uncached ones are still worth waiting for, so the others join only after both chunks.
    sched = make(max_step_tokens=64)
    reqs = [request(f"r{i}", with_suffix(i)) for i in range(3)]
    for r in reqs:
        sched.add(r)
    assert prefill_tokens(run_step(sched)) == 64
    assert sched.running == [reqs[0]]
    assert prefill_tokens(run_step(sched)) == 46  # the rest of r0; r1, r2 still wait
    assert sched.running == [reqs[0]]
    third = run_step(sched)
    assert third.decodes == [reqs[0]] and [n for _, n in third.prefills] == [10, 10]
    assert [r.num_cached_tokens for r in reqs] == [0, 100, 100]


def test_requests_sharing_little_are_not_held():
    sched = make()
    short = list(range(1000, 1010))  # 10 shared tokens: below the 32-token threshold
    reqs = [request(f"r{i}", with_suffix(i, short, 50)) for i in range(3)]
    for r in reqs:
        sched.add(r)
    batch = run_step(sched)
    assert [r for r, _ in batch.prefills] == reqs
    assert sched.num_held == 0


def test_threshold_none_turns_holding_off():
    sched = make(shared_prefill_min_tokens=None)
    reqs = [request(f"r{i}", with_suffix(i)) for i in range(3)]
    for r in reqs:
        sched.add(r)
    assert prefill_tokens(run_step(sched)) == 3 * 110


def test_unrelated_requests_still_join_while_others_are_held():
    sched = make()
    a, b = request("a", with_suffix(0)), request("b", with_suffix(1))
    other = request("other", list(range(5000, 5040)))
    for r in (a, b, other):
        sched.add(r)
    batch = run_step(sched)
    assert [r for r, _ in batch.prefills] == [a, other]
    assert sched.waiting == [b]


def test_aborting_the_producer_releases_the_held_requests():
    sched = make(max_step_tokens=64)
    reqs = [request(f"r{i}", with_suffix(i)) for i in range(3)]
    for r in reqs:
        sched.add(r)
    run_step(sched)  # r0 caches 64 shared tokens
    sched.finish(reqs[0])  # aborted mid-prefill: its computed KV stays cached
    batch = run_step(sched)
    # r1 takes over the shared part from the cached 64; r2 now waits for r1.
    assert [r for r, _ in batch.prefills] == [reqs[1]]
    assert reqs[1].num_cached_tokens == 64
    while sched.waiting or any(r.num_output_tokens == 0 for r in reqs[1:]):
        run_step(sched)
    assert reqs[2].num_cached_tokens == 100
    sched.cache.check_integrity()


def test_latency_first_order_holds_and_latency_never_waits_on_throughput_work():
    sched = make()
    tp = request("tp", with_suffix(0), "throughput")
    lat = request("lat", with_suffix(1), "latency")
    sched.add(tp)
    sched.add(lat)
    batch = run_step(sched)
    # The latency request goes first and prefills the shared part; the throughput one waits.
    assert [r for r, _ in batch.prefills] == [lat]
    assert sched.waiting == [tp]
    run_step(sched)
    assert tp.num_cached_tokens == 100

    # A throughput request still prefilling a prefix never holds a latency request back.
    sched = make(max_step_tokens=64)
    tp = request("tp", with_suffix(0), "throughput")
    sched.add(tp)
    run_step(sched)
    lat = request("lat", with_suffix(1), "latency")
    sched.add(lat)
    batch = run_step(sched)
    assert batch.prefills[0][0] is lat


# ---- on the tiny model ---------------------------------------------------------------
def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


COUNCIL = "The council met on Tuesday to discuss the new bridge, the farms and the library. " * 12
QUESTIONS = ["Why did it flood?", "Who voted no?", "When will it open?", "What did it cost?"]


def serve_together(engine, prompts: list[list[int]], tag: str) -> list[list[int]]:
    """Add every prompt before the first step, run to the end; the greedy outputs."""
    reqs = []
    for i, ids in enumerate(prompts):
        engine._add(GenerateRequest(f"{tag}{i}", ids, SamplingParams(max_new_tokens=8, temperature=0.0)))
        reqs.append(engine._requests[f"{tag}{i}"])
    while engine.scheduler.has_work:
        engine.step()
    return [r.output_ids for r in reqs]


def test_engine_prefills_a_shared_prefix_once_and_outputs_stay_exact(tiny_engine_factory, tokenizer):
    prefix = tokenizer.encode(COUNCIL)[:100]
    prompts = [prefix + tokenizer.encode(" " + q) for q in QUESTIONS]
    suffix_total = sum(len(p) - 100 for p in prompts)

    def serve(engine, tag: str) -> list[list[int]]:
        return serve_together(engine, prompts, tag)

    engine, hf = tiny_engine_factory()
    outputs = serve(engine, "shared")
    assert engine.scheduler.num_prefill_tokens == 100 + suffix_total
    assert outputs == [hf_greedy(hf, ids, 8) for ids in prompts]  # as if run one by one
    engine.cache.check_integrity()
    assert engine.cache.locked_size == 0

    # Without holding, all four compute the prefix in the same step.
    engine, _ = tiny_engine_factory()
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, shared_prefill_min_tokens=None)
    assert serve(engine, "each") == outputs
    assert engine.scheduler.num_prefill_tokens == 4 * 100 + suffix_total


def test_on_cpu_a_short_shared_prefix_is_prefilled_once_too(tiny_engine_factory, tokenizer):
    engine, hf = tiny_engine_factory()  # "auto": 8 tokens on CPU
    assert engine.scheduler.config.shared_prefill_min_tokens == 8
    prefix = tokenizer.encode(COUNCIL)[:12]  # what a LangGraph step's agents add to a cached chat
    prompts = [prefix + tokenizer.encode(" " + q) for q in QUESTIONS]
    outputs = serve_together(engine, prompts, "short")
    assert engine.scheduler.num_prefill_tokens == 12 + sum(len(p) - 12 for p in prompts)
    assert outputs == [hf_greedy(hf, ids, 8) for ids in prompts]

    engine, _ = tiny_engine_factory(shared_prefill_min_tokens=64)  # the GPU default: computed by each
    serve_together(engine, prompts, "each")
    assert engine.scheduler.num_prefill_tokens == sum(map(len, prompts))
    for bad in (0, -3, "sometimes"):
        with pytest.raises(ValueError, match="shared_prefill_min_tokens"):
            tiny_engine_factory(shared_prefill_min_tokens=bad)
