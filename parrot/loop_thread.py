"""An asyncio event loop in a daemon thread, and the bridges to use it from anywhere.

The VM does all its HTTP work on this loop (one ``httpx.AsyncClient`` lives there), so
sync code calls in with ``run_sync`` and async code on any other loop with
``run_async``. Stopping cancels whatever still runs there, so nobody waits for ever
on a loop that is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_END = object()  # the end of an async iterator, as a value (StopAsyncIteration cannot cross)


class LoopStoppedError(RuntimeError):
    """Work was handed to a loop that has stopped (or stopped while running it)."""


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop; the returned future cancels it when cancelled."""
        with self._lock:
            if self._stopping:
                coro.close()
                raise LoopStoppedError("the event loop has stopped")
            return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, callback: Any, *args: Any) -> None:
        with self._lock:
            if not self._stopping:
                self.loop.call_soon_threadsafe(callback, *args)

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block until it is done (not from the loop's own thread)."""
        if self.in_loop_thread:
            coro.close()
            raise RuntimeError("a blocking Parrot call was made from the VM's own event loop "
                               "(inside an async native function?); use the async variant, "
                               "e.g. `await var.aget()`")
        future = self.submit(coro)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise LoopStoppedError("the event loop stopped before the work was done") from None
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop the work too
            raise

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` from any event loop; cancelling the awaiting task cancels it."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return await coro
        try:
            return await asyncio.wrap_future(self.submit(coro))
        except asyncio.CancelledError:
            if self._stopping:
                raise LoopStoppedError("the event loop stopped before the work was done") from None
            raise

    def iterate_sync(self, items: AsyncIterator[T]) -> Iterator[T]:
        """Iterate an async iterator that lives on the loop, from sync code."""
        try:
            while True:
                item = self.run_sync(_next_or_end(items))
                if item is _END:
                    return
                yield item  # type: ignore[misc]
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None and not self._stopping:
                self.run_sync(aclose())

    async def iterate_async(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Iterate an async iterator that lives on the loop, from any event loop."""
        try:
            while True:
                item = await self.run_async(_next_or_end(items))
                if item is _END:
                    return
                yield item  # type: ignore[misc]
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None and not self._stopping:
                await self.run_async(aclose())

    def stop(self) -> None:
        """Stop the loop (cancelling what runs on it) and wait for its thread to end."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop_thread:
            self._thread.join()


async def _next_or_end(items: AsyncIterator[T]) -> T | object:
    try:
        return await anext(items)
    except StopAsyncIteration:
        return _END
