"""Continuous batching with chunked prefill over a radix prefix cache (plain Python).

Every step, each running request feeds its next tokens: one for a request that is
decoding, up to the remaining token budget for one still prefilling its prompt
(chunked prefill, so a long prompt never stalls running decodes). Waiting
requests join when budget and KV slots allow; each first reuses the longest
cached prefix of its tokens. When the pool runs out, unlocked cache entries are
evicted (LRU), then the newest running request is preempted: its KV goes into
the cache and it re-queues, resuming from what stayed cached. The waiting queue is
ordered by priority, then objective (latency first), then task group, then arrival.

Request lifecycle:  waiting ──admit──► running ──finish/abort──► (KV into the cache)
                        ▲                 │
                        └───preempt───────┘
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from parrot.service.engine.builtin.radix_cache import RadixCache
from parrot.service.engine.builtin.request import Request
from parrot.service.engine.builtin.slots import SlotAllocator


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 64
    max_step_tokens: int = 512  # token budget per step: decodes + prefill chunks


@dataclass
class ScheduledBatch:
    decodes: list[Request]  # each feeds one token
    prefills: list[tuple[Request, int]]  # (request, tokens fed this step)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: SlotAllocator, cache: RadixCache) -> None:
        self.config = config
        self.allocator = allocator
        self.cache = cache
        self.waiting: list[Request] = []  # ordered by Request.queue_key
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=lambda r: r.queue_key)

    def reprioritize(self, req: Request) -> None:
        """Re-sort after ``req``'s priority changed (a running request keeps running)."""
        if req in self.waiting:
            self.waiting.remove(req)
            self.add(req)

    # ---- one step -------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_step_tokens
        decodes: list[Request] = []
        prefills: list[tuple[Request, int]] = []
        for req in list(self.running):
            if req not in self.running:
                continue  # preempted while making room for an earlier request
            remaining = len(req.token_ids) - req.num_computed
            n = min(remaining, budget) if remaining > 1 else 1
            if n == 0 or (remaining > 1 and budget == 0):
                continue
            if not self._reserve(req, n, preempt=True):
                continue
            budget -= n
            (decodes if remaining == 1 else prefills).append((req, n) if remaining > 1 else req)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            req = self.waiting[0]
            self._match_cached_prefix(req)
            n = min(len(req.token_ids) - req.num_computed, budget)
            if not self._reserve(req, n, preempt=False):
                self._release(req)  # not admitted: drop the lock, keep it waiting
                break
            self.waiting.pop(0)
            self.running.append(req)
            budget -= n
            if n == 1 and len(req.token_ids) - req.num_computed == 1:
                decodes.append(req)
            else:
                prefills.append((req, n))
        return ScheduledBatch(decodes, prefills)

    def _match_cached_prefix(self, req: Request) -> None:
        # At least one token must run to produce logits, so never match the whole sequence.
        slots, node = self.cache.match_prefix(req.token_ids[: len(req.token_ids) - 1])
        self.cache.lock(node)
        req.node = node
        req.slots = slots
        req.num_computed = req.num_in_tree = len(slots)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = min(len(slots), req.num_prompt_tokens)

    def _reserve(self, req: Request, n: int, preempt: bool) -> bool:
        """Allocate slots for ``req``'s next ``n`` tokens, evicting or preempting as needed."""
        while True:
            slots = self.allocator.alloc(n)
            if slots is not None:
                req.slots.extend(slots)
                return True
            short = n - self.allocator.num_free
            if self.cache.evict(short) >= short:
                continue
            if not preempt:
                return False
            victim = self.running[-1]
            if victim is req:
                return False
            self.preempt(victim)

    def preempt(self, req: Request) -> None:
        """Stop ``req`` for now; its computed KV stays in the cache for when it resumes."""
        self.running.remove(req)
        self.cache_computed(req)
        self._release(req)
        self.add(req)
        self.num_preemptions += 1

    def _release(self, req: Request) -> None:
        """Give back ``req``'s own slots and its cache lock; keep its tokens."""
        self.allocator.free(req.slots[req.num_in_tree:])
        if req.node is not None:
            self.cache.unlock(req.node)
        req.node = None
        req.slots = []
        req.num_computed = req.num_in_tree = 0

    # ---- after the forward pass ------------------------------------------------
    def commit(self, batch: ScheduledBatch) -> None:
        """Mark the fed tokens computed; cache prefill progress so others can reuse it."""
        for req in batch.decodes:
            req.num_computed += 1
        for req, n in batch.prefills:
            req.num_computed += n
            self.cache_computed(req)

    def cache_computed(self, req: Request) -> None:
        """Put ``req``'s computed tokens into the radix cache and re-lock at the new end."""
        if req.num_computed <= req.num_in_tree:
            return
        tokens = req.token_ids[: req.num_computed]
        num_existing = self.cache.insert(tokens, req.slots[: req.num_computed])
        # Slots we computed for tokens the cache already held are duplicates.
        self.allocator.free(req.slots[req.num_in_tree:num_existing])
        slots, node = self.cache.match_prefix(tokens)
        assert len(slots) == len(tokens)
        self.cache.lock(node)
        if req.node is not None:
            self.cache.unlock(req.node)
        req.node = node
        req.slots[: req.num_computed] = slots
        req.num_in_tree = req.num_computed

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request; its KV stays cached (unlocked)."""
        if req in self.running:
            self.running.remove(req)
            # The newest token was sampled but never fed: its slot (if any) is unused.
            self.cache_computed(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
