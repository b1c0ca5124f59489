"""A live Parrot service for the integrations' tests: real uvicorn on a loopback port, a tiny
random-weight llama with the default model's tokenizer (and so its chat template).

The service's app is wrapped in an ASGI layer that records every HTTP request it
receives (method, path, JSON body), so tests can see what a model sent.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from parrot.service.app import create_app
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
from tests.conftest import make_tiny_model, serve_in_thread


@dataclass
class Recorded:
    method: str
    path: str
    body: Any  # the parsed JSON body, or None


class RecordRequests:
    """ASGI middleware: passes everything through and logs each HTTP request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.log: list[Recorded] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        # Logged on arrival, not after the response: a client that has its answer must find its
        # request in the log, however late the server gets round to finishing up.
        record = Recorded(scope["method"], scope["path"], None)
        self.log.append(record)

        async def receive_and_keep() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                if not message.get("more_body") and body:
                    record.body = json.loads(body)
            return message

        await self.app(scope, receive_and_keep, send)


@dataclass
class Service:
    url: str
    engine: BuiltinEngine
    recorder: RecordRequests
    mark: int = field(default=0)

    @property
    def model(self) -> str:
        return self.engine.model_name

    def start_recording(self) -> None:
        self.mark = len(self.recorder.log)

    def requests(self, method: str | None = None, path_prefix: str = "") -> list[Recorded]:
        """Requests since ``start_recording``."""
        return [r for r in self.recorder.log[self.mark:]
                if (method is None or r.method == method) and r.path.startswith(path_prefix)]

    def wait_sessions_closed(self, timeout_s: float = 20.0) -> bool:
        """Whether every session a graph opened since ``start_recording`` was deleted, waiting up
        to ``timeout_s`` (the integrations delete theirs without waiting for the answer)."""
        live = self.recorder.app.state.sessions.sessions
        deadline = time.monotonic() + timeout_s
        while True:
            opened = {r.body["session_id"] for r in self.requests("POST", "/v1/graphs")
                      if (r.body or {}).get("open_session") is not None}
            deleted = {r.path.rsplit("/", 1)[-1] for r in self.requests("DELETE", "/v1/sessions/")}
            if opened <= deleted and not opened & set(live):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def sessions_opened(self) -> int:
        """Sessions opened since ``start_recording``: by ``POST /v1/sessions``, or by the graph
        posted first (``open_session``), as the SDK does."""
        graphs = self.requests("POST", "/v1/graphs")
        by_graph = [r for r in graphs if (r.body or {}).get("open_session") is not None]
        return len(self.requests("POST", "/v1/sessions")) + len(by_graph)


@pytest.fixture(scope="session")
def parrot_service(tokenizer) -> Iterator[Service]:
    """One service for the whole session (the standard suites make a model per test)."""
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.05),
                           hf_model=make_tiny_model(len(tokenizer)), tokenizer=tokenizer,
                           model_name="tiny-llama")
    recorder = RecordRequests(create_app(engine))
    with serve_in_thread(recorder) as url:
        yield Service(url, engine, recorder)


@pytest.fixture
def service(parrot_service) -> Service:
    parrot_service.start_recording()
    return parrot_service


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"
