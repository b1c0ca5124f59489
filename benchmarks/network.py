"""An emulated network between an app and its service: a TCP relay on loopback that delays
every byte by half a round-trip time in each direction, as a long link would (no bandwidth
limit, nothing lost). Connections are taken as already open (kept alive, as every client
here does), so each HTTP request costs one round trip.

The Parrot paper's experiments put 200-300 ms of emulated network delay on every LLM call
of the request-centric baselines; on loopback a round trip costs well under a millisecond,
so what an app pays for each dependent call it sends (and Parrot saves) does not show.
Clients need no change: they are given the relay's URL instead of the service's.

    with DelayedLink("http://127.0.0.1:8000", rtt_s=0.05) as url:
        ...  # every HTTP request to ``url`` takes 50 ms more
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from urllib.parse import urlsplit

CHUNK = 1 << 16


class DelayedLink:
    """A relay to the service at ``url`` whose round trips take ``rtt_s`` longer; entering it
    starts it on a thread of its own and gives its URL."""

    def __init__(self, url: str, rtt_s: float) -> None:
        if rtt_s < 0:
            raise ValueError(f"a round-trip time cannot be negative: {rtt_s}")
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"the service URL needs a host and a port: {url!r}")
        self.upstream = (parts.hostname, parts.port)
        self.rtt_s = rtt_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delayed-link", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> str:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0), self._loop).result()
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc_info: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        half = self.rtt_s / 2
        pipes = [asyncio.ensure_future(_pipe(client_reader, server_writer, half)),
                 asyncio.ensure_future(_pipe(server_reader, client_writer, half))]
        try:
            # Both directions closed, or one failed (its peer is gone): the other is ended too.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            pass  # the link is closing; ending quietly keeps asyncio's server from logging it
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in (server_writer, client_writer):
                writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it was read (in order)."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((time.monotonic() + delay_s, data))
            if not data:
                break
        await delivering
    finally:
        delivering.cancel()
        await asyncio.gather(delivering, return_exceptions=True)
