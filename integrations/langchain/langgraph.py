"""LangGraph supersteps: the parallel ``ChatParrot`` calls of one step reach the service as one graph.

LangGraph runs the tasks of a superstep together (the nodes triggered at once, the
``Send`` fan-out of a map step): in threads under ``invoke``, as tasks under ``ainvoke``.
Each task that calls a ``ChatParrot`` would open a session of its own; instead, a call
made inside a step joins the step's shared session. The step is known from the
config LangGraph sets for its nodes: ``langgraph_step`` in the metadata, and the
runtime's checkpoint id, which LangGraph makes afresh for every step of every graph
run, so two runs of one graph never share a session.

Every invocation still submits its own call and waits for its own reply; only the
moment the calls are posted changes. A session posts what it holds as soon as someone
waits, so an invocation holds its wait until the step's calls have gathered: until
every invocation that joined has submitted its call and no other has joined for
``GATHER_QUIET_S`` (never longer than ``GATHER_MAX_S`` after the first joined). A call
that joins later (a node's second call, a task the thread pool started late) starts
the next gathering in the same session. The last invocation to leave closes the
session, which cancels whatever its calls left running; an invocation that fails or is
cancelled leaves it like any other.

Outside LangGraph nothing changes: an invocation opens its own session and waits at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from langchain_core.runnables.config import var_child_runnable_config

import parrot as P
from parrot.errors import ParrotError
from parrot.integrations.langchain.base import ParrotModelFields

GATHER_QUIET_S = 0.005  # no new call for this long: the step's parallel calls have all arrived
GATHER_MAX_S = 0.2  # the longest a call is held back for the others of its step
_POLL_S = 0.002  # while a joined invocation is still building its call

StepKey = tuple[Hashable, ...]


@dataclass
class _Gathering:
    """Calls of one step that go to the service together."""

    first: float  # when the first joined
    last: float  # the latest join or submit
    pending: int = 0  # joined, call not submitted yet
    released: bool = False

    def hold_s(self, now: float) -> float:
        """How much longer to hold the wait back (0: post now)."""
        if self.released:
            return 0.0
        left = self.first + GATHER_MAX_S - now
        if left <= 0:
            return 0.0
        if self.pending:
            return min(_POLL_S, left)
        return min(self.last + GATHER_QUIET_S - now, left)


@dataclass(eq=False)
class _StepSession:
    key: StepKey
    refs: int = 0
    opened: concurrent.futures.Future[tuple[P.Parrot, str]] = field(default_factory=concurrent.futures.Future)
    exits: ExitStack = field(default_factory=ExitStack)
    gathering: _Gathering | None = None


@dataclass(eq=False)
class _Member:
    step: _StepSession
    gathering: _Gathering
    submitted: bool = False


# The steps with invocations in flight: a meeting point for calls from any model object, thread
# or task of a step (an entry lives only while one of them runs).
_lock = threading.Lock()
_steps: dict[StepKey, _StepSession] = {}


def step_key(model: ParrotModelFields, requested: str | None) -> StepKey | None:
    """The LangGraph step this code runs in and the service it talks to; None outside LangGraph."""
    config = var_child_runnable_config.get() or {}
    metadata = config.get("metadata") or {}
    if "langgraph_step" not in metadata:
        return None
    try:
        from langgraph.runtime import get_runtime

        info = get_runtime().execution_info
    except (ImportError, RuntimeError, AttributeError):
        return None
    if info is None:
        return None
    parent_ns = info.checkpoint_ns.rpartition("|")[0]  # a subgraph's steps are its own
    embedded = model.model if model.base_url is None else None
    return (info.checkpoint_id, parent_ns, metadata["langgraph_step"], model.base_url, embedded,
            model._sessions().api_key, requested)


@contextmanager
def step_session(model: ParrotModelFields,
                 requested: str | None) -> Iterator[tuple[P.Parrot, str, Callable[[], None]]]:
    """The session an invocation's call goes to, its model's name, and ``gathered()``: call it
    once the call is submitted; it returns when the invocation may wait for its reply."""
    key = step_key(model, requested)
    if key is None:
        with model.session(requested) as (vm, model_name):
            yield vm, model_name, _now
        return
    member, opens = _join(key)
    try:
        if opens:
            _open(member.step, model, requested)
        vm, model_name = _opened(member.step, opens)
        yield vm, model_name, lambda: _gathered(member)
    finally:
        if _leave(member):
            _close(member.step)


@asynccontextmanager
async def astep_session(model: ParrotModelFields, requested: str | None,
                        ) -> AsyncIterator[tuple[P.Parrot, str, Callable[[], Awaitable[None]]]]:
    """``step_session`` for async code."""
    key = step_key(model, requested)
    if key is None:
        async with model.asession(requested) as (vm, model_name):
            yield vm, model_name, _anow
        return
    member, opens = _join(key)
    try:
        if opens:  # in a thread of its own: a cancelled opener still leaves an open session to close
            asyncio.get_running_loop().run_in_executor(None, _open, member.step, model, requested)
        with contextlib.suppress(Exception):  # its error is raised by _opened
            await asyncio.shield(asyncio.wrap_future(member.step.opened))
        vm, model_name = _opened(member.step, opens)
        yield vm, model_name, lambda: _agathered(member)
    finally:
        if _leave(member):
            await asyncio.shield(asyncio.to_thread(_close, member.step))


# ---- membership ---------------------------------------------------------------------------
def _join(key: StepKey) -> tuple[_Member, bool]:
    """Join the step's session (and its open gathering); True if this invocation must open it."""
    with _lock:
        step = _steps.get(key)
        opens = step is None
        if step is None:
            step = _steps[key] = _StepSession(key)
        step.refs += 1
        now = time.monotonic()
        if step.gathering is None or step.gathering.released:
            step.gathering = _Gathering(first=now, last=now)
        step.gathering.pending += 1
        step.gathering.last = now
        return _Member(step, step.gathering), opens


def _leave(member: _Member) -> bool:
    """Leave the session; True if this was its last invocation (then it must be closed)."""
    with _lock:
        if not member.submitted:
            member.gathering.pending -= 1
        step = member.step
        step.refs -= 1
        if step.refs:
            return False
        if _steps.get(step.key) is step:
            del _steps[step.key]
        return True


def _submitted(member: _Member) -> None:
    with _lock:
        if not member.submitted:
            member.submitted = True
            member.gathering.pending -= 1
            member.gathering.last = time.monotonic()


def _hold_s(member: _Member) -> float:
    with _lock:
        hold = member.gathering.hold_s(time.monotonic())
        if hold <= 0:
            member.gathering.released = True
        return hold


def _gathered(member: _Member) -> None:
    _submitted(member)
    while (hold := _hold_s(member)) > 0:
        time.sleep(hold)


async def _agathered(member: _Member) -> None:
    _submitted(member)
    while (hold := _hold_s(member)) > 0:
        await asyncio.sleep(hold)


def _now() -> None:
    return None


async def _anow() -> None:
    return None


# ---- the session itself -------------------------------------------------------------------
def _open(step: _StepSession, model: ParrotModelFields, requested: str | None) -> None:
    """Open the step's session with ``model``'s settings; a failure is every member's."""
    try:
        opened = step.exits.enter_context(model.session(requested))
    except BaseException as exc:
        with _lock:
            if _steps.get(step.key) is step:
                del _steps[step.key]  # later calls of the step try again
        step.opened.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
    else:
        with _lock:
            gathering = step.gathering
            if gathering is not None and not gathering.released:  # the members waited for the opening:
                gathering.first = gathering.last = time.monotonic()  # the gathering starts now
        step.opened.set_result(opened)


def _opened(step: _StepSession, opener: bool) -> tuple[P.Parrot, str]:
    """The open session; raises the opening's error (each member its own copy of it)."""
    try:
        return step.opened.result()
    except Exception as exc:
        if opener:
            raise
        raise ParrotError(f"could not open the Parrot session of this LangGraph step: {exc}") from exc


def _close(step: _StepSession) -> None:
    if step.opened.exception() is None:  # (waits for an opening still under way)
        step.exits.close()


def live_steps() -> int:
    """How many step sessions are open or opening in this process."""
    with _lock:
        return len(_steps)
