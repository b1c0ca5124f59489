"""The native API over HTTP: one async method per route of ``parrot.schemas``.

``ServiceClient`` only translates: it sends the wire models, parses the answers, and
turns every error (a 4xx/5xx JSON body, a failed call's error, a network failure)
into a ``ParrotError`` that carries the service's message. It holds no graph state;
the VM (``parrot.vm``) decides what to send and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from parrot.errors import ParrotError, ParrotTimeoutError
from parrot.schemas import (
    CallDecl,
    CallInfo,
    Criterion,
    GraphAccepted,
    GraphInfo,
    GraphSubmit,
    SessionCreate,
    SessionInfo,
    VariableInfo,
    VariableSet,
)

M = TypeVar("M", bound=BaseModel)

# One long-poll asks the service to hold the request at most this long; a longer
# wait is several polls, so no proxy or client timeout cuts a healthy wait short.
MAX_POLL_S = 30.0
RETRY_BACKOFF_S = 0.25  # before trying a failed connection again; doubled after each failure


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS settings, built once: building them reads the CA bundle (about
    20 ms of CPU), which a session per user or per framework invocation would pay each time."""
    return httpx.create_ssl_context()


class ServiceClient:
    """Async client of one Parrot service. Create and use it on one event loop."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 0) -> None:
        """``max_retries``: tries more for a request whose connection could not be made (nothing
        was sent, so any request is safe to send again), after 0.25 s, 0.5 s, 1 s, ..."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        # pool=None: a request waiting for a free connection (many long-polls at once)
        # waits for one instead of failing.
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, verify=_tls_context(),
            timeout=httpx.Timeout(timeout, pool=None),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- sessions and graphs -------------------------------------------------------------

    async def create_session(self, idle_timeout_s: float | None = None) -> SessionInfo:
        body = SessionCreate(idle_timeout_s=idle_timeout_s)
        return await self._request("POST", "/v1/sessions", SessionInfo, json=_dump(body))

    async def delete_session(self, session_id: str) -> None:
        await self._request("DELETE", f"/v1/sessions/{session_id}", None)

    async def submit_graph(self, graph: GraphSubmit) -> GraphAccepted:
        return await self._request("POST", "/v1/graphs", GraphAccepted, json=_dump(graph))

    async def stream_graph(self, graph: GraphSubmit,
                           ) -> AsyncIterator[GraphAccepted | VariableInfo | CallInfo]:
        """Submit ``graph`` (``stream=True``) and read its answer: the ``GraphAccepted`` first,
        then each waited variable as it settles, each after its producer's ``CallInfo`` if it
        has one; the stream may end with some never sent."""
        async with contextlib.aclosing(self._sse("POST", "/v1/graphs", json=_dump(graph))) as events:
            async for event in events:
                try:
                    if "accepted" in event:
                        yield GraphAccepted.model_validate(event["accepted"])
                    elif "variable" in event:
                        if event.get("call") is not None:
                            yield CallInfo.model_validate(event["call"])
                        yield VariableInfo.model_validate(event["variable"])
                except ValidationError as exc:
                    raise ParrotError(f"POST /v1/graphs: unexpected answer from the service: {exc}") from exc

    async def submit_call(self, session_id: str, call: CallDecl) -> CallInfo:
        """Submit one call (template or chat); the service creates its output variables."""
        return await self._request("POST", f"/v1/sessions/{session_id}/calls", CallInfo, json=_dump(call))

    async def get_call(self, session_id: str, call_id: str) -> CallInfo:
        return await self._request("GET", f"/v1/sessions/{session_id}/calls/{call_id}", CallInfo)

    async def get_graph(self, session_id: str) -> GraphInfo:
        return await self._request("GET", f"/v1/sessions/{session_id}/graph", GraphInfo)

    async def list_models(self) -> list[str]:
        body = await self._request("GET", "/v1/models", None)
        return [m["id"] for m in (body or {}).get("data", [])]

    # -- variables -----------------------------------------------------------------------

    async def set_variable(self, session_id: str, var_id: str, *, value: str | None = None,
                           error: str | None = None) -> VariableInfo:
        body = VariableSet(value=value, error=error)
        return await self._request("POST", _var_path(session_id, var_id), VariableInfo,
                                   json=_dump(body))

    async def wait_variable(self, session_id: str, var_id: str, *, criterion: Criterion | None,
                            timeout: float | None) -> str:
        """Long-poll until the variable has a value and return it.

        ``criterion`` tells the service how the caller waits (it flows back to every
        ancestor call); ``None`` waits without one. ``timeout=None`` waits for ever.
        Raises ``ParrotError`` when the producer failed, ``ParrotTimeoutError`` at the timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = MAX_POLL_S if deadline is None else max(0.0, deadline - time.monotonic())
            poll_s = min(MAX_POLL_S, left)
            params: dict[str, str | float] = {"timeout": round(poll_s, 3)}
            if criterion is not None:
                params["criterion"] = Criterion(criterion).value
            info = await self._request("GET", _var_path(session_id, var_id), VariableInfo,
                                       params=params, timeout=poll_s + self.timeout)
            if info.ready or info.error is not None:
                return value_of(info)
            if deadline is not None and time.monotonic() >= deadline:
                raise ParrotTimeoutError(f"variable {var_id} was not ready within {timeout} s")

    async def stream_variable(self, session_id: str, var_id: str, *,
                              criterion: Criterion | None = None) -> AsyncIterator[str]:
        """The variable's value as it is generated: text deltas whose join is the value.

        Reads the service's SSE events ``{"delta"}`` ... ``{"done", "value"}`` or
        ``{"error"}``; an error raises ``ParrotError``.
        """
        params = {} if criterion is None else {"criterion": Criterion(criterion).value}
        sent = ""
        path = _var_path(session_id, var_id) + "/stream"
        async with contextlib.aclosing(self._sse("GET", path, params=params)) as events:
            async for event in events:
                if "error" in event:
                    raise ParrotError(str(event["error"]), status_code=424)
                if event.get("done"):
                    value = event.get("value")
                    # An already finished value may come whole in the final event.
                    if isinstance(value, str) and value.startswith(sent) and len(value) > len(sent):
                        yield value[len(sent):]
                    return
                delta = event.get("delta")
                if delta:
                    sent += delta
                    yield delta
        raise ParrotError(f"the stream of variable {var_id} ended without a final event")

    # -- plumbing ------------------------------------------------------------------------

    async def _request(self, method: str, path: str, model: type[M] | None, *,
                       json: object = None, params: dict | None = None,
                       timeout: float | None = None) -> Any:
        kwargs: dict = {"json": json, "params": params}
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, pool=None)
        try:
            resp = await self._send(self._http.build_request(method, path, **kwargs))
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.base_url) from exc
        if resp.status_code >= 400:
            raise _error_from(resp)
        if model is None:
            return resp.json() if resp.content else None
        try:
            return model.model_validate_json(resp.content)
        except ValidationError as exc:
            raise ParrotError(f"{method} {path}: unexpected answer from the service: {exc}") from exc

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send ``request``, again after a failed connection (``max_retries`` times)."""
        attempt = 0
        while True:
            try:
                return await self._http.send(request, stream=stream)
            except httpx.ConnectError:
                if attempt >= self.max_retries:
                    raise
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** attempt)
            attempt += 1

    async def _sse(self, method: str, path: str, **kwargs: Any) -> AsyncGenerator[dict, None]:
        """The server-sent events a request answers with (no read timeout: values and tokens
        take their time); a 4xx/5xx or a network failure raises ``ParrotError``."""
        no_read_limit = httpx.Timeout(self.timeout, read=None, pool=None)
        try:
            resp = await self._send(self._http.build_request(method, path, timeout=no_read_limit, **kwargs),
                                    stream=True)
            try:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _error_from(resp)
                async for event in _sse_events(resp):
                    yield event
            finally:
                await resp.aclose()
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.base_url) from exc


def value_of(info: VariableInfo) -> str:
    """A settled variable's value; its error (its producer failed) raises ``ParrotError``."""
    if info.error is not None:
        raise ParrotError(info.error, status_code=424)
    return info.value or ""


def _var_path(session_id: str, var_id: str) -> str:
    return f"/v1/sessions/{session_id}/variables/{var_id}"


def _dump(model: BaseModel) -> dict:
    return model.model_dump(mode="json", exclude_none=True)


def _error_from(resp: httpx.Response) -> ParrotError:
    """The service's JSON error (``{"error": {"message", "code", ...}}``) as a ParrotError."""
    message, code = resp.text.strip() or resp.reason_phrase, None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body.get("detail"))
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            code = err.get("code")
        elif isinstance(err, str):
            message = err
    return ParrotError(message, status_code=resp.status_code, code=code)


def _transport_error(exc: httpx.HTTPError, base_url: str) -> ParrotError:
    if isinstance(exc, httpx.TimeoutException):
        return ParrotTimeoutError(f"the Parrot service at {base_url} did not answer in time ({exc!r})")
    return ParrotError(f"cannot reach the Parrot service at {base_url}: {exc!r}")


async def _sse_events(resp: httpx.Response) -> AsyncIterator[dict]:
    """Parse server-sent events: ``data:`` lines, an empty line ends an event."""
    data: list[str] = []
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            payload, data = "\n".join(data), []
            if payload == "[DONE]":
                return
            event = json.loads(payload)
            if isinstance(event, dict):
                yield event
    if data and data != ["[DONE]"]:  # the last event lacked its blank line
        event = json.loads("\n".join(data))
        if isinstance(event, dict):
            yield event


class SharedClients:
    """The process's clients, one per service and settings, for the VMs on the process's client
    loop (``parrot.loop_thread.shared_loop``): a new session reuses open connections instead of
    connecting again. Use it on that loop only. A client no VM holds stays open for the next
    session; past ``max_idle`` such clients, the least recently used one is closed."""

    def __init__(self, max_idle: int = 8) -> None:
        self.max_idle = max_idle
        self._clients: dict[tuple[str, str | None, float, int], tuple[ServiceClient, int]] = {}  # LRU first

    async def acquire(self, base_url: str, *, api_key: str | None, timeout: float,
                      max_retries: int = 0) -> ServiceClient:
        key = (base_url.rstrip("/"), api_key, timeout, max_retries)
        client, users = self._clients.pop(key, (None, 0))
        if client is None:
            client = ServiceClient(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._clients[key] = (client, users + 1)
        await self._close_idle()
        return client

    async def release(self, client: ServiceClient) -> None:
        for key, (held, users) in self._clients.items():
            if held is client:
                del self._clients[key]
                self._clients[key] = (held, users - 1)  # the most recently used now
                break
        await self._close_idle()

    async def _close_idle(self) -> None:
        idle = [key for key, (_, users) in self._clients.items() if users == 0]
        for key in idle[:max(0, len(idle) - self.max_idle)]:
            client, _ = self._clients.pop(key)
            await client.aclose()


_shared: tuple[int, SharedClients] | None = None


def shared_clients() -> SharedClients:
    """This process's ``SharedClients`` (a forked child starts its own)."""
    global _shared
    if _shared is None or _shared[0] != os.getpid():
        _shared = (os.getpid(), SharedClients())
    return _shared[1]
