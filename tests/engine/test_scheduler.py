"""Scheduling as plain Python: chunked prefill, prefix reuse, preemption."""

from parrot.service.engine.base import SamplingParams
from parrot.service.engine.builtin.radix_cache import RadixCache
from parrot.service.engine.builtin.request import Request
from parrot.service.engine.builtin.scheduler import Scheduler, SchedulerConfig
from parrot.service.engine.builtin.slots import SlotAllocator


def make(num_slots=64, **config):
    alloc = SlotAllocator(num_slots)
    cache = RadixCache(alloc.free)
    return Scheduler(SchedulerConfig(**config), alloc, cache), alloc, cache


def request(rid, tokens):
    return Request(rid, list(tokens), len(tokens), SamplingParams(max_new_tokens=8), None)


def run_step(sched):
    """Schedule and commit one step, appending a fake sampled token to finished prefills."""
    batch = sched.schedule()
    sched.commit(batch)
    for req in batch.decodes + [r for r, _ in batch.prefills]:
        if req.num_computed == len(req.token_ids):
            req.token_ids.append(99)
    return batch


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    sched, _, _ = make(max_step_tokens=8)
    req = request("a", range(20))
    sched.add(req)
    fed = [n for _, n in run_step(sched).prefills]
    assert fed == [8]
    assert [n for _, n in run_step(sched).prefills] == [8]
    assert [n for _, n in run_step(sched).prefills] == [4]
    assert run_step(sched).decodes == [req]


def test_decodes_keep_running_while_a_new_prompt_prefills():
    sched, _, _ = make(max_step_tokens=8)
    a = request("a", range(4))
    sched.add(a)
    run_step(sched)
    sched.add(request("b", range(100, 130)))
    batch = run_step(sched)
    assert batch.decodes == [a]
    assert [n for _, n in batch.prefills] == [7]  # the budget minus one decode token


def test_second_request_reuses_the_first_ones_prefix():
    sched, _, cache = make()
    a = request("a", range(10))
    sched.add(a)
    run_step(sched)
    sched.finish(a)
    b = request("b", list(range(10)) + [50, 51])
    sched.add(b)
    batch = run_step(sched)
    assert b.num_cached_tokens == 10
    assert [n for _, n in batch.prefills] == [2]
    cache.check_integrity()


def test_pool_exhaustion_preempts_the_newest_request_and_it_resumes():
    sched, alloc, cache = make(num_slots=12)
    a, b = request("a", range(5)), request("b", range(20, 25))
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefill: 10 slots used
    run_step(sched)  # both decode: 12 used
    batch = run_step(sched)  # a needs a 13th slot: b is preempted, its KV cached
    assert batch.decodes == [a]
    assert sched.waiting[0] is b and b.num_computed == 0
    sched.finish(a)
    batch = run_step(sched)
    assert b in sched.running
    assert b.num_computed > 0  # resumed from what stayed cached
    cache.check_integrity()
    assert alloc.num_free + cache.total_size + sum(
        len(r.slots) - r.num_in_tree for r in sched.running) == 12


def test_waiting_queue_orders_by_priority_objective_group_then_arrival():
    sched, _, _ = make(max_running=1)
    reqs = {}
    for rid, prio, objective, group_seq, seq in [
        ("late-low", 0, "latency", 0, 0),
        ("throughput", 5, "throughput", 1, 1),
        ("group-b", 5, "latency", 2, 2),
        ("group-a-2", 5, "latency", 3, 4),
        ("high", 9, "latency", 5, 5),
        ("group-b-2", 5, "latency", 2, 6),
    ]:
        req = request(rid, [seq + 1, 2, 3])
        req.priority, req.objective, req.group_seq, req.seq = prio, objective, group_seq, seq
        reqs[rid] = req
        sched.add(req)
    assert [r.request_id for r in sched.waiting] == [
        "high", "group-b", "group-b-2", "group-a-2", "throughput", "late-low"]
    reqs["late-low"].priority = 10
    sched.reprioritize(reqs["late-low"])
    run_step(sched)
    assert sched.running == [reqs["late-low"]]
