"""The global scheduler's per-engine index of cached token sequences, as plain Python."""

from __future__ import annotations

import random

import pytest

from parrot.service.dispatch.prefix_index import PrefixIndex
from parrot.service.engine.builtin.radix_cache import common_len

BIG = 1 << 20


def test_match_counts_the_longest_held_start():
    index = PrefixIndex()
    index.add([1, 2, 3, 4, 5], BIG)
    assert index.match([1, 2, 3, 4, 5, 6]) == 5
    assert index.match([1, 2, 3, 9]) == 3
    assert index.match([7]) == 0 and index.match([]) == 0


def test_branches_split_an_edge_and_share_their_start():
    index = PrefixIndex()
    index.add([1, 2, 3, 4, 5], BIG)
    index.add([1, 2, 3, 7, 8], BIG)  # splits [1..5] after three tokens
    index.add([1, 2], BIG)  # already held: nothing new
    assert index.num_tokens == 7
    assert index.match([1, 2, 3, 4, 5]) == 5 and index.match([1, 2, 3, 7, 8, 9]) == 5
    assert index.match([1, 2, 3, 6]) == 3


def test_the_least_recently_used_sequences_go_first_beyond_capacity():
    index = PrefixIndex()
    index.add(list(range(0, 40)), 100)
    index.add(list(range(100, 140)), 100)
    index.match(list(range(0, 40)))  # used again: now the newer of the two
    index.add(list(range(200, 240)), 100)
    assert index.num_tokens <= 100
    assert index.match(list(range(0, 40))) == 40 and index.match(list(range(200, 240))) == 40
    assert index.match(list(range(100, 140))) == 0


def test_matches_agree_with_a_brute_force_model():
    rng = random.Random(0)
    index, held = PrefixIndex(), []
    for _ in range(300):
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        if rng.random() < 0.5:
            index.add(seq, BIG)
            held.append(seq)
        else:
            best = max((next((i for i, (a, b) in enumerate(zip(h, seq, strict=False)) if a != b),
                             min(len(h), len(seq))) for h in held), default=0)
            assert index.match(seq) == best, (seq, held)
    assert index.num_tokens <= sum(len(h) for h in held)


def test_what_an_engine_says_it_evicted_is_forgotten_past_the_cut():
    index = PrefixIndex()
    index.add([1, 2, 3, 4, 5, 6], BIG)
    index.add([1, 2, 3, 4, 9], BIG)
    index.add([1, 2, 7], BIG)
    index.forget_after([1, 2, 3, 4, 5, 6], 3)  # only [1, 2, 3] was still cached
    assert index.match([1, 2, 3, 4, 5, 6]) == 3 and index.match([1, 2, 3, 4, 9]) == 3
    assert index.match([1, 2, 7]) == 3  # another branch is untouched
    assert index.num_tokens == 4
    index.forget_after([1, 2, 7], 0)
    assert index.match([1, 2, 3]) == 0 and index.num_tokens == 0
    index.add([5, 5, 5], BIG)
    index.forget_after([5, 5, 5], 3)  # all of it held: nothing to forget
    index.forget_after([6, 6], 1)  # nothing recorded there
    assert index.match([5, 5, 5]) == 3 and index.num_tokens == 3


@pytest.mark.parametrize("shared", [0, 1, 127, 128, 129, 300])
def test_common_len_counts_across_blocks_and_sequence_types(shared):
    a = list(range(shared)) + [-1, 5, 6]
    b = tuple(range(shared)) + (-2, 5, 6)
    assert common_len(a, b) == shared
    assert common_len(a, a[:shared]) == shared  # one ends where they agree
    assert common_len(a, list(a)) == len(a)
