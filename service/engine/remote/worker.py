"""An engine process: serves one builtin engine over HTTP and registers with a Parrot service.

``parrot engine --service URL`` runs this. The process answers the routes in
``parrot.service.engine.remote.protocol``, registers its URL and model with the
service, heartbeats its load, registers again if the service forgot it (restart,
expiry), and says goodbye on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import httpx
from fastapi import FastAPI

from parrot.service.api.http import sse_event, sse_response
from parrot.service.engine.base import GenerateRequest
from parrot.service.engine.builtin.engine import BuiltinEngine
from parrot.service.engine.remote.protocol import (
    EngineInfo,
    EngineRegistration,
    Flushed,
    GenerateBody,
    LoadInfo,
    PinBody,
    PinRef,
    PrefillBody,
    PriorityBody,
    Registered,
    RequestRef,
)
from parrot.service.errors import install_exception_handlers

logger = logging.getLogger(__name__)


def tokenizer_files(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="parrot-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: base64.b64encode(p.read_bytes()).decode() for p in Path(tmp).iterdir() if p.is_file()}


def engine_load(engine: BuiltinEngine) -> LoadInfo:
    return LoadInfo(**asdict(engine.load()))


class Registrar:
    """Keeps this engine registered with the service: register, heartbeat, re-register."""

    def __init__(self, service_url: str, registration: EngineRegistration, engine: BuiltinEngine,
                 cluster_secret: str | None = None) -> None:
        self.service_url = service_url.rstrip("/")
        # The service's operator credential, sent on every registry request (never logged).
        self.headers = {"Authorization": f"Bearer {cluster_secret}"} if cluster_secret else {}
        self.registration = registration
        self.engine = engine
        self.engine_id: str | None = None
        self.registered = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.service_url, timeout=5.0, headers=self.headers) as client:
            interval = 1.0
            while True:
                try:
                    if self.engine_id is None:
                        resp = await client.post("/v1/engines", json=self.registration.model_dump())
                        resp.raise_for_status()
                        reply = Registered.model_validate(resp.json())
                        self.engine_id, interval = reply.id, reply.heartbeat_interval_s
                        self.registered.set()
                        logger.info("registered with %s as %s", self.service_url, self.engine_id)
                    else:
                        resp = await client.post(f"/v1/engines/{self.engine_id}/heartbeat",
                                                 json=engine_load(self.engine).model_dump())
                        if resp.status_code == 404:  # the service forgot us: register again
                            self.engine_id = None
                            continue
                except httpx.HTTPError as exc:
                    logger.warning("service at %s: %s", self.service_url, exc)
                await asyncio.sleep(interval)

    async def leave(self) -> None:
        if self.engine_id is None:
            return
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(base_url=self.service_url, timeout=2.0,
                                         headers=self.headers) as client:
                await client.delete(f"/v1/engines/{self.engine_id}")


def create_worker_app(engine: BuiltinEngine, *, service_url: str | None = None,
                      advertise_url: str | None = None, cluster_secret: str | None = None) -> FastAPI:
    """The engine process's HTTP app; with ``service_url`` it registers as ``advertise_url``
    (sending ``cluster_secret``, the service's operator credential, when given)."""
    registrar = None
    if service_url is not None:
        if advertise_url is None:
            raise ValueError("advertise_url is needed to register with a service")
        registration = EngineRegistration(url=advertise_url, model=engine.model_name,
                                          max_context_len=engine.max_context_len)
        registrar = Registrar(service_url, registration, engine, cluster_secret)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        task = asyncio.create_task(registrar.run()) if registrar else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await registrar.leave()  # type: ignore[union-attr]
            await engine.shutdown()

    app = FastAPI(title="Parrot engine", lifespan=lifespan)
    app.state.engine = engine
    app.state.registrar = registrar
    install_exception_handlers(app)
    files = tokenizer_files(engine.tokenizer.hf)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> EngineInfo:
        return EngineInfo(model=engine.model_name, max_context_len=engine.max_context_len,
                          prompt_prefix_ids=engine.tokenizer.prompt_prefix_ids, tokenizer_files=files)

    @app.get("/load")
    async def load() -> LoadInfo:
        return engine_load(engine)

    @app.post("/generate")
    async def generate(body: GenerateBody):
        request = GenerateRequest(
            request_id=body.rid, prompt_token_ids=body.input_ids, sampling=body.sampling_params,
            objective=body.objective, priority=body.priority, group_id=body.group_id,
        )
        await engine.check(request)  # a bad request is a 400 before the stream starts

        async def events() -> AsyncIterator[str]:
            async with contextlib.aclosing(engine.generate(request)) as stream:
                async for out in stream:
                    yield sse_event(asdict(out))

        return sse_response(events())

    @app.post("/abort")
    async def abort(body: RequestRef) -> dict:
        await engine.abort(body.rid)
        return {"ok": True}

    @app.post("/priority")
    async def priority(body: PriorityBody) -> dict:
        await engine.set_priority(body.rid, body.priority, body.objective)
        return {"ok": True}

    @app.post("/pin_prefix")
    async def pin_prefix(body: PinBody) -> dict:
        await engine.pin_prefix(body.pin_id, body.input_ids)
        return {"ok": True}

    @app.post("/unpin_prefix")
    async def unpin_prefix(body: PinRef) -> dict:
        await engine.unpin_prefix(body.pin_id)
        return {"ok": True}

    @app.post("/flush_cache")
    async def flush_cache() -> Flushed:
        return Flushed(flushed=await engine.flush_cache())

    @app.post("/prefill")
    async def prefill(body: PrefillBody) -> dict:
        await engine.prefill(body.input_ids, body.priority)  # answers once the KV is cached
        return {"ok": True}

    return app
