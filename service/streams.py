"""Run the engine requests behind one API request as a group.

One API request can carry several prompts (an OpenAI ``prompt`` list). Their engine
streams start together, are read as one merged stream of ``(index, output)``, and
close together: closing the group aborts every request still running in the engine,
which is how a client disconnect frees its KV.

    engine.generate(r0) ──► pump task ──┐
    engine.generate(r1) ──► pump task ──┼──► queue ──► outputs(): (index, output) ...
    engine.generate(r2) ──► pump task ──┘
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from parrot.service.engine.base import Engine, EngineError, GenerateOutput, GenerateRequest

_DONE = None  # a pump's last queue item


class RequestGroup:
    def __init__(self, engine: Engine, requests: Sequence[GenerateRequest]) -> None:
        self.requests = list(requests)
        self._streams: list[AsyncIterator[GenerateOutput]] = [
            engine.generate(r) for r in self.requests
        ]
        self._queue: asyncio.Queue[tuple[int, GenerateOutput | BaseException | None]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task] = []
        self.last: list[GenerateOutput | None] = [None] * len(self.requests)
        self._closed = False

    def __len__(self) -> int:
        return len(self.requests)

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
        for stream in self._streams:
            aclose = getattr(stream, "aclose", None)  # the Engine API promises an AsyncIterator
            if aclose is not None:
                with contextlib.suppress(RuntimeError):  # "already running": its task closes it
                    await aclose()


async def _first_output(stream: AsyncIterator[GenerateOutput]) -> GenerateOutput:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise EngineError("the engine ended a request without any output") from None
