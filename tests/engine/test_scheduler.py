"""Scheduling as plain Python: chunked prefill, prefix reuse, preemption, objectives, pins."""

import itertools

from parrot.service.engine.base import SamplingParams
from parrot.service.engine.builtin.radix_cache import RadixCache
from parrot.service.engine.builtin.request import Request
from parrot.service.engine.builtin.scheduler import Scheduler, SchedulerConfig
from parrot.service.engine.builtin.slots import SlotAllocator


def make(num_slots=64, **config):
    alloc = SlotAllocator(num_slots)
    cache = RadixCache(alloc.free)
    return Scheduler(SchedulerConfig(**config), alloc, cache), alloc, cache


_arrivals = itertools.count(1)


def request(rid, tokens, objective="latency"):
    seq = next(_arrivals)
    return Request(rid, list(tokens), len(tokens), SamplingParams(max_new_tokens=8), None,
                   objective=objective, seq=seq, group_seq=seq)


def start(sched, reqs):
    """Admit ``reqs`` and run them until every one is decoding."""
    for req in reqs:
        sched.add(req)
    while any(r.num_output_tokens == 0 for r in reqs):
        run_step(sched)


def fed(batch, reqs):
    """Tokens ``batch`` feeds for the requests in ``reqs``."""
    return sum(r in reqs for r in batch.decodes) + sum(n for r, n in batch.prefills if r in reqs)


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


def test_throughput_work_gets_only_what_latency_work_leaves_and_resumes_after():
    sched, _, cache = make(num_slots=1024, max_step_tokens=64, latency_step_tokens=8)
    background = [request(f"t{i}", range(100 * i, 100 * i + 6), "throughput") for i in range(10)]
    start(sched, background)
    assert fed(run_step(sched), background) == 10  # no latency work: every decode runs

    fast = request("fast", range(2000, 2020))
    sched.add(fast)
    batch = run_step(sched)  # the 20-token prompt alone is over the cap
    assert [(r, n) for r, n in batch.prefills] == [(fast, 20)]
    assert fed(batch, background) == 0 and sched.num_paused == 10
    for _ in range(3):
        batch = run_step(sched)
        assert batch.decodes[0] is fast
        assert fed(batch, background) == 8 - 1
        assert set(batch.decodes[1:]) == set(background[:7])  # queue order: the oldest first
    assert sched.num_paused == 10 + 3 * 3
    short = request("short", range(3000, 3005))
    sched.add(short)
    batch = run_step(sched)  # two latency requests: 1 decode + 5 prompt tokens leave 2
    assert fed(batch, [fast, short]) == 6 and fed(batch, background) == 2
    sched.finish(short)
    assert all(r in sched.running for r in background)  # paused, not preempted: KV kept
    assert sched.num_preemptions == 0

    sched.finish(fast)
    assert fed(run_step(sched), background) == 10
    cache.check_integrity()


def test_latency_request_preempts_the_newest_throughput_request_when_running_is_full():
    sched, _, cache = make(max_running=2)
    old, new = request("old", range(5), "throughput"), request("new", range(10, 15), "throughput")
    start(sched, [old, new])
    fast = request("fast", range(20, 24))
    sched.add(fast)
    batch = run_step(sched)
    assert sched.running == [old, fast] and sched.waiting == [new]
    assert batch.prefills == [(fast, 4)] and batch.decodes == [old]
    assert sched.num_preemptions == 1
    sched.finish(fast)
    batch = run_step(sched)
    assert batch.decodes == [old, new]  # resumed from the cache: no prompt recomputed
    cache.check_integrity()


def test_latency_request_preempts_throughput_work_when_kv_is_short_never_the_reverse():
    sched, alloc, cache = make(num_slots=16, max_step_tokens=64)
    old, new = request("old", range(6), "throughput"), request("new", range(10, 16), "throughput")
    start(sched, [old, new])  # 12 of 16 slots in use, all locked by running requests
    fast = request("fast", range(20, 28))
    sched.add(fast)
    batch = run_step(sched)  # fast needs 8 slots: the newest throughput request makes room
    assert batch.prefills == [(fast, 8)] and batch.decodes == [old]
    assert sched.waiting == [new] and sched.num_preemptions == 1
    assert alloc.num_free == 1

    batch = run_step(sched)  # one slot left: fast takes it, old sits out rather than preempt
    assert batch.decodes == [fast] and old in sched.running and sched.num_paused == 1
    batch = run_step(sched)  # fast needs another: now old is preempted too
    assert batch.decodes == [fast] and sched.running == [fast]
    assert sched.num_preemptions == 2

    # A throughput request, however urgent, waits for KV rather than preempt latency work.
    urgent = request("urgent", range(40, 50), "throughput")
    urgent.priority = 10
    sched.add(urgent)
    for _ in range(3):
        run_step(sched)
        assert sched.running == [fast] and sched.waiting[0] is urgent
    assert sched.num_preemptions == 2
    cache.check_integrity()
    assert alloc.num_free + cache.total_size + sum(
        len(r.slots) - r.num_in_tree for r in sched.running) == 16


def test_objective_blind_when_latency_step_tokens_is_none():
    sched, _, _ = make(num_slots=1024, max_running=11, max_step_tokens=64, latency_step_tokens=None)
    background = [request(f"t{i}", range(100 * i, 100 * i + 6), "throughput") for i in range(10)]
    start(sched, background)
    fast = request("fast", range(2000, 2020))
    sched.add(fast)
    batch = run_step(sched)
    assert fed(batch, background) == 10 and batch.prefills == [(fast, 20)]
    sched.add(request("late", range(950, 960)))  # max_running is full: it waits, nobody is preempted
    run_step(sched)
    assert sched.num_paused == 0 and sched.num_preemptions == 0
    assert [r.request_id for r in sched.waiting] == ["late"]


def test_without_prefix_caching_nothing_is_shared_and_preempted_work_restarts():
    sched, alloc, cache = make(num_slots=12, prefix_caching=False)
    a = request("a", range(10))
    sched.add(a)
    run_step(sched)
    sched.finish(a)
    assert cache.total_size == 0 and alloc.num_free == 12
    b = request("b", list(range(10)) + [50])
    sched.add(b)
    batch = run_step(sched)
    assert b.num_cached_tokens == 0 and batch.prefills == [(b, 11)]  # a's prompt is not reused
    sched.finish(b)

    c, d = request("c", range(20, 25)), request("d", range(30, 35))
    sched.add(c)
    sched.add(d)
    run_step(sched)
    run_step(sched)  # 12 slots in use
    batch = run_step(sched)  # c needs a 13th: d is preempted and its KV freed
    assert batch.decodes == [c] and sched.waiting == [d]
    assert d.num_computed == 0 and alloc.num_free == 12 - 7
    sched.finish(c)
    batch = run_step(sched)
    assert batch.prefills == [(d, 7)]  # its prompt and both output tokens, recomputed
    assert cache.total_size == 0 and sched.num_preemptions == 1
    sched.finish(d)
    assert alloc.num_free == 12


def test_pinned_prefix_is_protected_once_computed_until_unpinned():
    sched, alloc, cache = make(num_slots=32, max_step_tokens=4)
    system = list(range(10))
    sched.pin_prefix("sys", system)  # nothing cached yet
    a = request("a", system + [50, 51])
    sched.add(a)
    run_step(sched)  # 4 of the 10 pinned tokens computed: already protected
    sched.finish(a)
    assert cache.evict(100) == 0 and cache.match_prefix(system)[0] != []
    a2 = request("a2", system + [60])
    sched.add(a2)
    for _ in range(3):
        run_step(sched)
    sched.finish(a2)
    other = request("other", range(100, 105))
    sched.add(other)
    run_step(sched)
    sched.finish(other)
    cache.evict(100)  # evicts everything but the pinned prefix
    assert cache.total_size == len(system) and len(cache.match_prefix(system + [60])[0]) == 10
    cache.check_integrity()

    sched.pin_prefix("sys", system[:3])  # re-pinning an id replaces the pin
    assert cache.evict(100) == 7 and cache.total_size == 3
    sched.unpin_prefix("sys")
    sched.unpin_prefix("unknown")
    assert cache.locked_size == 0 and cache.evict(100) == 3
    assert alloc.num_free == 32
    cache.check_integrity()
