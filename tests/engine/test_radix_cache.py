"""The radix prefix cache as plain Python: matching, splitting, locking, LRU eviction."""

from parrot.service.engine.builtin.radix_cache import RadixCache
from parrot.service.engine.builtin.slots import SlotAllocator


def make():
    freed: list[int] = []
    return RadixCache(freed.extend), freed


def test_match_returns_longest_cached_prefix_and_splits_edges():
    cache, _ = make()
    assert cache.insert([1, 2, 3, 4], [10, 11, 12, 13]) == 0
    slots, node = cache.match_prefix([1, 2, 9])
    assert slots == [10, 11]
    assert node.key == [1, 2]  # the edge [1,2,3,4] was split after two tokens
    slots, _ = cache.match_prefix([1, 2, 3, 4, 5])
    assert slots == [10, 11, 12, 13]
    assert cache.match_prefix([7])[0] == []
    cache.check_integrity()


def test_insert_reports_already_cached_prefix():
    cache, _ = make()
    cache.insert([1, 2, 3], [10, 11, 12])
    # The first two tokens are cached already: the caller still owns slots 20, 21.
    assert cache.insert([1, 2, 5, 6], [20, 21, 22, 23]) == 2
    assert cache.match_prefix([1, 2, 5, 6])[0] == [10, 11, 22, 23]
    assert cache.total_size == 5
    cache.check_integrity()


def test_locked_entries_survive_eviction_and_lru_goes_first():
    cache, freed = make()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([5, 6], [20, 21])
    cache.insert([8, 9], [30, 31])
    _, locked = cache.match_prefix([1, 2, 3])
    cache.lock(locked)
    cache.match_prefix([8, 9])  # touch: [5, 6] is now least recently used
    assert cache.evict(2) == 2
    assert freed == [20, 21]
    assert cache.evict(100) == 2  # only [8, 9] is evictable
    assert freed == [20, 21, 30, 31]
    assert cache.match_prefix([1, 2, 3])[0] == [10, 11, 12]
    assert cache.evictable_size == 0
    cache.unlock(locked)
    assert cache.evictable_size == 3
    cache.check_integrity()


def test_split_keeps_lock_counts_consistent():
    cache, _ = make()
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.lock(node)
    cache.match_prefix([1, 2])  # splits a locked edge
    cache.check_integrity()
    assert cache.locked_size == 4
    cache.unlock(node)
    assert cache.locked_size == 0
    cache.check_integrity()


def test_evicting_a_leaf_exposes_its_parent():
    cache, freed = make()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4], [10, 11, 14])
    assert cache.evict(3) >= 3
    assert sorted(freed) == [10, 11, 12, 14]
    assert cache.total_size == 0
    cache.check_integrity()


def test_slot_allocator_hands_out_contiguous_runs_and_refuses_overdraw():
    alloc = SlotAllocator(8)
    assert alloc.alloc(3) == [0, 1, 2]
    assert alloc.alloc(6) is None
    assert alloc.num_free == 5
    alloc.free([0, 1, 2])
    assert alloc.num_free == 8
    assert len(set(alloc.alloc(8))) == 8
