"""The engines behind one service.

Two ways in:
- configured at start (``add``): the in-process builtin engine, and servers named on the
  command line (SGLang, OpenAI-compatible). One that fails is marked *down*: it gets no
  work, and is probed every ``probe_interval_s`` until it answers again.
- registered engine processes (``POST /v1/engines``), which then heartbeat their load.
  One that misses heartbeats for ``expiry_s``, or whose connection breaks, is dropped:
  its connection closes, so its in-flight requests fail with ``EngineUnavailableError``
  and the dispatcher re-runs them on another engine. It registers again when back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from parrot.service.engine.base import Engine, EngineError
from parrot.service.engine.remote.client import RemoteEngine
from parrot.service.engine.remote.protocol import EngineRegistration, LoadInfo
from parrot.service.errors import BadRequestError, NotFoundError

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_EXPIRY_S = 5.0
DEFAULT_PROBE_INTERVAL_S = 2.0

NOT_AN_ENGINE = "the URL did not answer as a Parrot engine"
REGISTRATION_TIMEOUT_S = 30.0  # for a registering engine's /info (and its tokenizer) to load


@dataclass(eq=False)
class EngineHandle:
    id: str
    engine: Engine
    registered: bool = False  # an engine process that registered itself and heartbeats
    down: str | None = None  # why a configured engine gets no work now, until it answers again
    started: bool = False
    last_heartbeat: float = field(default_factory=time.monotonic)

    @property
    def model(self) -> str:
        return self.engine.model_name

    @property
    def kind(self) -> str:
        return self.engine.kind

    @property
    def url(self) -> str | None:
        return self.engine.url


class EngineRegistry:
    def __init__(self, *, heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
                 expiry_s: float = DEFAULT_EXPIRY_S,
                 probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.expiry_s = expiry_s
        self.probe_interval_s = probe_interval_s
        self.handles: dict[str, EngineHandle] = {}
        self._ids = itertools.count()
        self._changed = asyncio.Event()  # set whenever an engine joins
        self._expiry_task: asyncio.Task | None = None
        self._probes: dict[str, asyncio.Task] = {}
        self.on_removed: list[Callable[[EngineHandle], None]] = []

    # ---- membership -------------------------------------------------------------------
    def add(self, engine: Engine) -> EngineHandle:
        """An engine configured at start (started with the registry)."""
        return self._add(EngineHandle(f"engine-{next(self._ids)}", engine))

    async def register_remote(self, registration: EngineRegistration) -> EngineHandle:
        """Connect to an engine process; the same URL registering again replaces the old entry."""
        for handle in list(self.handles.values()):
            if handle.registered and handle.url == registration.url:
                await self.remove(handle.id, "it registered again")
        engine = RemoteEngine(registration.url)
        try:
            await asyncio.wait_for(engine.start(), REGISTRATION_TIMEOUT_S)  # a URL that trickles
        except Exception as exc:
            await engine.shutdown()
            # One answer whatever happened: echoing what the URL answered, or telling a refused
            # connection from a wrong reply, would make this route a probe of the service's
            # network (server-side request forgery). The cause goes to the operator's log.
            logger.warning("engine registration from %s refused: %s", registration.url,
                           type(exc).__name__)
            raise BadRequestError(NOT_AN_ENGINE, param="url") from None
        if engine.model_name != registration.model:
            await engine.shutdown()
            raise BadRequestError(f"the engine at {registration.url} does not serve the model "
                                  f"{registration.model!r}", param="model")
        handle = self._add(EngineHandle(f"engine-{next(self._ids)}", engine, registered=True, started=True))
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
        if handle.registered:
            await handle.engine.shutdown()  # fails its in-flight streams

    async def failed(self, handle: EngineHandle, reason: str) -> None:
        """``handle``'s engine stopped answering: drop a registered process (it registers again
        when back); mark a configured engine down and probe it until it answers."""
        if handle.registered:
            await self.remove(handle.id, reason)
            return
        if handle.down is not None or handle.id not in self.handles:
            return
        handle.down = reason
        logger.warning("engine %s (%s) is down: %s", handle.id, handle.url or handle.kind, reason)
        for callback in self.on_removed:  # its cache is gone or unknown
            callback(handle)
        self._probes[handle.id] = asyncio.create_task(self._probe(handle))

    async def _probe(self, handle: EngineHandle) -> None:
        try:
            while handle.id in self.handles:
                await asyncio.sleep(self.probe_interval_s)
                if await handle.engine.health():
                    if not handle.started:
                        try:
                            await handle.engine.start()
                        except EngineError:
                            continue
                        handle.started = True
                    handle.down = None
                    logger.info("engine %s (%s) answers again", handle.id, handle.url or handle.kind)
                    self._changed.set()
                    self._changed = asyncio.Event()
                    return
        finally:
            self._probes.pop(handle.id, None)

    # ---- queries ---------------------------------------------------------------------
    def engines(self, model: str | None = None) -> list[EngineHandle]:
        """The engines that take work now (none marked down), of ``model`` if given."""
        return [h for h in self.handles.values()
                if h.down is None and (model is None or h.model == model)]

    def models(self) -> list[str]:
        """Every model served, an engine marked down included (its model is still served)."""
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
        """Start the configured engines. A server that does not start now is marked down and
        probed like one that failed later; the in-process engine must start."""
        for handle in self.engines():
            try:
                await handle.engine.start()
                handle.started = True
            except EngineError as exc:
                if handle.url is None:
                    raise
                await self.failed(handle, f"it did not start: {exc}")
        self._expiry_task = asyncio.create_task(self._expire())

    async def stop(self) -> None:
        for task in [self._expiry_task, *self._probes.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for handle in list(self.handles.values()):
            await handle.engine.shutdown()
        self.handles.clear()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(self.heartbeat_interval_s, self.expiry_s) / 2)
            now = time.monotonic()
            for handle in list(self.handles.values()):
                if handle.registered and now - handle.last_heartbeat > self.expiry_s:
                    await self.remove(handle.id, f"no heartbeat for {self.expiry_s:g} s")
                elif not handle.registered and handle.down is None and not handle.engine.alive:
                    # An in-process engine whose runner died: route work elsewhere, and let
                    # health say so (its probe keeps failing; only a restart brings it back).
                    await self.failed(handle, "its engine thread stopped")
