"""Continuous batching with chunked prefill over a radix prefix cache (plain Python).

Every step, each running request feeds its next tokens: one for a request that is
decoding, up to the remaining token budget for one still prefilling its prompt
(chunked prefill, so a long prompt never stalls running decodes). Waiting
requests join when budget and KV slots allow; each first reuses the longest
cached prefix of its tokens. When the pool runs out, unlocked cache entries are
evicted (LRU), then a running request that comes later in this step's order is
preempted, the last first: its KV goes into the cache and it re-queues, resuming
from what stayed cached. The waiting queue is ordered by priority, then objective
(latency first), then task group, then arrival.

Objective-aware batching (``latency_step_tokens``): each step runs latency
requests first, then throughput ones, each class in queue order. While a latency
request runs, throughput requests only share what latency work left of
``latency_step_tokens``, so the steps a latency request waits on stay short; one
that gets nothing is paused (keeps its KV). A latency request that cannot be
admitted preempts throughput requests; a throughput request never preempts a
latency one. Objective-blind (``None``): admission order, the newest preempted first.

Shared prefill (``shared_prefill_min_tokens``): a waiting request that shares at least
that many not-yet-cached tokens with a running request still prefilling them (its
producer) stays waiting until they are cached, then reuses them instead of computing
them a second time in parallel. Prefill progress is cached at every commit, so the
held request is admitted the step after the producer's chunk covers the shared part:

    producer   [==== shared 0..99 ====|-- own suffix --]   prefilling, chunk by chunk
    held       [==== shared 0..99 ====|-- suffix --]       waits: 100 - cached >= min
    next step  cache holds 0..99 → held matches them and feeds only its suffix

A request is held only behind a producer of its own or a more urgent class (priority,
then objective), which runs first every step, so it is never held behind paused work;
a producer that finishes, aborts or is preempted stops holding anyone.

Pins keep a prefix's cached KV locked; one not fully cached yet is re-matched
whenever KV enters the cache.

Request lifecycle:  waiting ──admit──► running ──finish/abort──► (KV into the cache)
                        ▲                 │
                        └───preempt───────┘
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from parrot.service.engine.builtin.radix_cache import RadixCache, RadixNode, common_len
from parrot.service.engine.builtin.request import Request
from parrot.service.engine.builtin.slots import SlotAllocator


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 64
    max_step_tokens: int = 512  # token budget per step: decodes + prefill chunks
    # Step time grows with the tokens fed, so while latency requests run, throughput
    # requests only get what latency work leaves of this many tokens per step.
    # None: objective-blind (every running request shares max_step_tokens).
    latency_step_tokens: int | None = 32
    # False: no KV is shared between requests: nothing is matched or cached.
    prefix_caching: bool = True
    # A waiting request that shares at least this many uncached tokens with a request
    # still prefilling them waits until they are cached (see the module doc). Below it,
    # computing the overlap twice costs less than the step a request would wait.
    # None: never hold a request back.
    shared_prefill_min_tokens: int | None = 64


@dataclass
class ScheduledBatch:
    decodes: list[Request]  # each feeds one token
    prefills: list[tuple[Request, int]]  # (request, tokens fed this step)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_rows(self) -> int:
        """Token rows the step computes: one per decode, a chunk's tokens per prefill."""
        return len(self.decodes) + sum(n for _, n in self.prefills)


@dataclass
class _Pin:
    token_ids: list[int]
    node: RadixNode  # deepest cached node of token_ids, locked for the pin
    num_matched: int = 0


def _is_latency(req: Request) -> bool:
    return req.objective == "latency"


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: SlotAllocator, cache: RadixCache) -> None:
        self.config = config
        self.allocator = allocator
        self.cache = cache
        self.waiting: list[Request] = []  # ordered by Request.queue_key
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_paused = 0  # request-steps a throughput request sat out for latency work
        self.num_prefill_tokens = 0  # prompt (and resumed) tokens computed by prefill chunks
        self.num_held = 0  # request-steps a request waited for a shared prefix to be cached
        self._pins: dict[str, _Pin] = {}

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
        batch = ScheduledBatch([], [])
        budget = self.config.max_step_tokens
        cap = self.config.latency_step_tokens
        if cap is None:
            order = list(self.running)  # admission order: the newest is preempted first
            for req in order:
                if req in self.running:
                    budget -= self._feed(batch, req, budget, order, strict=False)
            self._admit(batch, budget, list(self.waiting), victims=[])
            return batch

        # Each class in queue order; victims are taken from the back of ``order``, so
        # throughput requests go before any latency request, the lowest-ranked first.
        latency = sorted(filter(_is_latency, self.running), key=lambda r: r.queue_key)
        throughput = sorted(
            (r for r in self.running if not _is_latency(r)), key=lambda r: r.queue_key)
        order = latency + throughput
        for req in latency:
            if req in self.running:
                budget -= self._feed(batch, req, budget, order, strict=False)
        waiting_latency = list(filter(_is_latency, self.waiting))
        budget -= self._admit(batch, budget, waiting_latency, victims=list(throughput))

        latency_active = any(map(_is_latency, self.running))
        if latency_active:
            used = self.config.max_step_tokens - budget
            budget = min(budget, max(0, cap - used))
        for req in throughput:
            if req not in self.running:
                continue  # preempted to make room for latency work
            n = self._feed(batch, req, budget, order, strict=latency_active)
            budget -= n
            if n == 0 and latency_active:
                self.num_paused += 1
        # A latency request still waiting goes first next step: admit no throughput work
        # that would take the slots it waits for.
        if not any(map(_is_latency, self.waiting)):
            self._admit(batch, budget, list(self.waiting), victims=[])
        return batch

    def _feed(self, batch: ScheduledBatch, req: Request, budget: int, order: list[Request],
              strict: bool) -> int:
        """Schedule running ``req``'s next tokens; return how many (0: it sits this step out).

        A decode runs even past ``budget`` unless ``strict`` (decodes are what keeps
        latency low, and each is one token). Requests after ``req`` in ``order`` may be
        preempted for its slots.
        """
        remaining = len(req.token_ids) - req.num_computed
        if remaining > 1:
            n = min(remaining, budget)
        else:
            n = remaining if budget > 0 or not strict else 0
        if n <= 0:
            return 0
        if not self._reserve(req, n, order[order.index(req) + 1:]):
            return 0
        if remaining == 1:
            batch.decodes.append(req)
        else:
            batch.prefills.append((req, n))
        return n

    def _admit(self, batch: ScheduledBatch, budget: int, candidates: list[Request],
               victims: list[Request]) -> int:
        """Admit ``candidates`` (waiting, in queue order) until one does not fit; return tokens used.

        Room for them (a running place, KV slots) may come from preempting ``victims``
        from the back.
        """
        used = 0
        for req in candidates:
            if used >= budget:
                break
            if self._waits_for_shared_prefix(req):
                self.num_held += 1
                continue  # uses no budget or slots: the requests after it may still join
            while len(self.running) >= self.config.max_running:
                if not self._preempt_last(victims):
                    return used
            self._match_cached_prefix(req)
            n = min(len(req.token_ids) - req.num_computed, budget - used)
            if not self._reserve(req, n, victims):
                self._release(req)  # not admitted: drop the lock, keep it waiting
                break
            self.waiting.remove(req)
            self.running.append(req)
            used += n
            if n == 1 and len(req.token_ids) - req.num_computed == 1:
                batch.decodes.append(req)
            else:
                batch.prefills.append((req, n))
        return used

    def _waits_for_shared_prefix(self, req: Request) -> bool:
        """True if a running request still prefills at least ``shared_prefill_min_tokens``
        of ``req``'s prefix that is not cached yet (so ``req`` should reuse it, not compute it)."""
        min_tokens = self.config.shared_prefill_min_tokens
        if min_tokens is None or not self.config.prefix_caching:
            return False
        # The tokens ``req`` would feed; its last one always runs (see _match_cached_prefix).
        prefix = req.token_ids[: len(req.token_ids) - 1]
        rank = req.queue_key[:2]
        shared = 0
        for producer in self.running:
            if len(producer.token_ids) - producer.num_computed <= 1 or producer.queue_key[:2] > rank:
                continue  # decoding (its prompt is cached), or less urgent: may be paused
            shared = max(shared, common_len(prefix, producer.token_ids))
        if shared < min_tokens:
            return False
        # The producer's chunks committed so far are cached already; only the rest counts.
        num_cached = len(self.cache.match_prefix(prefix[:shared])[0])
        return shared - num_cached >= min_tokens

    def _match_cached_prefix(self, req: Request) -> None:
        if not self.config.prefix_caching:
            req.num_cached_tokens = 0
            return
        # At least one token must run to produce logits, so never match the whole sequence.
        slots, node = self.cache.match_prefix(req.token_ids[: len(req.token_ids) - 1])
        self.cache.lock(node)
        req.node = node
        req.slots = slots
        req.num_computed = req.num_in_tree = len(slots)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = min(len(slots), req.num_prompt_tokens)

    def _reserve(self, req: Request, n: int, victims: list[Request]) -> bool:
        """Allocate slots for ``req``'s next ``n`` tokens: evict cache entries, then preempt
        ``victims`` from the back."""
        while True:
            slots = self.allocator.alloc(n)
            if slots is not None:
                req.slots.extend(slots)
                return True
            short = n - self.allocator.num_free
            if self.cache.evict(short) >= short:
                continue
            if not self._preempt_last(victims):
                return False

    def _preempt_last(self, victims: list[Request]) -> bool:
        """Preempt the last of ``victims`` still running (popping them); False if none is."""
        while victims:
            victim = victims.pop()
            if victim in self.running:
                self.preempt(victim)
                return True
        return False

    def preempt(self, req: Request) -> None:
        """Stop ``req`` for now; its computed KV stays in the cache for when it resumes."""
        self.running.remove(req)
        self.cache_computed(req)
        self._refresh_pins()
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
            self.num_prefill_tokens += n
            self.cache_computed(req)
        if batch.prefills:
            self._refresh_pins()

    def cache_computed(self, req: Request) -> None:
        """Put ``req``'s computed tokens into the radix cache and re-lock at the new end."""
        if req.num_computed <= req.num_in_tree or not self.config.prefix_caching:
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
            self._refresh_pins()
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    # ---- pinned prefixes -------------------------------------------------------
    def pin_prefix(self, pin_id: str, token_ids: Sequence[int]) -> None:
        """Keep the cached part of ``token_ids`` from eviction; later-cached parts join it."""
        self.unpin_prefix(pin_id)
        if self.config.prefix_caching:
            pin = _Pin(list(token_ids), self.cache.root)  # locking the root is a no-op
            self._pins[pin_id] = pin
            self._extend_pin(pin)

    def unpin_prefix(self, pin_id: str) -> None:
        pin = self._pins.pop(pin_id, None)
        if pin is not None:
            self.cache.unlock(pin.node)

    def _refresh_pins(self) -> None:
        # Called whenever KV enters the cache: a pinned prefix is protected once computed.
        for pin in self._pins.values():
            if pin.num_matched < len(pin.token_ids):
                self._extend_pin(pin)

    def _extend_pin(self, pin: _Pin) -> None:
        slots, node = self.cache.match_prefix(pin.token_ids)
        if len(slots) > pin.num_matched:  # never shorter: the matched path is locked
            self.cache.lock(node)
            self.cache.unlock(pin.node)
            pin.node, pin.num_matched = node, len(slots)
