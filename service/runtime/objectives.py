"""Objective deduction: from what the user fetches to how every call is scheduled.

A fetch names a criterion. It flows backwards to every ancestor call of the
fetched variable. Within that sub-graph each call gets a priority from the
critical path: the longest chain (by each call's output-token budget) through the
call to the fetched variable. Calls on the critical path get the most, since any
delay there delays the answer; off-path siblings have slack and get less.
Calls whose outputs feed one consumer form a task group, so the engine keeps them
together (they are only useful once all of them are done).
"""

from __future__ import annotations

from parrot.schemas import Criterion
from parrot.service.runtime.graph import Call, Variable

# Base priority per criterion; a call on the critical path adds PATH_WEIGHT.
_BASE = {Criterion.LATENCY: 100, Criterion.TTFT: 100, Criterion.THROUGHPUT: 0}
PATH_WEIGHT = 10


def objective_of(criterion: Criterion | None) -> str:
    """The engine's objective for a criterion (unfetched work runs as throughput)."""
    return "throughput" if criterion in (None, Criterion.THROUGHPUT) else "latency"


def _cost(call: Call) -> int:
    """A call's expected decode length: the token budget of its outputs (native calls: 1)."""
    return sum(out.sampling.max_tokens for out in call.generations) or 1


def ancestors(var: Variable) -> list[Call]:
    """Every call the value of ``var`` depends on, producers first (topological order)."""
    order: list[Call] = []
    seen: set[int] = set()

    def visit(call: Call) -> None:
        if id(call) in seen:
            return
        seen.add(id(call))
        for producer in call.producers:
            visit(producer)
        order.append(call)

    if var.producer is not None:
        visit(var.producer)
    return order


def apply_fetch(var: Variable, criterion: Criterion) -> list[Call]:
    """Propagate a fetch of ``var``; return the calls whose criterion or priority rose."""
    calls = ancestors(var)
    if not calls:
        return []
    members = {id(c) for c in calls}
    up: dict[int, int] = {}  # longest path from a source to the call, inclusive
    for call in calls:
        up[id(call)] = _cost(call) + max((up[id(p)] for p in call.producers if id(p) in members), default=0)
    down: dict[int, int] = {}  # longest path from the call to ``var``, inclusive
    for call in reversed(calls):
        feeds = [c for c in call.consumers if id(c) in members]
        down[id(call)] = _cost(call) + max((down[id(c)] for c in feeds), default=0)
    critical = max(up[id(c)] + down[id(c)] - _cost(c) for c in calls)
    changed = []
    for call in calls:
        through = up[id(call)] + down[id(call)] - _cost(call)
        priority = _BASE[criterion] + round(PATH_WEIGHT * through / critical)
        stronger = call.criterion is None or _BASE[criterion] > _BASE[call.criterion]
        if stronger or priority > call.priority:
            call.criterion = criterion if stronger else call.criterion
            call.priority = max(call.priority, priority)
            changed.append(call)
    return changed


def assign_task_groups(calls: list[Call]) -> None:
    """Calls feeding the same consumer form a group named after it (first consumer wins)."""
    for consumer in calls:
        producers = list(dict.fromkeys(p for p in consumer.producers if p.kind == "llm"))
        if len(producers) < 2:
            continue
        for producer in producers:
            if producer.group is None:
                producer.group = consumer.id
