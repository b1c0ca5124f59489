"""The engines behind one service: in-process ones, and engine processes that register over HTTP.

An engine process registers (``POST /v1/engines``) and then heartbeats its load. One
that misses heartbeats for ``expiry_s``, or whose connection breaks mid-request, is
dropped: its connection closes, so its in-flight requests fail with
``EngineUnavailableError`` and the executor re-runs them on another engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from parrot.service.engine.base import Engine
from parrot.service.engine.remote import RemoteEngine
from parrot.service.engine.remote_protocol import EngineRegistration, LoadInfo
from parrot.service.errors import BadRequestError, NotFoundError

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_EXPIRY_S = 5.0


@dataclass(eq=False)
class EngineHandle:
    id: str
    engine: Engine
    kind: Literal["local", "remote"]
    url: str | None = None
    last_heartbeat: float = field(default_factory=time.monotonic)

    @property
    def model(self) -> str:
        return self.engine.model_name


class EngineRegistry:
    def __init__(self, *, heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
                 expiry_s: float = DEFAULT_EXPIRY_S) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.expiry_s = expiry_s
        self.handles: dict[str, EngineHandle] = {}
        self._ids = itertools.count()
        self._changed = asyncio.Event()  # set whenever an engine joins
        self._expiry_task: asyncio.Task | None = None
        self.on_removed: list[Callable[[EngineHandle], None]] = []

    # ---- membership -------------------------------------------------------------------
    def add_local(self, engine: Engine) -> EngineHandle:
        return self._add(EngineHandle(f"engine-{next(self._ids)}", engine, "local"))

    async def register_remote(self, registration: EngineRegistration) -> EngineHandle:
        """Connect to an engine process; the same URL registering again replaces the old entry."""
        for handle in list(self.handles.values()):
            if handle.url == registration.url:
                await self.remove(handle.id, "it registered again")
        engine = RemoteEngine(registration.url)
        try:
            await engine.start()
        except Exception as exc:
            await engine.shutdown()
            raise BadRequestError(f"cannot reach the engine at {registration.url}: {exc}",
                                  param="url") from exc
        if engine.model_name != registration.model:
            await engine.shutdown()
            raise BadRequestError(f"the engine at {registration.url} serves {engine.model_name!r}, "
                                  f"not {registration.model!r}", param="model")
        handle = self._add(EngineHandle(f"engine-{next(self._ids)}", engine, "remote", registration.url))
        logger.info("engine %s registered from %s (%s)", handle.id, handle.url, handle.model)
        return handle

    def _add(self, handle: EngineHandle) -> EngineHandle:
        self.handles[handle.id] = handle
        self._changed.set()
        self._changed = asyncio.Event()
        return handle

    def heartbeat(self, engine_id: str, load: LoadInfo) -> None:
        handle = self.get(engine_id)
        handle.last_heartbeat = time.monotonic()
        if isinstance(handle.engine, RemoteEngine):
            handle.engine.update_load(load)

    def get(self, engine_id: str) -> EngineHandle:
        handle = self.handles.get(engine_id)
        if handle is None:
            raise NotFoundError(f"engine {engine_id!r} is not registered", param="engine_id")
        return handle

    async def remove(self, engine_id: str, reason: str) -> None:
        handle = self.handles.pop(engine_id, None)
        if handle is None:
            return
        logger.warning("engine %s dropped: %s", engine_id, reason)
        for callback in self.on_removed:
            callback(handle)
        if handle.kind == "remote":
            await handle.engine.shutdown()  # fails its in-flight streams

    # ---- queries ---------------------------------------------------------------------
    def engines(self, model: str | None = None) -> list[EngineHandle]:
        return [h for h in self.handles.values() if model is None or h.model == model]

    def models(self) -> list[str]:
        return list(dict.fromkeys(h.model for h in self.handles.values()))

    @property
    def default_model(self) -> str | None:
        models = self.models()
        return models[0] if models else None

    async def wait_for_engines(self, model: str | None, timeout_s: float) -> list[EngineHandle]:
        """Engines serving ``model`` (any model if None), waiting up to ``timeout_s`` for one to join."""
        deadline = time.monotonic() + timeout_s
        while not (found := self.engines(model)):
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return found

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        for handle in self.engines():
            await handle.engine.start()
        self._expiry_task = asyncio.create_task(self._expire())

    async def stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
        for handle in list(self.handles.values()):
            await handle.engine.shutdown()
        self.handles.clear()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(self.heartbeat_interval_s, self.expiry_s) / 2)
            now = time.monotonic()
            for handle in list(self.handles.values()):
                if handle.kind == "remote" and now - handle.last_heartbeat > self.expiry_s:
                    await self.remove(handle.id, f"no heartbeat for {self.expiry_s:g} s")
