"""Global placement decisions: objective, load, prefix affinity, task groups."""

from __future__ import annotations

import pytest

from parrot.service.dispatch.prefix_index import PrefixIndex
from parrot.service.dispatch.registry import EngineRegistry
from parrot.service.dispatch.scheduler import GlobalScheduler


@pytest.fixture
def engines(tiny_engine_factory):
    registry = EngineRegistry()
    return [registry.add(tiny_engine_factory()[0]) for _ in range(3)]


def busy(scheduler, handle, objective, n):
    for i in range(n):
        scheduler.begin(handle, objective, [9000 + i])


def test_latency_work_goes_where_the_least_latency_work_runs(engines):
    a, b, c = engines
    scheduler = GlobalScheduler()
    busy(scheduler, a, "latency", 2)
    busy(scheduler, b, "throughput", 6)  # big batch, but no latency work
    busy(scheduler, c, "latency", 1)
    assert scheduler.place(engines, [1, 2, 3], "latency") is b


def test_first_latency_call_goes_to_the_least_loaded(engines):
    a, b, c = engines
    scheduler = GlobalScheduler()
    busy(scheduler, a, "throughput", 3)
    busy(scheduler, b, "throughput", 1)
    busy(scheduler, c, "throughput", 2)
    assert scheduler.place(engines, [1, 2, 3], "latency") is b


def test_throughput_work_goes_to_the_least_loaded_beyond_the_slack(engines):
    a, b, c = engines
    scheduler = GlobalScheduler(balance_slack=2)
    busy(scheduler, a, "throughput", 5)
    busy(scheduler, b, "throughput", 1)
    busy(scheduler, c, "latency", 3)
    assert scheduler.place(engines, [1, 2, 3], "throughput") is b


def test_prefix_affinity_wins_within_the_slack_but_not_beyond(engines):
    a, b, c = engines
    prompt = list(range(100, 300))
    scheduler = GlobalScheduler(balance_slack=2, min_affinity_tokens=32)
    scheduler.sent(c, prompt[:150])  # c's cache holds most of the prompt
    busy(scheduler, c, "throughput", 2)
    assert scheduler.place(engines, prompt, "throughput") is c
    assert scheduler.affinity(c, prompt) == 150
    busy(scheduler, c, "throughput", 1)  # now 3 more than the least loaded: balance first
    assert scheduler.place(engines, prompt, "throughput") in (a, b)


def test_a_short_match_is_not_affinity(engines):
    a, b, _ = engines
    scheduler = GlobalScheduler(min_affinity_tokens=32)
    scheduler.sent(b, [5] * 10)
    busy(scheduler, b, "throughput", 1)
    assert scheduler.place([a, b], [5] * 10 + [6], "throughput") is a


def test_a_task_group_stays_together_and_forgets_a_dead_engine(engines):
    a, b, _ = engines
    scheduler = GlobalScheduler(balance_slack=0)
    first = scheduler.place([a, b], [1], "throughput", group="reduce")
    busy(scheduler, first, "throughput", 10)
    assert scheduler.place([a, b], [2], "throughput", group="reduce") is first
    other = b if first is a else a
    assert scheduler.place([a, b], [3], "throughput", group="other") is other
    scheduler.forget(first)
    assert scheduler.place([other], [4], "throughput", group="reduce") is other
    scheduler.group_done("reduce")
    assert "reduce" not in scheduler._groups


def test_a_task_group_someone_waits_for_spreads_over_the_engines(engines):
    scheduler = GlobalScheduler()
    a, b, c = engines
    placed = []
    for i in range(6):
        handle = scheduler.place([a, b, c], [i], "latency", group="reduce")
        scheduler.begin(handle, "latency", [i])
        placed.append(handle)
    assert [placed.count(h) for h in (a, b, c)] == [2, 2, 2]


def test_in_flight_counts_return_to_zero(engines):
    a = engines[0]
    scheduler = GlobalScheduler()
    scheduler.begin(a, "throughput", [1, 2])
    scheduler.retarget(a, "throughput", "latency")  # its result was fetched for latency
    assert (scheduler.stats[a.id].latency, scheduler.stats[a.id].throughput) == (1, 0)
    scheduler.end(a, "latency")
    scheduler.end(engines[1], "latency")  # an engine never counted: ignored
    assert scheduler.stats[a.id].total == 0


def test_prefix_index_forgets_least_recent_beyond_capacity():
    index = PrefixIndex()
    index.add(list(range(100)), capacity=150)
    index.add(list(range(1000, 1100)), capacity=150)
    assert index.num_tokens <= 150
    assert index.match(list(range(1000, 1100))) == 100
    assert index.match(list(range(100))) < 100


def test_a_shorter_cache_hit_than_recorded_corrects_the_index(engines):
    scheduler = GlobalScheduler()
    a = engines[0]
    prompt = list(range(100))
    scheduler.sent(a, prompt + [500, 501])
    assert scheduler.affinity(a, prompt) == 100
    scheduler.cache_hit(a, prompt, expected=100, cached=99)  # the last token is always computed
    assert scheduler.affinity(a, prompt + [500]) == 101
    scheduler.cache_hit(a, prompt, expected=100, cached=40)  # the engine evicted the rest
    assert scheduler.affinity(a, prompt + [500]) == 100  # the prompt is cached again, not its old tail
