"""Automatic graphs: a chain that uses ``ChatParrot`` sends its calls ahead, with no ``compile``.

A callback handler that LangChain attaches to every run in the process (through
``register_configure_hook``) notes, for each chain run whose runnable holds a
``ChatParrot``, its runs as they start: which run is whose parent, and each run's
position in its parent (the ``seq:step:N`` / ``map:key:K`` tags LangChain gives child
runs). A ``ChatParrot`` call in such a run finds its node in the chain from that path
and asks one question: does its reply only flow, through steps that carry text
verbatim (``StrOutputParser``, prompt templates, passthrough, parallel and assign
steps), into other ``ChatParrot`` calls? Then it submits its call in the run's session
and returns a placeholder (see ``deferred.py``), so the calls that consume it are
submitted at once too, with edges to it. Any other reply, one that reaches a lambda,
another parser or the chain's output, is waited for, so every step that reads text
reads the real text, and the chain's result is exactly what it is without Parrot.
The run's session closes when the root run ends.

The root runnable itself is not passed to callbacks; the handler finds it as the
``self`` of the innermost runnable method on the stack when the root run starts.
"""

from __future__ import annotations

import re
import sys
import threading
from contextlib import ExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import BasePromptTemplate
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableParallel,
    RunnablePassthrough,
    RunnableSequence,
)
from langchain_core.runnables.base import RunnableEach
from langchain_core.runnables.passthrough import RunnableAssign, RunnablePick
from langchain_core.tracers.context import register_configure_hook

import parrot as P
from parrot.integrations.langchain.deferred import DeferredScope

_POSITION = re.compile(r"^(seq:step:\d+|map:key:.+)$")


@dataclass
class _Run:
    root: UUID
    parent: UUID | None
    position: str | None  # its tag in the parent: seq:step:N, map:key:K, or none (assign, map)


@dataclass
class _Root:
    runnable: Runnable
    model: Any  # the first ChatParrot in it: opens the run's session
    criterion: P.Criterion
    scope: DeferredScope | None = None
    exits: ExitStack = field(default_factory=ExitStack)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ChainTracker(BaseCallbackHandler):
    """Follows chain runs that hold a ``ChatParrot`` (cheap for any other run: one lookup)."""

    run_inline = True  # in the caller's frame: the root runnable is on its stack

    def __init__(self) -> None:
        self._runs: dict[UUID, _Run] = {}
        self._roots: dict[UUID, _Root] = {}
        self._lock = threading.Lock()

    # ---- LangChain events ---------------------------------------------------------------
    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                       tags: list[str] | None = None, **kwargs: Any) -> None:
        if parent_run_id is None:
            self._start_root(run_id, criterion=P.LATENCY)
        else:
            self._child(run_id, parent_run_id, tags)

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            **kwargs: Any) -> None:
        if parent_run_id is not None:
            self._child(run_id, parent_run_id, tags)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    # ---- bookkeeping ----------------------------------------------------------------------
    def _start_root(self, run_id: UUID, criterion: P.Criterion) -> None:
        from parrot.integrations.langchain.chat_models import ChatParrot
        from parrot.integrations.langchain.compiler import CompiledChain, _parrot_models
        from parrot.integrations.langchain.deferred import current_scope

        if current_scope() is not None:
            return  # a compiled chain defers on its own
        runnable = _caller_runnable()
        if runnable is None or isinstance(runnable, CompiledChain | ChatParrot):
            return
        model = next((m for m in _parrot_models(runnable) if isinstance(m, ChatParrot)), None)
        if model is None:
            return
        with self._lock:
            self._roots[run_id] = _Root(runnable, model, criterion)
            self._runs[run_id] = _Run(run_id, None, None)

    def _child(self, run_id: UUID, parent_run_id: UUID, tags: list[str] | None) -> None:
        parent = self._runs.get(parent_run_id)
        if parent is None:
            return
        position = next((t for t in tags or () if _POSITION.match(t)), None)
        with self._lock:
            self._runs[run_id] = _Run(parent.root, parent_run_id, position)

    def _end(self, run_id: UUID) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
            root = self._roots.pop(run_id, None) if run is not None and run.parent is None else None
        if root is not None:
            with root.lock:
                root.exits.close()  # the run's session: every deferred reply has been read by now
            with self._lock:
                for rid in [r for r, v in self._runs.items() if v.root == run_id]:
                    del self._runs[rid]

    # ---- what a ChatParrot call asks ----------------------------------------------------------
    def follows(self, run_id: UUID | None) -> bool:
        return run_id is not None and run_id in self._runs

    def scope_for(self, model: Any, parent_run_id: UUID | None,
                  tags: list[str] | None) -> tuple[DeferredScope, bool] | None:
        """The session of the chain run ``model``'s call belongs to (opened on first use), and
        whether its reply may be deferred; None outside a followed chain run, or for a model of
        another service than the run's."""
        parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
        root = self._roots.get(parent.root) if parent is not None else None
        if parent is None or root is None or model.base_url != root.model.base_url:
            return None
        position = next((t for t in tags or () if _POSITION.match(t)), None)
        path = [position]
        run: _Run | None = parent
        while run is not None and run.parent is not None:
            path.append(run.position)
            run = self._runs.get(run.parent)
        defer = may_defer(root.runnable, list(reversed(path)), root.model.base_url)
        with root.lock:
            if root.scope is None:
                vm, model_name = root.exits.enter_context(root.model.session())
                root.scope = DeferredScope(vm, model_name, root.criterion)
        return root.scope, defer


def _caller_runnable() -> Runnable | None:
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Runnable):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


# ---- where a reply flows ---------------------------------------------------------------------
def _unwrap(node: Any) -> Any:
    while isinstance(node, RunnableBinding):
        node = node.bound
    return node


def _child_node(node: Any, position: str | None) -> Any:
    node = _unwrap(node)
    if isinstance(node, RunnableSequence) and position and position.startswith("seq:step:"):
        index = int(position.rsplit(":", 1)[1]) - 1
        return node.steps[index] if 0 <= index < len(node.steps) else None
    if isinstance(node, RunnableParallel) and position and position.startswith("map:key:"):
        return node.steps__.get(position[len("map:key:"):])
    if isinstance(node, RunnableAssign) and position is None:
        return node.mapper
    if isinstance(node, RunnableEach) and position is None:
        return node.bound
    return None


def may_defer(root: Runnable, path: list[str | None], service: str | None) -> bool:
    """Whether the reply of the model at ``path`` (positions from the root) only reaches other
    Parrot chat calls of ``service``, through steps that carry it verbatim."""
    from parrot.integrations.langchain.chat_models import ChatParrot

    nodes = [root]
    for position in path:
        child = _child_node(nodes[-1], position)
        if child is None:
            return False
        nodes.append(child)
    if not isinstance(_unwrap(nodes[-1]), ChatParrot):
        return False
    loc: list[str] = []  # where the reply is inside the current value: [] itself, [k] under key k
    kind = "message"
    for depth in range(len(nodes) - 1, 0, -1):
        parent, position = _unwrap(nodes[depth - 1]), path[depth - 1]
        if isinstance(parent, RunnableSequence):
            index = int(str(position).rsplit(":", 1)[1])
            verdict = _flow(parent.steps[index:], loc, kind, service)
            if verdict is True or verdict is False:
                return verdict
            loc, kind = verdict
        elif isinstance(parent, RunnableParallel):
            loc = [str(position)[len("map:key:"):], *loc]
        elif isinstance(parent, RunnableAssign):
            continue  # the mapper's keys join the input's
        else:
            return False  # inside a list (map) or anything else: it may be read there
    return False  # it reaches the chain's output


Verdict = bool | tuple[list[str], str]


def _flow(steps: list[Any], loc: list[str], kind: str, service: str | None) -> Verdict:
    """Follow the reply (at ``loc``, a ``kind``) through ``steps``: True once a Parrot call
    consumes it or it is dropped, False once a step may read it, else where it ends up."""
    from parrot.integrations.langchain.chat_models import ChatParrot
    from parrot.integrations.langchain.compiler import _verbatim

    for step in steps:
        step = _unwrap(step)
        if isinstance(step, ChatParrot):
            return not loc and kind in ("str", "prompt", "message") and step.base_url == service
        if kind == "prompt":
            return False  # a prompt value goes anywhere but a model: it may be read
        if isinstance(step, StrOutputParser):
            if loc or kind != "message":
                return False
            kind = "str"
        elif isinstance(step, BasePromptTemplate):
            if kind != "str" or not _verbatim(step):
                return False
            variables = set(step.input_variables)
            if loc and loc[0] not in variables:
                return True  # the template does not use it
            if len(loc) > 1 or (not loc and len(variables) != 1):
                return False
            loc, kind = [], "prompt"
        elif isinstance(step, RunnablePick):
            keys = [step.keys] if isinstance(step.keys, str) else list(step.keys)
            if not loc:
                return False
            if loc[0] not in keys:
                return True
            if isinstance(step.keys, str):
                loc = loc[1:]
        elif isinstance(step, RunnablePassthrough) and step.func is None and step.afunc is None:
            continue
        elif isinstance(step, RunnableAssign | RunnableParallel):
            branches = step.mapper.steps__ if isinstance(step, RunnableAssign) else step.steps__
            carried = []
            for key, branch in branches.items():
                verdict = _flow([branch], loc, kind, service)
                if verdict is False:
                    return False
                if verdict is not True:
                    carried.append([key, *verdict[0]])
            if isinstance(step, RunnableAssign):
                carried.append(loc)  # the input's keys stay
            if not carried:
                return True
            if len(carried) > 1:
                return False  # copies down several paths: kept simple, read for real
            loc = carried[0]
        elif isinstance(step, RunnableSequence):
            verdict = _flow(list(step.steps), loc, kind, service)
            if verdict is True or verdict is False:
                return verdict
            loc, kind = verdict
        else:
            return False
    return loc, kind


_TRACKER = ChainTracker()
_tracker_var: ContextVar[ChainTracker | None] = ContextVar("parrot_langchain_tracker", default=_TRACKER)
register_configure_hook(_tracker_var, inheritable=True)


def tracker() -> ChainTracker:
    return _TRACKER
