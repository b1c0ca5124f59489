"""Run the dispatched requests behind one API request as a group.

One API request can carry several prompts (an OpenAI ``prompt`` list). Their streams
start together, are read as one merged stream of ``(index, output)``, and close
together: closing the group aborts every request still running in its engine, which
is how a client disconnect frees its KV.

    dispatch 0 ──► pump task ──┐
    dispatch 1 ──► pump task ──┼──► queue ──► outputs(): (index, output) ...
    dispatch 2 ──► pump task ──┘
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from parrot.service.dispatch.dispatcher import Dispatch
from parrot.service.engine.base import EngineError, GenerateOutput

_DONE = None  # a pump's last queue item


class RequestGroup:
    def __init__(self, dispatches: Sequence[Dispatch]) -> None:
        self.dispatches = list(dispatches)
        self._streams: list[AsyncIterator[GenerateOutput]] = [aiter(d) for d in self.dispatches]
        self._queue: asyncio.Queue[tuple[int, GenerateOutput | BaseException | None]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task] = []
        self.last: list[GenerateOutput | None] = [None] * len(self.dispatches)
        self._closed = False

    def __len__(self) -> int:
        return len(self.dispatches)

    async def start(self) -> list[GenerateOutput]:
        """Submit every request and wait for each one's first output, which it returns.

        An engine rejects a request (``InvalidRequestError``) before its first output,
        so a bad prompt fails here, before the HTTP response has started.
        """
        firsts = [asyncio.create_task(_first_output(s)) for s in self._streams]
        self._tasks = firsts
        try:
            await asyncio.wait(firsts, return_when=asyncio.FIRST_EXCEPTION)
            errors = [t.exception() for t in firsts if t.done() and not t.cancelled()]
            for error in errors:
                if error is not None:
                    raise error
        except BaseException:
            await self.aclose()
            raise
        self._tasks = []
        for i, (task, stream) in enumerate(zip(firsts, self._streams, strict=True)):
            self.last[i] = task.result()
            self._queue.put_nowait((i, task.result()))
            self._tasks.append(asyncio.create_task(self._pump(i, stream)))
        return [task.result() for task in firsts]

    async def _pump(self, index: int, stream: AsyncIterator[GenerateOutput]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((index, out))
        except Exception as exc:  # handed to the reader; CancelledError is not caught
            self._queue.put_nowait((index, exc))
        self._queue.put_nowait((index, _DONE))

    async def outputs(self) -> AsyncIterator[tuple[int, GenerateOutput]]:
        """Every output of every request, in arrival order, tagged with its prompt index."""
        remaining = len(self._tasks)
        while remaining:
            index, item = await self._queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                self.last[index] = item
                yield index, item

    @property
    def num_unfinished(self) -> int:
        return sum(1 for out in self.last if out is None or not out.finished)

    async def aclose(self) -> None:
        """Abort whatever still runs. Safe to call twice, and from a cancelled task.

        Never waits: a cancelled pump's CancelledError reaches its engine stream at the
        stream's current await, whose ``finally`` aborts the request; a stream parked at
        a ``yield`` (not being read) is closed here directly.
        """
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for dispatch in self.dispatches:
            await dispatch.aclose()


async def _first_output(stream: AsyncIterator[GenerateOutput]) -> GenerateOutput:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise EngineError("the engine ended a request without any output") from None
