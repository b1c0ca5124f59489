"""Keep the prefixes that pending calls will need from eviction until those calls are placed.

A pending call's prompt starts with static text known at submission. When another
call is placed on an engine and its prompt shares at least ``min_tokens`` of that
start, the shared part is pinned on that engine, so the cache still holds it when
the pending call becomes ready (after its inputs, perhaps minutes later). The pin
goes once every call that needed it has run (or failed, or was cancelled). A start the
executor prefilled ahead for a waiting call is pinned the same way (``pin``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from array import array
from collections.abc import Iterable

from parrot.service.dispatch.registry import EngineHandle
from parrot.service.engine.builtin.radix_cache import common_len
from parrot.service.runtime.graph import Call

logger = logging.getLogger(__name__)

MIN_PIN_TOKENS = 32


def _log_failure(pinned: asyncio.Future) -> None:
    """A pin is a hint: when the engine refuses it or cannot be reached, the calls run anyway
    (their prefix may have to be computed again)."""
    if not pinned.cancelled() and pinned.exception() is not None:
        logger.warning("pinning a prefix failed: %s", pinned.exception())


class PrefixPins:
    def __init__(self, min_tokens: int = MIN_PIN_TOKENS) -> None:
        self.min_tokens = min_tokens
        self.pending: dict[tuple[int, ...], set[Call]] = {}  # static prompt start -> calls
        # pin id -> (engine, calls waiting for the prefix, the pin request in flight or done)
        self.pins: dict[str, tuple[EngineHandle, set[Call], asyncio.Future]] = {}
        self._tasks: set[asyncio.Task] = set()

    def add_pending(self, call: Call, prefix: list[int]) -> None:
        if len(prefix) >= self.min_tokens:
            self.pending.setdefault(tuple(prefix), set()).add(call)

    def shared_start(self, call: Call, prompt: list[int]) -> list[int]:
        """The longest start of ``prompt`` (at least ``min_tokens``) that another pending member
        of ``call``'s task group will need too; empty when there is none."""
        best = 0
        for prefix, calls in self.pending.items():
            if any(c is not call and c.group == call.group for c in calls):
                best = max(best, common_len(prompt, prefix))
        return prompt[:best] if best >= self.min_tokens else []

    def placed(self, handle: EngineHandle, prompt: list[int]) -> None:
        """A call with ``prompt`` went to ``handle``: pin what pending calls share with it.

        The call does not wait for the pins: a pin covers whatever part of its prefix is cached
        and grows as the rest is, so it may reach the engine after the call's own request
        (which holds its prefix while it runs). Waiting would hold each call back until the
        engine's current step ends, and split calls submitted together over several steps."""
        waiting: dict[int, list[Call]] = {}  # shared length -> the calls that need that much
        for prefix, calls in self.pending.items():
            n = common_len(prompt, prefix)
            if n >= self.min_tokens:
                waiting.setdefault(n, []).extend(calls)
        for n, needing in waiting.items():
            self.pin(handle, prompt[:n], needing)

    def pin(self, handle: EngineHandle, prefix: list[int], calls: Iterable[Call]) -> asyncio.Future:
        """Pin ``prefix`` on ``handle`` until each of ``calls`` is resolved (one pin per engine
        and prefix); the returned future is done once the engine holds the pin."""
        digest = hashlib.blake2b(array("q", prefix).tobytes(), digest_size=8).hexdigest()
        pin_id = f"{handle.id}-{digest}"
        if pin_id in self.pins:
            self.pins[pin_id][1].update(calls)
            return self.pins[pin_id][2]
        pinned = asyncio.ensure_future(handle.engine.pin_prefix(pin_id, list(prefix)))
        pinned.add_done_callback(_log_failure)  # placed() does not wait for it: its error is seen here
        self.pins[pin_id] = (handle, set(calls), pinned)
        return pinned

    def resolved(self, call: Call) -> None:
        """``call`` no longer waits (it ran, failed or was cancelled): drop pins nobody needs."""
        for prefix, calls in list(self.pending.items()):
            calls.discard(call)
            if not calls:
                del self.pending[prefix]
        for pin_id, (handle, waiting, pinned) in list(self.pins.items()):
            waiting.discard(call)
            if not waiting:
                del self.pins[pin_id]
                task = asyncio.ensure_future(self._unpin(handle, pin_id, pinned))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _unpin(handle: EngineHandle, pin_id: str, pinned: asyncio.Future) -> None:
        await asyncio.wait([pinned])  # the engine must see the pin before its unpin
        await handle.engine.unpin_prefix(pin_id)
