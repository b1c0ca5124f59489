"""An asyncio event loop in a daemon thread, and the bridges to use it from anywhere.

The VMs do all their HTTP work on one loop per process (``shared_loop``), where their
connection pools live, so sync code calls in with ``run_sync`` and async code on any
other loop with ``run_async``. Each VM holds a ``LoopLease`` on it: ending the lease
cancels whatever the VM still runs there (so nobody waits for ever on a VM that closed)
and leaves the loop to the others. A ``LoopThread`` of one's own stops with ``stop``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_END = object()  # the end of an async iterator, as a value (StopAsyncIteration cannot cross)


class LoopStoppedError(RuntimeError):
    """Work was handed to a loop that has stopped (or stopped while running it)."""


class _Bridges:
    """Sync and async entry points onto ``loop``, built on ``submit``."""

    loop: asyncio.AbstractEventLoop
    _stopping: bool

    @property
    def in_loop_thread(self) -> bool:
        raise NotImplementedError

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        raise NotImplementedError

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


class LoopThread(_Bridges):
    """An event loop in a daemon thread of its own, until ``stop``."""

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

    def lease(self) -> LoopLease:
        return LoopLease(self)

    def stop(self) -> None:
        """Stop the loop (cancelling what runs on it) and wait for its thread to end."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop_thread:
            self._thread.join()


class LoopLease(_Bridges):
    """One user's share of a ``LoopThread``: ``stop`` cancels the work handed in through this
    lease that still runs, refuses more, and leaves the loop running for everyone else."""

    def __init__(self, owner: LoopThread) -> None:
        self.loop = owner.loop
        self._owner = owner
        self._lock = threading.Lock()
        self._stopping = False
        self._futures: set[concurrent.futures.Future] = set()

    @property
    def in_loop_thread(self) -> bool:
        return self._owner.in_loop_thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._stopping:
                coro.close()
                raise LoopStoppedError("the event loop has stopped")
            future = self._owner.submit(coro)
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def call_soon(self, callback: Any, *args: Any) -> None:
        with self._lock:
            if not self._stopping:
                self._owner.call_soon(callback, *args)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            futures, self._futures = list(self._futures), set()
        for future in futures:
            future.cancel()  # cancels the task on the loop too


_shared: tuple[int, LoopThread] | None = None
_shared_lock = threading.Lock()


def shared_loop() -> LoopThread:
    """The process's loop for Parrot clients, started on first use (again in a forked child,
    where the parent's thread does not exist)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), LoopThread(name="parrot-client"))
        return _shared[1]


async def _next_or_end(items: AsyncIterator[T]) -> T | object:
    try:
        return await anext(items)
    except StopAsyncIteration:
        return _END
