"""What an engine has probably cached, as token sequences: the global scheduler's view.

The service tracks, per engine, the prompts it sent there and the outputs it got back.
An engine with a radix cache (builtin, SGLang) keeps exactly such sequences, so the
longest match here estimates how much of a new prompt that engine can skip. SGLang's
own gateway does the same approximately, per character; here it is per token, since
prompts are sent as token ids. No KV lives here, only the tokens, bounded by the
engine's capacity with the least recently used sequences forgotten first.

    root ─ [1, 9, 9, 4] ─┬─ [7, 7] ─ [3]      each edge holds a run of tokens;
                         └─ [8]               a node's children differ in their first token
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from parrot.service.engine.builtin.radix_cache import common_len


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...] = ()
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)
    last_used: int = 0


class PrefixIndex:
    """Token sequences one engine has probably cached, with LRU eviction."""

    def __init__(self) -> None:
        self._root = _Node()
        self._clock = itertools.count(1)
        self.num_tokens = 0

    def match(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` are held (and mark them used)."""
        node, matched, now = self._root, 0, next(self._clock)
        while matched < len(tokens):
            child = node.children.get(tokens[matched])
            if child is None:
                break
            n = common_len(child.tokens, tokens[matched:matched + len(child.tokens)])
            matched += n
            child.last_used = now
            if n < len(child.tokens):
                break
            node = child
        return matched

    def add(self, tokens: Sequence[int], capacity: int) -> None:
        """Record ``tokens`` as cached, then forget old sequences beyond ``capacity`` tokens."""
        node, pos, now = self._root, 0, next(self._clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = _Node(tuple(tokens[pos:]), node, last_used=now)
                node.children[tokens[pos]] = leaf
                self.num_tokens += len(leaf.tokens)
                break
            n = common_len(child.tokens, tokens[pos:pos + len(child.tokens)])
            if n < len(child.tokens):
                child = self._split(child, n)
            child.last_used = now
            node, pos = child, pos + n
        self._evict(self.num_tokens - capacity)

    def forget_after(self, tokens: Sequence[int], n: int) -> None:
        """The engine holds only ``tokens[:n]`` (it said so: a shorter cache hit than recorded),
        so whatever is recorded past that point along ``tokens`` was evicted there."""
        node, pos = self._root, 0
        while n < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                return
            span = common_len(child.tokens, tokens[pos:pos + len(child.tokens)])
            if pos + span <= n:  # the cut is further down
                if span < len(child.tokens):
                    return  # what is recorded leaves ``tokens`` before the cut
                node, pos = child, pos + span
                continue
            if n > pos:  # the cut falls inside this edge: split it there
                node = self._split(child, n - pos)
                child = node.children[tokens[n]]
            del node.children[tokens[n]]
            self.num_tokens -= self._size(child)
            return

    def _size(self, node: _Node) -> int:
        total, stack = 0, [node]
        while stack:
            current = stack.pop()
            total += len(current.tokens)
            stack.extend(current.children.values())
        return total

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut ``node``'s edge after ``n`` tokens; return the new upper half."""
        assert node.parent is not None
        upper = _Node(node.tokens[:n], node.parent, {node.tokens[n]: node}, node.last_used)
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.parent = node.tokens[n:], upper
        return upper

    def _evict(self, excess: int) -> None:
        while excess > 0:
            leaves = [n for n in self._leaves() if n is not self._root]
            if not leaves:
                return
            for leaf in sorted(leaves, key=lambda n: n.last_used):
                if excess <= 0:
                    return
                assert leaf.parent is not None
                del leaf.parent.children[leaf.tokens[0]]
                self.num_tokens -= len(leaf.tokens)
                excess -= len(leaf.tokens)

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                out.append(node)
        return out
