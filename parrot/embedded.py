"""Embedded mode: ``P.Parrot()`` without a URL serves the default engine inside this process.

This module is the one place the core reaches into the service, and only lazily
(``_start_server``), so ``import parrot`` never loads torch or FastAPI. The VM then
talks to the embedded server over loopback HTTP, exactly as to a remote one.

One server per model per process: the first VM starts it (loading the model takes
seconds), later VMs reuse it, and it stops when the interpreter exits.
"""

from __future__ import annotations

import atexit
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from parrot.errors import ParrotError

STARTUP_TIMEOUT_S = 600.0  # the first start converts the default model's GGUF file once

_lock = threading.Lock()
_servers: dict[str | None, _EmbeddedServer] = {}  # model -> its running server
_exit_hook_registered = False


@dataclass
class _EmbeddedServer:
    url: str
    server: Any  # uvicorn.Server
    thread: threading.Thread
    sock: socket.socket

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def embedded_url(model: str | None = None) -> str:
    """The base URL of this process's embedded service for ``model``, started on first use."""
    with _lock:
        server = _servers.get(model)
        if server is None or not server.thread.is_alive():
            _register_exit_hook()
            server = _servers[model] = _start_server(model)
        return server.url


def shutdown_embedded() -> None:
    """Stop every embedded server (registered to run at interpreter exit)."""
    with _lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.stop()


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        _at_exit(shutdown_embedded)
        _exit_hook_registered = True


def _at_exit(callback: Callable[[], None]) -> None:
    # The server's shutdown hands work to thread pools (asyncio.to_thread), which refuse
    # it once the interpreter runs plain atexit handlers. threading's own exit hooks run
    # before the pools close (concurrent.futures registers its own there too).
    # Hooks run last-registered first, so load the pool module (it registers on import) now.
    import concurrent.futures.thread  # noqa: F401

    register = getattr(threading, "_register_atexit", None)
    if register is None:
        atexit.register(callback)
    else:
        register(callback)


def _start_server(model: str | None) -> _EmbeddedServer:
    try:
        import uvicorn

        from parrot.service.app import create_app
        from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
    except ImportError as exc:
        raise ParrotError("embedded mode needs the service's dependencies: "
                          f"pip install 'parrot-serve[serve]' ({exc})") from exc

    from parrot.service.engine.builtin.loader import quiet_transformers

    with quiet_transformers():  # no per-file progress bars in the app's output
        engine = BuiltinEngine(BuiltinEngineConfig(model=model))
    app = create_app(engine)
    # Bind first, so the port is ours before uvicorn starts (no race for a "free" port).
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on connections whose socket
    # says so, and without it every response on a kept-alive connection waits 40 ms for an ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                          timeout_keep_alive=75))  # as parrot serve: pooled clients
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="parrot-embedded-service")
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(url):
        if not thread.is_alive():
            sock.close()
            raise ParrotError("the embedded Parrot service failed to start (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise ParrotError(f"the embedded Parrot service did not start within {STARTUP_TIMEOUT_S} s")
        time.sleep(0.02)
    return _EmbeddedServer(url, server, thread, sock)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
