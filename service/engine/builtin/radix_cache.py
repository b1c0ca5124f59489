"""Token-level radix prefix cache over KV-pool slots (plain Python, no torch).

Every edge of the tree holds a run of token ids and the KV-pool slots that hold
those tokens' keys and values. A request looks up the longest cached prefix of its
tokens, locks the path (so nothing it reads is evicted), and inserts what it
computed when it finishes, so a later request whose prompt extends it is a hit.

    root ─[sys prompt 0..999]─┬─[user A ..]     (leaf, lock_ref 1: running)
                              └─[user B ..]     (leaf, lock_ref 0: evictable, LRU)

Eviction removes unlocked leaves, least recently used first, and hands their
slots back through ``free_slots``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence


class RadixNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, key: list[int], value: list[int], parent: RadixNode | None) -> None:
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.key = key  # token ids on the edge into this node
        self.value = value  # KV slots, one per token of ``key``
        self.lock_ref = 0
        self.last_access = 0

    def __lt__(self, other: RadixNode) -> bool:  # for the eviction heap
        return self.last_access < other.last_access


_BLOCK = 128  # tokens common_len compares at once


def common_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start: compared a block at a time (one C
    comparison per block; prompts share hundreds of tokens), then token by token in the block
    that differs. The dispatcher's prefix index and pins use it too."""
    n = min(len(a), len(b))
    start = 0
    while start < n:
        end = min(start + _BLOCK, n)
        if list(a[start:end]) != list(b[start:end]):  # as lists: a tuple and a list compare by value
            return next(i for i in range(start, end) if a[i] != b[i])
        start = end
    return n


class RadixCache:
    """Longest-prefix match, insert, lock and LRU eviction over token sequences."""

    def __init__(self, free_slots: Callable[[list[int]], None]) -> None:
        self._free_slots = free_slots
        self._clock = itertools.count(1)
        self.root = RadixNode([], [], None)
        self.root.lock_ref = 1  # the root is never evicted
        self.total_size = 0  # tokens held by the tree
        self.locked_size = 0  # tokens on locked paths

    @property
    def evictable_size(self) -> int:
        return self.total_size - self.locked_size

    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], RadixNode]:
        """Return the slots of the longest cached prefix of ``tokens`` and its last node.

        A partial match inside an edge splits that edge, so the returned node covers
        exactly the matched prefix and can be locked on its own.
        """
        node = self.root
        slots: list[int] = []
        pos = 0
        now = next(self._clock)
        node.last_access = now
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = common_len(child.key, tokens[pos:pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            slots.extend(child.value)
            pos += n
            node = child
        return slots, node

    def insert(self, tokens: Sequence[int], slots: Sequence[int]) -> int:
        """Cache ``tokens`` held in ``slots``; return how many leading tokens were cached already.

        The caller owns ``slots[:returned]`` still (duplicates of cached entries) and
        must free them; the tree owns the rest from now on.
        """
        if len(tokens) != len(slots):
            raise ValueError("tokens and slots differ in length")
        node = self.root
        pos = 0
        now = next(self._clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                new = RadixNode(list(tokens[pos:]), list(slots[pos:]), node)
                new.last_access = now
                node.children[tokens[pos]] = new
                self.total_size += len(new.key)
                return pos
            n = common_len(child.key, tokens[pos:pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pos += n
            node = child
        return pos

    def _split(self, child: RadixNode, n: int) -> RadixNode:
        """Split ``child``'s edge after ``n`` tokens; return the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        upper = RadixNode(child.key[:n], child.value[:n], parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        parent.children[child.key[0]] = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def lock(self, node: RadixNode) -> None:
        """Protect the path root→node from eviction (reference counted)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.locked_size += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock without lock")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.locked_size -= len(node.key)
            node = node.parent  # type: ignore[assignment]

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots from unlocked leaves, LRU first; return freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self._free_slots(leaf.value)
            freed += len(leaf.value)
            self.total_size -= len(leaf.key)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def reset(self) -> int:
        """Drop every unlocked entry; return how many tokens were dropped."""
        before = self.total_size
        self.evict(self.total_size)
        return before - self.total_size

    def _nodes(self) -> list[RadixNode]:
        out: list[RadixNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def check_integrity(self) -> None:
        """Raise if sizes or lock counts disagree with the tree (used by tests)."""
        total = locked = 0
        for node in self._nodes():
            if len(node.key) != len(node.value) or not node.key:
                raise AssertionError("radix cache: edge with mismatched or empty key")
            total += len(node.key)
            if node.lock_ref > 0:
                locked += len(node.key)
            if node.parent is not None and node.parent is not self.root:
                if node.lock_ref > node.parent.lock_ref:
                    raise AssertionError("radix cache: child locked more than its parent")
        if total != self.total_size or locked != self.locked_size:
            raise AssertionError(
                f"radix cache: sizes {self.total_size}/{self.locked_size} != {total}/{locked}"
            )
