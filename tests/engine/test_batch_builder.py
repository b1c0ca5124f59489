"""Grouping decode requests by shared radix prefix, as plain Python over a real radix cache."""

from parrot.service.engine.base import SamplingParams
from parrot.service.engine.builtin.batch_builder import _consecutive, group_by_shared_prefix
from parrot.service.engine.builtin.radix_cache import RadixCache
from parrot.service.engine.builtin.request import Request


def locked_request(cache: RadixCache, rid: str, tokens: list[int]) -> Request:
    """A decoding request whose whole sequence is cached and locked, as after its prefill."""
    cache.insert(tokens, [1000 + t for t in tokens])
    slots, node = cache.match_prefix(tokens)
    cache.lock(node)
    req = Request(rid, list(tokens), len(tokens), SamplingParams(), None, slots=slots,
                  num_computed=len(tokens), num_in_tree=len(tokens), node=node)
    return req


def test_long_prefix_shared_by_some_is_not_lost_to_a_short_one_shared_by_all():
    cache = RadixCache(lambda slots: None)
    template = list(range(24))  # e.g. a chat template every conversation starts with
    system = list(range(100, 1100))  # a long system prompt half of them share
    reqs = [locked_request(cache, f"sys{i}", template + system + [5000 + i]) for i in range(4)]
    reqs += [locked_request(cache, f"own{i}", template + [6000 + i, 7000 + i]) for i in range(4)]
    groups = {tuple(r.request_id for r in members): n for members, n in group_by_shared_prefix(reqs, 1)}
    assert groups[("sys0", "sys1", "sys2", "sys3")] == 24 + 1000
    assert groups[("own0", "own1", "own2", "own3")] == 24


def test_groups_run_two_phase_only_when_it_saves_enough_reads():
    cache = RadixCache(lambda slots: None)
    reqs = [locked_request(cache, f"r{i}", list(range(300)) + [900 + i]) for i in range(3)]
    assert group_by_shared_prefix(reqs, 600) == [(reqs, 300)]  # (3 - 1) * 300 = 600
    assert group_by_shared_prefix(reqs, 601) == [(reqs, 0)]
    assert group_by_shared_prefix(reqs, None) == [(reqs, 0)]
    lone = locked_request(cache, "lone", list(range(5000, 5400)))
    assert group_by_shared_prefix([lone], 1) == [([lone], 0)]


def test_requests_sharing_only_a_word_more_stay_in_the_big_group():
    cache = RadixCache(lambda slots: None)
    system = list(range(500))
    # Pairs of user turns start alike ("How do I ..."): their paths split one token deeper.
    reqs = [locked_request(cache, f"r{i}", system + [9000 + i // 2, 9100 + i]) for i in range(8)]
    assert group_by_shared_prefix(reqs, 1) == [(reqs, 500)]


def test_only_a_lone_row_over_consecutive_slots_is_read_in_place():
    assert _consecutive([[7, 8, 9, 10]], 0) == (7, 4)
    assert _consecutive([[7, 9, 8, 10]], 0) is None  # ends 3 apart, but not in a run
    assert _consecutive([[7, 8], [9, 10]], 0) is None  # two rows are gathered together
    assert _consecutive([[7, 8, 9]], 4) is None  # a two-phase group reads its prefix apart
