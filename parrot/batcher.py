"""Collect graph parts issued from any thread; post them to the service in order, in batches.

A semantic function call only appends to the open batch and returns. The sender
(``run``, a task on the VM's loop) wakes, waits a short window for more calls, takes
the batch and posts it as one graph; calls issued meanwhile fill the next batch.
Only one post is in flight at a time, so a later batch may use the variables of an
earlier one. Every variable remembers the ``posted`` future of the batch that
declared it: waiting for a value starts by waiting for that. A fetch of a variable
whose batch is not posted yet rides along with it (``fetches``), so the service
places the calls knowing the criterion they will be fetched with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from parrot.errors import ParrotError, ParrotTimeoutError
from parrot.schemas import CallDecl, Criterion, FetchDecl, VariableDecl

logger = logging.getLogger(__name__)

Post = Callable[[list[VariableDecl], list[CallDecl], list[FetchDecl]], Awaitable[object]]


@dataclass
class Batch:
    variables: list[VariableDecl] = field(default_factory=list)
    calls: list[CallDecl] = field(default_factory=list)
    fetches: list[FetchDecl] = field(default_factory=list)
    # Resolved once the service accepted the batch; a refusal is its exception.
    posted: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


class GraphBatcher:
    def __init__(self, window_s: float, call_soon: Callable[..., None]) -> None:
        """``call_soon(callback)`` schedules a callback on the sender's loop, thread-safely."""
        self._window_s = window_s
        self._call_soon = call_soon
        self._lock = threading.Lock()
        self._open: Batch | None = None  # the batch being filled
        self._last: Batch | None = None  # the newest batch, open or not
        self._posted_by_var: dict[str, concurrent.futures.Future[None]] = {}
        self._wakeup = asyncio.Event()  # (created on any thread; used only on the loop)
        self._flush = asyncio.Event()

    def is_declared(self, var_id: str) -> bool:
        with self._lock:
            return var_id in self._posted_by_var

    def add(self, variables: list[VariableDecl], calls: list[CallDecl]) -> None:
        """Append to the open batch (thread-safe); the sender posts it soon."""
        with self._lock:
            if self._open is None:
                self._open = self._last = Batch()
            self._open.variables += variables
            self._open.calls += calls
            for var in variables:
                self._posted_by_var[var.id] = self._open.posted
        self._call_soon(self._wakeup.set)

    def fail_pending(self, error: ParrotError) -> None:
        """Fail the batch not yet posted (the VM is closing)."""
        with self._lock:
            batch, self._open = self._open, None
        if batch is not None:
            batch.posted.set_exception(error)

    def announce(self, var_id: str, criterion: Criterion, *, wait: bool = False) -> None:
        """The app is about to fetch ``var_id``: tell the service with its batch, if still open
        (``wait``: and ask the post's answer to bring the value)."""
        with self._lock:
            if self._open is not None and self._open.posted is self._posted_by_var.get(var_id):
                self._open.fetches.append(FetchDecl(var=var_id, criterion=criterion, wait=wait))

    async def wait_posted(self, var_id: str, timeout: float | None) -> None:
        """Wait until the batch that declared ``var_id`` was posted; raise its refusal."""
        with self._lock:
            fut = self._posted_by_var.get(var_id)
        if fut is None:
            raise ParrotError(f"variable {var_id} was never used in this VM")
        if not fut.done():
            self._request_flush()  # someone waits: no reason to hold the batch back
        await _posted(fut, timeout)

    async def flush(self) -> None:
        """Post everything added so far and wait until it was (refusals are not raised here)."""
        with self._lock:
            last, pending = self._last, self._open is not None
        if pending:
            self._request_flush()
        if last is not None:
            with contextlib.suppress(ParrotError):
                await _posted(last.posted, None)

    def _request_flush(self) -> None:
        self._call_soon(self._wakeup.set)
        self._call_soon(self._flush.set)

    async def run(self, post: Post) -> None:
        """The sender: post each batch with ``post(variables, calls, fetches)``, strictly in order."""
        while True:
            await self._wakeup.wait()
            if self._window_s > 0 and not self._flush.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush.wait(), self._window_s)
            self._wakeup.clear()
            self._flush.clear()
            with self._lock:
                batch, self._open = self._open, None
            if batch is None:
                continue
            try:
                await post(batch.variables, batch.calls, batch.fetches)
            except ParrotError as exc:
                batch.posted.set_exception(exc)
            except asyncio.CancelledError:
                batch.posted.set_exception(ParrotError("the VM closed while posting these calls"))
                raise
            except Exception as exc:  # a bug must fail the waiters, not stop the sender
                logger.exception("posting a graph failed")
                batch.posted.set_exception(ParrotError(f"posting the graph failed: {exc!r}"))
            else:
                batch.posted.set_result(None)


async def _posted(fut: concurrent.futures.Future[None], timeout: float | None) -> None:
    """Await a batch's shared ``posted`` future without ever cancelling it."""
    wrapped = asyncio.wrap_future(fut)
    done, _ = await asyncio.wait({wrapped}, timeout=timeout)
    if not done:
        wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" log
        raise ParrotTimeoutError(f"the calls were not sent to the service within {timeout} s")
    wrapped.result()
