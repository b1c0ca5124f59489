"""JSON views of sessions, their graphs and the engines, for ``/v1/observe`` and the dashboard.

No variable values or prompt text appear here: only ids, names, states, timings and token
counts. Times are wall clock seconds (``time.time``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parrot.service.dispatch.registry import EngineHandle
    from parrot.service.observe.observer import Observer
    from parrot.service.runtime.graph import Call
    from parrot.service.runtime.sessions import Session

CALL_STATES = ("pending", "running", "done", "failed", "cancelled")


def _end(call: Call, now: float) -> float | None:
    if call.finished is not None:
        return call.finished
    return now if call.started is not None else None


def critical_path(calls: Iterable[Call], now: float | None = None) -> list[str]:
    """The chain of calls that decides the graph's end-to-end time, first call first.

    Once calls have run it is read off the timings: from the call that ends last, step back
    each time to the producer that ended last (the input the call waited for), then forward
    through the longest chain of calls still pending. Before anything has run it is the
    longest chain of dependencies."""
    calls = list(calls)
    if not calls:
        return []
    now = time.time() if now is None else now
    members = {id(c) for c in calls}

    def producers(c: Call) -> list[Call]:
        return [p for p in c.producers if id(p) in members]

    def consumers(c: Call) -> list[Call]:
        return [x for x in c.consumers if id(x) in members]

    depth_below: dict[int, int] = {}

    def below(c: Call) -> int:  # calls on the longest chain from c down to a sink
        key = id(c)
        if key not in depth_below:
            depth_below[key] = 0  # guards a malformed cycle
            depth_below[key] = 1 + max((below(x) for x in consumers(c)), default=0)
        return depth_below[key]

    ended = [(e, c) for c in calls if (e := _end(c, now)) is not None]
    if ended:
        last = max(ended, key=lambda ec: ec[0])[1]
        back = [last]
        seen = {id(last)}
        while True:
            ps = [(e, p) for p in producers(back[-1])
                  if id(p) not in seen and (e := _end(p, now)) is not None]
            if not ps:
                break
            step = max(ps, key=lambda ep: ep[0])[1]
            seen.add(id(step))
            back.append(step)
        path = list(reversed(back))
        tail = last
        while True:
            nxt = [x for x in consumers(tail) if x.started is None and id(x) not in seen]
            if not nxt:
                break
            tail = max(nxt, key=below)
            seen.add(id(tail))
            path.append(tail)
        return [c.id for c in path]
    # Nothing ran yet: the longest chain, from the source whose chain is longest.
    sources = [c for c in calls if not producers(c)] or calls
    node = max(sources, key=below)
    path = [node]
    while consumers(node):
        node = max(consumers(node), key=below)
        path.append(node)
    return [c.id for c in path]


def call_view(call: Call, on_path: bool) -> dict[str, Any]:
    return {
        "id": call.id, "name": call.name, "kind": call.kind, "state": call.state,
        "criterion": call.criterion, "priority": call.priority, "group": call.group,
        "engine": call.engine_id, "error": call.error,
        "created": call.created, "started": call.started, "finished": call.finished,
        "prompt_tokens": call.prompt_tokens, "cached_tokens": call.cached_tokens,
        "output_tokens": call.output_tokens, "inputs": [v.id for v in call.inputs],
        "outputs": [v.id for v in call.outputs], "critical": on_path,
    }


def session_summary(session: Session, observer: Observer, *, deleted: bool = False) -> dict[str, Any]:
    calls = [c for c in session.graph.calls.values()]
    states = {s: 0 for s in CALL_STATES}
    for c in calls:
        states[c.state] += 1
    created = observer.session_created_at.get(session.id)
    first = min((c.created for c in calls), default=None)
    ends = [c.finished for c in calls if c.finished is not None]
    running = states["pending"] + states["running"] > 0
    if first is None:
        elapsed = None
    else:
        elapsed = (time.time() if running else max(ends, default=first)) - first
    return {
        "id": session.id, "tenant": session.tenant.name, "created": created or first,
        "deleted": deleted, "num_calls": len(calls), "states": states,
        "prompt_tokens": sum(c.prompt_tokens for c in calls),
        "cached_tokens": sum(c.cached_tokens for c in calls),
        "output_tokens": sum(c.output_tokens for c in calls),
        "elapsed_s": elapsed, "makespan_s": observer.makespans.get(session.id),
    }


def session_graph(session: Session, observer: Observer, *, deleted: bool = False) -> dict[str, Any]:
    """A session's DAG: calls, variables (no values), call-to-call edges and the critical path."""
    graph = session.graph
    path = critical_path(graph.calls.values())
    on_path = set(path)
    variables = [{"id": v.id, "name": v.name, "ready": v.ready, "error": v.error,
                  "producer": v.producer.id if v.producer else None,
                  "consumers": [c.id for c in v.consumers]} for v in graph.variables.values()]
    edges = [{"source": p.id, "target": c.id, "var": v.id} for p, c, v in graph.edges()]
    return {
        **session_summary(session, observer, deleted=deleted),
        "calls": [call_view(c, c.id in on_path) for c in graph.calls.values()],
        "variables": variables, "edges": edges, "critical_path": path,
    }


def engine_view(handle: EngineHandle, observer: Observer, since: float) -> dict[str, Any]:
    try:
        load: dict[str, Any] | None = vars(handle.engine.load()).copy()
    except Exception:  # noqa: BLE001 -- a view of a broken engine still shows it
        load = None
    records = [r for r in observer.requests if r.engine == handle.id and (r.ended or 0) >= since]
    records += [r for r in observer.active.values() if r.engine == handle.id]
    samples = [s for s in observer.load_samples.get(handle.id, ()) if s.t >= since]
    return {
        "id": handle.id, "kind": handle.kind, "model": handle.model, "url": handle.url,
        "up": handle.down is None and handle.engine.alive, "down": handle.down, "load": load,
        "requests": [r.as_dict() for r in records],
        "samples": [vars(s) for s in samples],
    }
