"""Draining: how the service stops without dropping the work it accepted.

``Drain.run`` (``app.state.drain``; ``parrot serve`` calls it on SIGTERM/SIGINT):

1. From the first moment, requests that would start work (any POST/PUT/PATCH under ``/v1``
   but the engine routes) get a 503 with ``Retry-After`` and an OpenAI-shaped error, code
   ``draining``. Reads, fetches and session deletes still work, so clients can collect the
   results of what is running.
2. It waits, up to the drain timeout, for in-flight work: running LLM calls (and the calls
   they unblock) and open requests (OpenAI generations, fetches of variables being produced).
   A long-poll or SSE stream on a variable that nothing running will produce (one waiting on
   a client's input) is idle: it does not hold the drain, it ends at once (503, or an error
   event on a stream).
3. Whatever is left is cancelled with ``SHUTDOWN_MESSAGE``: unfinished calls fail with it
   (their fetches and streams answer with it), and open requests are cut: a 503 if nothing was
   sent yet, a last ``error`` event on an event stream.

Engine routes (heartbeats of engine processes) are never refused: the calls running on those
engines need them alive until the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parrot.service.api.http import sse_event
from parrot.service.errors import ErrorInfo, ServiceUnavailableError, error_response
from parrot.service.runtime.graph import Variable
from parrot.service.runtime.sessions import SessionManager

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0
RETRY_AFTER_S = 5  # a client should try again elsewhere, or here once a new instance is up
# After cancelling, how long fetches and streams get to answer with the cause themselves
# before their requests are cut.
CUT_GRACE_S = 1.0

DRAINING_MESSAGE = ("the service is draining (shutting down): it finishes the work it has and "
                    "takes no new requests; retry against another instance")
SHUTDOWN_MESSAGE = "the service shut down before this call finished"
SHUTDOWN_REQUEST_MESSAGE = "the service shut down before this request finished"

_STARTS_WORK = frozenset({"POST", "PUT", "PATCH"})
_WAKE = "drain"  # the event that wakes a waiting variable stream when the drain begins


class ServiceDrainingError(ServiceUnavailableError):
    """A request that would start work (or wait for work that never comes) while draining."""

    code = "draining"

    def __init__(self, message: str = DRAINING_MESSAGE) -> None:
        super().__init__(message)


def draining_response() -> JSONResponse:
    resp = error_response(ServiceDrainingError().to_info(), ServiceDrainingError.status_code)
    resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    resp.headers["Connection"] = "close"  # so a client or balancer reconnects elsewhere
    return resp


def install_drain(app: FastAPI, drain: Drain) -> None:
    """Put ``drain`` on ``app.state.drain``, refuse work while it runs, and answer
    ``ServiceDrainingError`` with ``Retry-After``."""
    app.state.drain = drain

    async def _draining(_: Request, exc: Exception) -> JSONResponse:
        return draining_response()

    app.add_exception_handler(ServiceDrainingError, _draining)
    app.add_middleware(DrainMiddleware, drain=drain)


def produced_without_client(var: Variable) -> bool:
    """Whether ``var`` settles without anything more from a client: it is settled, or an
    unfinished LLM call produces it whose inputs all settle that way too (the calls running
    now and those they unblock)."""
    verdict: dict[int, bool] = {}
    stack: list[Variable] = [var]
    while stack:  # iterative: graphs can be deep chains
        v = stack[-1]
        if id(v) in verdict:
            stack.pop()
            continue
        producer = v.producer
        if v.settled.is_set():
            verdict[id(v)] = True
        elif producer is None or producer.kind != "llm" or producer.is_terminal:
            verdict[id(v)] = False
        else:
            pending = [i for i in producer.inputs if id(i) not in verdict]
            if pending:
                stack.extend(pending)
                continue
            verdict[id(v)] = all(verdict[id(i)] for i in producer.inputs)
        stack.pop()
    return verdict[id(var)]


@dataclass(eq=False)
class _OpenRequest:
    task: asyncio.Task | None = None
    started: bool = False  # the response's headers went out
    complete: bool = False  # its last body chunk went out
    event_stream: bool = False
    cut: bool = False  # cancelled by the drain


@dataclass
class DrainReport:
    finished: bool  # every in-flight piece of work ended before the timeout
    waited_s: float
    cancelled_calls: int = 0
    cut_requests: int = 0


@dataclass(eq=False)
class Drain:
    sessions: SessionManager
    timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    draining: bool = False
    _began: asyncio.Event = field(default_factory=asyncio.Event)
    _cut_short: asyncio.Event = field(default_factory=asyncio.Event)
    _open: set[_OpenRequest] = field(default_factory=set)
    _streams: set[asyncio.Queue] = field(default_factory=set)  # variable streams waiting now
    _report: DrainReport | None = None

    # ---- state ---------------------------------------------------------------------
    def begin(self) -> None:
        """Refuse new work from now on and wake idle fetches and streams."""
        if not self.draining:
            self.draining = True
            self._began.set()
            for queue in self._streams:
                queue.put_nowait((_WAKE, ""))
            logger.warning("draining: no new work is accepted")

    def cut_short(self) -> None:
        """Stop waiting for in-flight work (a second signal): cancel it now."""
        self.begin()
        self._cut_short.set()

    def busy(self) -> bool:
        if self._open:
            return True
        return any(c.kind == "llm" and c.state == "running"
                   for s in list(self.sessions.sessions.values()) for c in s.graph.calls.values())

    # ---- the drain -----------------------------------------------------------------
    async def run(self, timeout_s: float | None = None) -> DrainReport:
        """Drain: refuse new work, wait up to ``timeout_s`` (default: the app's drain timeout)
        for in-flight work, then cancel what is left. Calling it again returns the first report."""
        if self._report is not None:
            return self._report
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        self.begin()
        finished = await self._wait_idle(start + timeout_s, stop_early=True)
        report = DrainReport(finished=finished, waited_s=time.monotonic() - start)
        if not finished:
            report.cancelled_calls = self.cancel_calls()
            await self._wait_idle(time.monotonic() + CUT_GRACE_S, stop_early=False)
            report.cut_requests = self.cut_requests()
            await self._wait_idle(time.monotonic() + CUT_GRACE_S, stop_early=False)
        self._report = report
        logger.warning("drained in %.1f s: %s", time.monotonic() - start,
                       "all in-flight work finished" if finished else
                       f"cancelled {report.cancelled_calls} call(s) and {report.cut_requests} "
                       f"request(s) still running after {timeout_s:g} s")
        return report

    async def _wait_idle(self, deadline: float, *, stop_early: bool) -> bool:
        # Polled: in-flight work ends in many places (engines, executor, responses), and a
        # scan of the sessions every few milliseconds costs nothing next to a generation.
        while self.busy():
            if time.monotonic() >= deadline or (stop_early and self._cut_short.is_set()):
                return False
            await asyncio.sleep(0.02)
        return True

    def cancel_calls(self, reason: str = SHUTDOWN_MESSAGE) -> int:
        """Cancel every unfinished call of every session (their outputs fail with ``reason``)."""
        executor = self.sessions.executor
        calls = [c for s in list(self.sessions.sessions.values()) for c in s.graph.calls.values()
                 if not c.is_terminal]
        for call in calls:
            executor.cancel(call, reason)
        return len(calls)

    def cut_requests(self) -> int:
        """Cancel the requests still open; each answers ``SHUTDOWN_REQUEST_MESSAGE``."""
        cut = 0
        for request in list(self._open):
            if request.task is not None and not request.task.done():
                request.cut = True
                request.task.cancel()
                cut += 1
        return cut

    # ---- waiting on variables ------------------------------------------------------
    async def fetch(self, fetching: Awaitable[Variable], var: Variable) -> Variable:
        """Await a long-poll of ``var``, unless the drain begins (or has begun) while nothing
        will produce it: then it ends at once with ``ServiceDrainingError``."""
        task = asyncio.ensure_future(fetching)
        began = asyncio.ensure_future(self._began.wait())
        try:
            await asyncio.wait({task, began}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            began.cancel()
        if not task.done() and not produced_without_client(var):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ServiceDrainingError()
        return await task

    def refuse_idle(self, var: Variable) -> None:
        """While draining, a new wait on a variable nothing will produce is a 503."""
        if self.draining and not produced_without_client(var):
            raise ServiceDrainingError()

    async def next_event(self, queue: asyncio.Queue, var: Variable) -> tuple[str, str]:
        """The next event of a stream of ``var``; once draining, an idle stream gets an
        ``error`` event instead of waiting (a running one waits: it settles, or fails when
        the drain cancels its call)."""
        while True:
            if self.draining and queue.empty() and not produced_without_client(var):
                return "error", DRAINING_MESSAGE
            # Waiting streams are woken through their own queue: no extra task per event.
            self._streams.add(queue)
            try:
                kind, payload = await queue.get()
            finally:
                self._streams.discard(queue)
            if kind != _WAKE:
                return kind, payload


class DrainMiddleware:
    """Refuses work while draining and tracks the requests in flight, so the drain can wait
    for them and, at its end, cut them with a clear error."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/") or path.startswith("/v1/engines"):
            await self.app(scope, receive, send)  # ops and engine routes: never held, never refused
            return
        if self.drain.draining and scope["method"] in _STARTS_WORK:
            await draining_response()(scope, receive, send)
            return
        await self._track(scope, receive, send)

    async def _track(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _OpenRequest()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.started = True
                request.event_stream = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                    for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                request.complete = True
            await send(message)

        # Its own task, so the drain can cancel it without touching the server's connection task.
        request.task = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        self.drain._open.add(request)
        try:
            await asyncio.wait({request.task})
        except asyncio.CancelledError:
            request.task.cancel()
            raise
        finally:
            self.drain._open.discard(request)
        if not (request.cut and request.task.cancelled()):
            request.task.result()  # its outcome, an error included
            return
        await _send_shutdown_error(request, scope, receive, send)


async def _send_shutdown_error(request: _OpenRequest, scope: Scope, receive: Receive,
                               send: Send) -> None:
    info = ErrorInfo(message=SHUTDOWN_REQUEST_MESSAGE, type="server_error", code="shutdown")
    # The client may be gone already; there is nobody to tell then.
    with contextlib.suppress(OSError, RuntimeError):
        if not request.started:
            resp = error_response(info, 503)
            resp.headers["Connection"] = "close"
            await resp(scope, receive, send)
        elif not request.complete:
            if request.event_stream:
                await send({"type": "http.response.body", "more_body": True,
                            "body": sse_event({"error": info.model_dump()}).encode()})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
