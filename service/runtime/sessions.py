"""Sessions of the native API: each owns a graph; idle ones are deleted after a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from parrot.schemas import (
    CallDecl,
    CallInfo,
    CallTimings,
    Criterion,
    EdgeInfo,
    GraphInfo,
    GraphSubmit,
    OutputSegment,
    VariableDecl,
    VariableInfo,
)
from parrot.service.errors import ConflictError, NotFoundError
from parrot.service.runtime.executor import Executor
from parrot.service.runtime.graph import Call, SessionGraph, Variable, call_variable_ids
from parrot.service.runtime.objectives import apply_fetch, assign_task_groups
from parrot.service.tenancy import Tenant

DEFAULT_IDLE_TIMEOUT_S = 3600.0


class Session:
    def __init__(self, session_id: str, idle_timeout_s: float, tenant: Tenant | None = None) -> None:
        self.id = session_id
        self.tenant = tenant or Tenant("default")  # its owner: only it can see the session
        self.idle_timeout_s = idle_timeout_s
        self.graph = SessionGraph()
        self.last_active = time.monotonic()
        self.deleted = False

    def touch(self) -> None:
        self.last_active = time.monotonic()


def variable_info(var: Variable) -> VariableInfo:
    return VariableInfo(id=var.id, name=var.name, ready=var.ready, value=var.value, error=var.error,
                        producer=var.producer.id if var.producer else None)


class SessionManager:
    def __init__(self, executor: Executor, default_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self.executor = executor
        self.default_idle_timeout_s = default_idle_timeout_s
        self.sessions: dict[str, Session] = {}
        self._reaper: asyncio.Task | None = None
        self.observer = executor.dispatcher.observer

    # ---- lifecycle ------------------------------------------------------------------
    def create(self, idle_timeout_s: float | None = None, tenant: Tenant | None = None,
               session_id: str | None = None) -> Session:
        """A new session owned by ``tenant`` (429 over its max_sessions or tokens_per_minute),
        with ``session_id`` if the client chose one (409 if that id is in use)."""
        if session_id is not None and session_id in self.sessions:
            raise ConflictError(f"session id {session_id!r} is in use; choose another", param="session_id")
        if tenant is not None:
            tenant.check_session()
        session = Session(session_id or uuid.uuid4().hex, idle_timeout_s or self.default_idle_timeout_s,
                          tenant)
        self.sessions[session.id] = session
        session.tenant.open_sessions += 1
        if self.observer is not None:
            self.observer.session_created(session)
        return session

    def get(self, session_id: str, tenant: Tenant | None) -> Session:
        """The session, if ``tenant`` owns it; another tenant's session is a 404 exactly like
        an unknown id. ``None`` is the service itself (no owner check)."""
        session = self.sessions.get(session_id)
        if session is None or (tenant is not None and session.tenant is not tenant):
            raise NotFoundError(f"session {session_id!r} not found", param="session_id")
        session.touch()
        return session

    def delete(self, session_id: str, tenant: Tenant | None = None) -> None:
        """Cancel the session's unfinished calls (aborting their engine requests) and drop it."""
        session = self.get(session_id, tenant)
        del self.sessions[session_id]
        session.deleted = True
        session.tenant.open_sessions -= 1
        for call in session.graph.calls.values():
            self.executor.cancel(call, "the session was deleted")
        for var in session.graph.variables.values():
            var.fail("the session was deleted")
        if self.observer is not None:
            self.observer.session_deleted(session)

    async def start(self, interval_s: float = 1.0) -> None:
        async def reap() -> None:
            while True:
                await asyncio.sleep(interval_s)
                now = time.monotonic()
                for session in list(self.sessions.values()):
                    if now - session.last_active > session.idle_timeout_s:
                        self.delete(session.id)

        self._reaper = asyncio.create_task(reap())

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for session_id in list(self.sessions):
            self.delete(session_id)

    # ---- graph operations ------------------------------------------------------------
    def submit(self, graph: GraphSubmit, tenant: Tenant | None = None) -> list[str]:
        """Add ``graph`` to its session (opened by it, with ``open_session``: a refused graph
        leaves no session behind) and start what can run; the new calls' ids."""
        if graph.open_session is None:
            return self._submit(graph, self.get(graph.session_id, tenant))
        session = self.create(graph.open_session.idle_timeout_s, tenant, graph.session_id)
        try:
            return self._submit(graph, session)
        except BaseException:
            self.delete(session.id)
            raise

    def _submit(self, graph: GraphSubmit, session: Session) -> list[str]:
        owner = session.tenant
        llm = [d for d in graph.calls if d.kind == "llm"]
        for decl in llm:  # per-call limits, before anything is added
            outputs = [s for s in decl.segments if isinstance(s, OutputSegment)]
            outputs += [decl.output] if decl.output is not None else []
            owner.check_max_tokens(sum(o.sampling.max_tokens for o in outputs), param="sampling.max_tokens")
        owner.check_calls(len(llm))
        static_prefixes = self.executor.prepare(graph.calls)
        for prefix in static_prefixes.values():  # the whole prompt is checked when it runs
            owner.check_prompt(len(prefix), param="segments")
        declared = {v.id for v in graph.variables}
        for fetch in graph.fetches:  # an unknown id is refused before anything is added
            if fetch.var not in declared:
                session.graph.variable(fetch.var)
        calls = session.graph.add(graph)
        for call in calls:
            call.tenant = owner
        if self.observer is not None:
            self.observer.calls_added(session, calls)
        owner.calls_submitted(c for c in calls if c.kind == "llm")
        assign_task_groups(calls)
        for fetch in graph.fetches:  # before the new calls launch, so each is placed for its objective
            for call in apply_fetch(session.graph.variable(fetch.var), fetch.criterion):
                if call.state == "running":  # from an earlier submission
                    self.executor.reprioritize_soon(call)
        self.executor.calls_added(calls, static_prefixes)
        return [c.id for c in calls]

    def set_variable(self, session: Session, var_id: str, value: str | None, error: str | None) -> Variable:
        var = session.graph.variable(var_id)
        if var.producer is not None and var.producer.kind == "llm":
            raise ConflictError(f"variable {var_id!r} is produced by call {var.producer.id!r}; "
                                "only its producer sets it")
        if var.settled.is_set():
            raise ConflictError(f"variable {var_id!r} is already set")
        if (value is None) == (error is None):
            raise ConflictError("set exactly one of value and error")
        if value is not None:
            var.set(value)
        else:
            var.fail(error or "")
        self.executor.variable_settled(var)
        return var

    async def fetch(self, session: Session, var_id: str, criterion: Criterion | None,
                    timeout_s: float) -> Variable:
        """Wait up to ``timeout_s`` for a value; a criterion first re-ranks every ancestor call."""
        var = session.graph.variable(var_id)
        if criterion is not None:
            for call in apply_fetch(var, criterion):
                await self.executor.reprioritize(call)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(var.settled.wait(), timeout_s)
        if session.deleted:
            raise NotFoundError(f"session {session.id!r} was deleted", param="session_id")
        session.touch()
        return var

    @staticmethod
    def single_call_graph(session: Session, call: CallDecl) -> GraphSubmit:
        """A one-call graph that also declares the call's outputs the session does not have yet."""
        _, outputs = call_variable_ids(call)
        new = [VariableDecl(id=v) for v in dict.fromkeys(outputs) if v not in session.graph.variables]
        return GraphSubmit(session_id=session.id, variables=new, calls=[call])

    def call_info(self, session: Session, call_id: str) -> CallInfo:
        call = session.graph.calls.get(call_id)
        if call is None:
            raise NotFoundError(f"call {call_id!r} not found in this session", param="call_id")
        return call_info_of(call)

    def graph_info(self, session: Session) -> GraphInfo:
        graph = session.graph
        edges = [EdgeInfo(source=p.id, target=c.id, var=v.id) for p, c, v in graph.edges()]
        return GraphInfo(session_id=session.id, calls=[call_info_of(c) for c in graph.calls.values()],
                         variables=[variable_info(v) for v in graph.variables.values()], edges=edges)


def call_info_of(c: Call) -> CallInfo:
    """What the API shows of a call (``CallInfo``)."""
    return CallInfo(
        id=c.id, name=c.name, kind=c.kind, state=c.state,
        inputs=[v.id for v in c.inputs], outputs=[v.id for v in c.outputs],
        criterion=c.criterion, priority=c.priority, group=c.group, error=c.error,
        timings=CallTimings(created=c.created, started=c.started, first_token=c.first_token,
                            finished=c.finished),
        prompt_tokens=c.prompt_tokens, cached_tokens=c.cached_tokens, engine=c.engine_id,
        output_tokens=c.output_tokens, finish_reason=c.finish_reason,
    )
