"""The graph that one run of a prompt function builds, shared by everything that runs inside it.

With graphs on (``enable_graphs``), the outermost prompt function's invocation opens one
Parrot session. Prompt functions it calls from its template (at any depth) do not wait
for their replies: each submits its call to that session and returns a placeholder for
the reply (see ``parrot.integrations.common.placeholders``). A connector asked for a reply
inside the scope submits its call to the same session, so the placeholders in its prompt
become input segments: edges of one graph, which the service runs in parallel where it can.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import parrot as P
from parrot.integrations.common.placeholders import Placeholders


@dataclass
class GraphScope:
    vm: P.Parrot  # the session every call of the run goes to
    model_name: str
    base_url: str | None  # the service of that session (None: the embedded one)
    placeholders: Placeholders  # the replies deferred so far, by variable id


_scope: ContextVar[GraphScope | None] = ContextVar("parrot_semantic_kernel_graph", default=None)


def current_scope() -> GraphScope | None:
    """The graph this code runs in, if any (asyncio tasks started inside inherit it)."""
    return _scope.get()


@contextmanager
def graph_scope(scope: GraphScope | None) -> Iterator[GraphScope | None]:
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)
