"""HTTP routes of the native API (semantic variables); see parrot.schemas for the contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request, Response

from parrot import limits
from parrot.schemas import (
    CallDecl,
    CallInfo,
    Criterion,
    GraphAccepted,
    GraphInfo,
    GraphSubmit,
    SessionCreate,
    SessionInfo,
    VariableCreate,
    VariableInfo,
    VariableSet,
)
from parrot.service.api.auth import request_tenant
from parrot.service.api.http import sse_event, sse_response
from parrot.service.drain import Drain
from parrot.service.errors import FailedDependencyError
from parrot.service.runtime.graph import Variable
from parrot.service.runtime.sessions import SessionManager, call_info_of, variable_info

router = APIRouter(prefix="/v1", tags=["native"])

MAX_POLL_S = 300.0


def _sessions(request: Request) -> SessionManager:
    return request.app.state.sessions


def _drain(request: Request) -> Drain:
    return request.app.state.drain


@router.post("/sessions")
async def create_session(request: Request, body: SessionCreate | None = None) -> SessionInfo:
    session = _sessions(request).create(body.idle_timeout_s if body else None, request_tenant(request))
    return SessionInfo(id=session.id, idle_timeout_s=session.idle_timeout_s)


@router.delete("/sessions/{session_id}")
async def delete_session(request: Request, session_id: str) -> dict:
    _sessions(request).delete(session_id, request_tenant(request))
    return {"id": session_id, "deleted": True}


@router.post("/graphs", response_model=GraphAccepted)
async def submit_graph(request: Request, body: GraphSubmit) -> GraphAccepted | Response:
    sessions = _sessions(request)
    calls = sessions.submit(body, request_tenant(request))
    accepted = GraphAccepted(session_id=body.session_id, variables=[v.id for v in body.variables],
                             calls=calls)
    if not body.stream:
        return accepted
    session = sessions.get(body.session_id, None)
    waited = [session.graph.variable(f.var) for f in body.fetches if f.wait]
    return sse_response(_accepted_then_values(accepted, waited, _drain(request)))


async def _accepted_then_values(accepted: GraphAccepted, waited: list[Variable], drain: Drain,
                                ) -> AsyncIterator[str]:
    """A streamed submission's answer: ``{"accepted": ...}``, then ``{"variable": ..., "call": ...}``
    for each waited variable as it settles (with its value or error, and its producer's
    ``CallInfo``: token counts, finish reason), for up to ``limits.MAX_WAIT_S``; one not set
    by then, or nothing will set while the service drains, is left out."""
    yield sse_event({"accepted": accepted.model_dump()})
    waits = {asyncio.ensure_future(drain.fetch(_settled(v), v)): v for v in dict.fromkeys(waited)}
    try:
        pending = set(waits)
        deadline = asyncio.get_running_loop().time() + limits.MAX_WAIT_S
        while pending:
            left = deadline - asyncio.get_running_loop().time()
            done, pending = await asyncio.wait(pending, timeout=max(0.0, left),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return
            for task in done:
                var = waits[task]
                if not task.cancelled() and task.exception() is None and var.settled.is_set():
                    event: dict = {"variable": variable_info(var).model_dump()}
                    if var.producer is not None:
                        event["call"] = call_info_of(var.producer).model_dump()
                    yield sse_event(event)
    finally:
        for task in waits:
            task.cancel()


async def _settled(var: Variable) -> Variable:
    await var.settled.wait()
    return var


@router.post("/sessions/{session_id}/calls")
async def submit_call(request: Request, session_id: str, body: CallDecl) -> CallInfo:
    """One call at a time; its output variables are created if the session lacks them."""
    sessions = _sessions(request)
    session = sessions.get(session_id, request_tenant(request))
    sessions.submit(sessions.single_call_graph(session, body), session.tenant)
    return sessions.call_info(session, body.id)


@router.get("/sessions/{session_id}/calls/{call_id}")
async def get_call(request: Request, session_id: str, call_id: str) -> CallInfo:
    sessions = _sessions(request)
    return sessions.call_info(sessions.get(session_id, request_tenant(request)), call_id)


@router.post("/sessions/{session_id}/variables")
async def create_variable(request: Request, session_id: str, body: VariableCreate) -> VariableInfo:
    sessions = _sessions(request)
    var = sessions.get(session_id, request_tenant(request)).graph.add_variable(body.id, body.name, body.value)
    return variable_info(var)


@router.post("/sessions/{session_id}/variables/{var_id}")
async def set_variable(request: Request, session_id: str, var_id: str, body: VariableSet) -> VariableInfo:
    sessions = _sessions(request)
    var = sessions.set_variable(sessions.get(session_id, request_tenant(request)), var_id, body.value,
                                body.error)
    return variable_info(var)


@router.get("/sessions/{session_id}/variables/{var_id}")
async def get_variable(
    request: Request, session_id: str, var_id: str,
    criterion: Criterion | None = None,
    timeout: float = Query(30.0, ge=0.0, le=MAX_POLL_S),
) -> VariableInfo:
    sessions = _sessions(request)
    session = sessions.get(session_id, request_tenant(request))
    polled = session.graph.variable(var_id)  # 404 before any waiting
    # While draining, a poll of a variable nothing will produce ends at once (503).
    var = await _drain(request).fetch(sessions.fetch(session, var_id, criterion, timeout), polled)
    if var.error is not None:
        raise FailedDependencyError(var.error, param="var")
    return variable_info(var)


@router.get("/sessions/{session_id}/variables/{var_id}/stream")
async def stream_variable(
    request: Request, session_id: str, var_id: str, criterion: Criterion = Criterion.TTFT,
) -> Response:
    sessions = _sessions(request)
    session = sessions.get(session_id, request_tenant(request))
    var = session.graph.variable(var_id)
    drain = _drain(request)
    drain.refuse_idle(var)
    queue: asyncio.Queue = asyncio.Queue()
    var.subscribers.append(queue)
    # Text generated before this subscriber arrived goes first, then live deltas.
    backlog = var.value if var.ready else var.partial
    if var.settled.is_set():
        queue.put_nowait(("error", var.error) if var.error is not None else ("done", var.value))
    await sessions.fetch(session, var_id, criterion, timeout_s=0)

    async def events() -> AsyncIterator[str]:
        try:
            if backlog:
                yield sse_event({"delta": backlog})
            while True:
                # Once draining, a stream of a variable nothing will produce gets an error event.
                kind, payload = await drain.next_event(queue, var)
                if kind == "delta":
                    yield sse_event({"delta": payload})
                elif kind == "done":
                    yield sse_event({"done": True, "value": payload})
                    return
                else:
                    yield sse_event({"error": payload})
                    return
        finally:
            var.subscribers.remove(queue)

    # Closes the generator when the client disconnects, so its subscription goes too.
    return sse_response(events())


@router.get("/sessions/{session_id}/graph")
async def get_graph(request: Request, session_id: str) -> GraphInfo:
    sessions = _sessions(request)
    return sessions.graph_info(sessions.get(session_id, request_tenant(request)))
