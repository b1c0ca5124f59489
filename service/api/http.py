"""HTTP plumbing shared by routers: server-sent events and client-disconnect handling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request, Response
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


class EventStream:
    """An async iterator of SSE lines with an ``aclose`` that always runs ``on_close``.

    An async generator that was never started skips its ``finally`` when closed;
    this wrapper makes sure the resources behind the stream are released anyway.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        self._events = events
        self._on_close = on_close

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> str:
        return await anext(self._events)

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self._on_close()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator when it ends.

    Starlette stops iterating when the client disconnects but leaves closing the
    iterator to garbage collection; closing it here aborts the engine work at once.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return ClosingStreamingResponse(
        events, media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await ``work``, but cancel it when the client disconnects first.

    Cancelling closes the engine streams ``work`` is reading, which aborts them;
    without this, a client that gives up on a long non-streaming request would leave
    it running to the end. The disconnected client gets nothing (a 499 nobody reads).
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task.done() and not work_task.cancelled():
        return work_task.result()
    try:
        await work_task
    except asyncio.CancelledError:
        pass
    return Response(status_code=499)
