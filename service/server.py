"""uvicorn's server, with SIGTERM and SIGINT draining the app before uvicorn stops.

uvicorn's own handler stops listening at once and then waits for every open connection,
with no cap: new clients get connection errors instead of a 503 they can act on, an idle
long-poll holds the exit for its whole timeout, and an SSE stream on a variable nobody
produces holds it until the client leaves. It also re-raises the signal after shutting
down, so the process dies by SIGTERM rather than exiting 0.

Here the first signal starts ``app.state.drain.run`` (see ``parrot.service.drain``) while
uvicorn keeps listening, so new requests get 503 + ``Retry-After``; when the drain is done
(its in-flight work finished, or cancelled after the drain timeout) the server is told to
exit, and its remaining shutdown is capped by ``timeout_graceful_shutdown``. A second
signal cuts the drain short (cancels what is left now); a third exits without waiting.
The signal is handled, not re-raised, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from parrot.service.drain import Drain

logger = logging.getLogger(__name__)

# Once drained, what could still hold a connection is a response being written out.
SHUTDOWN_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float | None = None) -> None:
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = int(SHUTDOWN_GRACE_S)
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task | None = None
        self._signals = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of the event loop, so it only hands
        # work to the loop (call_soon_threadsafe also wakes it).
        self._signals += 1
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True
            return
        if self._signals == 1:
            self._loop.call_soon_threadsafe(self._start_drain)
        elif self._signals == 2:
            self._loop.call_soon_threadsafe(self.drain.cut_short)
        else:
            self.should_exit = self.force_exit = True

    def _start_drain(self) -> None:
        logger.warning("shutdown requested: draining (send the signal again to cancel what runs)")
        self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run(self.drain_timeout_s)
        except Exception:  # the process must still exit
            logger.exception("draining failed")
        finally:
            self.should_exit = True
