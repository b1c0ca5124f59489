"""Global scheduling: which engine runs a ready call.

Rules, in order:
1. Task group: a throughput call whose group already runs somewhere goes there too,
   so the group's members batch together (they are only useful once all are done)
   and other engines stay free for other work. A group someone waits for (latency)
   spreads instead, by the rules below: its consumer starts when its last member
   ends, so using every engine shortens the wait.
2. Objective and load: a latency call may only go to an engine with the fewest
   latency requests in flight (its per-token latency depends on how much latency
   work shares the batch); a throughput call to an engine whose requests in flight
   are within ``balance_slack`` of the least loaded one.
3. Prefix affinity: among those, the engine whose prefix cache probably holds the
   longest part of the prompt (at least ``min_affinity_tokens``), since prefill
   there is cheapest; ties go to the least loaded.

What an engine's cache holds is tracked here, per engine, from the prompts sent to
it and the outputs it served, bounded by its KV capacity (least recently used
forgotten first), in a ``PrefixIndex``. Every face goes through this: native calls
and OpenAI requests alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from parrot.service.dispatch.prefix_index import PrefixIndex
from parrot.service.dispatch.registry import EngineHandle

DEFAULT_CAPACITY_TOKENS = 1 << 20  # until an engine reports its KV size


@dataclass
class EngineStats:
    """What this service has in flight on one engine, and what its cache holds."""

    index: PrefixIndex = field(default_factory=PrefixIndex)
    latency: int = 0
    throughput: int = 0

    @property
    def total(self) -> int:
        return self.latency + self.throughput


class GlobalScheduler:
    def __init__(self, *, balance_slack: int = 4, min_affinity_tokens: int = 32) -> None:
        self.balance_slack = balance_slack
        self.min_affinity_tokens = min_affinity_tokens
        self.stats: dict[str, EngineStats] = {}
        self._groups: dict[str, str] = {}  # group id -> engine id of its first member

    def _stats(self, handle: EngineHandle) -> EngineStats:
        return self.stats.setdefault(handle.id, EngineStats())

    # ---- decisions ---------------------------------------------------------------------
    def place(self, candidates: Sequence[EngineHandle], tokens: Sequence[int], objective: str,
              group: str | None = None, *, record: bool = True) -> EngineHandle:
        """The engine for a request; ``record=False`` only asks (a group keeps no engine)."""
        if not candidates:
            raise ValueError("no engine to place on")
        by_id = {h.id: h for h in candidates}
        if group is not None and objective != "latency" and self._groups.get(group) in by_id:
            return by_id[self._groups[group]]
        if objective == "latency":
            fewest = min(self._stats(h).latency for h in candidates)
            eligible = [h for h in candidates if self._stats(h).latency == fewest]
        else:
            least = min(self._stats(h).total for h in candidates)
            eligible = [h for h in candidates if self._stats(h).total <= least + self.balance_slack]

        def key(h: EngineHandle) -> tuple[int, int]:
            matched = self._stats(h).index.match(tokens)
            return (-matched if matched >= self.min_affinity_tokens else 0, self._stats(h).total)

        chosen = min(eligible, key=key)
        if group is not None and record:
            self._groups[group] = chosen.id
        return chosen

    def affinity(self, handle: EngineHandle, tokens: Sequence[int]) -> int:
        return self._stats(handle).index.match(tokens)

    # ---- bookkeeping -------------------------------------------------------------------
    def begin(self, handle: EngineHandle, objective: str, tokens: Sequence[int] = ()) -> None:
        """Count a request in flight on ``handle``; ``tokens``, if given, will be in that
        engine's cache (else ``sent`` says so when the request is sent)."""
        stats = self._stats(handle)
        if tokens:
            self.sent(handle, tokens)
        if objective == "latency":
            stats.latency += 1
        else:
            stats.throughput += 1

    def end(self, handle: EngineHandle, objective: str) -> None:
        stats = self.stats.get(handle.id)
        if stats is None:  # the engine left meanwhile
            return
        if objective == "latency":
            stats.latency -= 1
        else:
            stats.throughput -= 1

    def retarget(self, handle: EngineHandle, old: str, new: str) -> None:
        """A request in flight on ``handle`` changed objective (its result was fetched)."""
        if old != new and handle.id in self.stats:
            self.end(handle, old)
            stats = self.stats[handle.id]
            if new == "latency":
                stats.latency += 1
            else:
                stats.throughput += 1

    def sent(self, handle: EngineHandle, tokens: Sequence[int]) -> None:
        capacity = handle.engine.load().kv_tokens_total or DEFAULT_CAPACITY_TOKENS
        self._stats(handle).index.add(tokens, capacity)

    def cache_hit(self, handle: EngineHandle, tokens: Sequence[int], expected: int, cached: int) -> None:
        """``handle`` served ``cached`` tokens of ``tokens`` from its cache where ``expected`` were
        recorded: it evicted the rest, so forget that (the prompt itself is cached again now)."""
        stats = self.stats.get(handle.id)
        if stats is not None and cached + 1 < expected:  # an engine recomputes a prompt's last token
            stats.index.forget_after(tokens, cached)
            self.sent(handle, tokens)

    def group_done(self, group: str) -> None:
        self._groups.pop(group, None)

    def forget(self, handle: EngineHandle) -> None:
        """An engine left: its cache and its groups are gone."""
        self.stats.pop(handle.id, None)
        for group, engine_id in list(self._groups.items()):
            if engine_id == handle.id:
                del self._groups[group]
