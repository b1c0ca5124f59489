"""Parrot sessions for framework integrations: one per invocation, against a service or the
embedded one.

A session is a ``P.Parrot`` VM opened against ``base_url``, or, without one, against the
service this process embeds (``P.Parrot()`` starts it on first use, as the native SDK
does), and deleted when the invocation ends, which cancels whatever it left running. The
invocation does not wait for that delete: it has its results, and the round trip would be
one more than an OpenAI call costs.
The VM is entered and left in a context of its own: it is not the caller's "current"
VM, and a stream that the framework resumes or closes from another context still closes
it cleanly. A request that cannot connect to the service is tried again, with backoff
(``max_retries``).

Native calls run on the service's default model (the first one ``/v1/models`` lists),
so ``model`` may only name that one; a ``model`` the service does not serve, or serves
but not as its default, is an error that names it. In embedded mode ``model`` is what
the embedded service loads (a local model folder or ``.gguf`` file; ``None`` for the
default model).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import parrot as P
from parrot.client import ServiceClient
from parrot.errors import ParrotError

DEFAULT_HTTP_TIMEOUT_S = 60.0  # each HTTP request, when no timeout is set
# Calls are posted when a result is first awaited, which every invocation does right
# after submitting: the window only guarantees that calls submitted together go together.
BATCH_WINDOW_S = 1.0


class ServiceSessions:
    """Opens sessions on one service for one integration object (thread-safe)."""

    def __init__(self, base_url: str | None, *, api_key: str | None = None, model: str | None = None,
                 timeout: float | None = None, max_retries: int = 2) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self._served: dict[str, list[str]] = {}  # base URL -> models served
        self._served_lock = threading.Lock()

    def _new_vm(self, retries: int | None) -> P.Parrot:
        embedded_model = self.model if self.base_url is None else None
        return P.Parrot(self.base_url, api_key=self.api_key, model=embedded_model,
                        timeout=self.timeout or DEFAULT_HTTP_TIMEOUT_S, batch_window_s=BATCH_WINDOW_S,
                        max_retries=self.max_retries if retries is None else retries,
                        close_in_background=True)

    @contextmanager
    def session(self, model: str | None = None, *,
                retries: int | None = None) -> Iterator[tuple[P.Parrot, str]]:
        """An open Parrot session and the name of the model its calls run on; ``retries``
        (default ``max_retries``): tries more for each request that could not connect."""
        vm, context = self._new_vm(retries), contextvars.copy_context()
        context.run(vm.__enter__)
        try:
            served = self._served.get(vm.base_url or "")
            if served is None:
                served = vm.run_sync(self._list_models(vm))
            yield vm, self._model_name(vm.base_url or "", served, model)
        finally:
            context.run(vm.__exit__, None, None, None)

    @asynccontextmanager
    async def asession(self, model: str | None = None, *,
                       retries: int | None = None) -> AsyncIterator[tuple[P.Parrot, str]]:
        """``session`` for async code."""
        vm, context = self._new_vm(retries), contextvars.copy_context()
        await asyncio.create_task(vm.__aenter__(), context=context)
        try:
            served = self._served.get(vm.base_url or "")
            if served is None:
                served = await vm.run_async(self._list_models(vm))
            yield vm, self._model_name(vm.base_url or "", served, model)
        finally:
            await asyncio.create_task(vm.__aexit__(None, None, None), context=context)

    async def _list_models(self, vm: P.Parrot) -> list[str]:
        """The models the service serves, asked once per service (runs on the VM's loop)."""
        client = ServiceClient(vm.base_url or "", api_key=self.api_key,
                               timeout=self.timeout or DEFAULT_HTTP_TIMEOUT_S, max_retries=self.max_retries)
        try:
            served = await client.list_models()
        finally:
            await client.aclose()
        with self._served_lock:
            self._served[vm.base_url or ""] = served
        return served

    def _model_name(self, url: str, served: list[str], requested: str | None) -> str:
        """The model calls run on; ``requested`` (per call, else the configured one) must be it."""
        if not served:
            raise ParrotError(f"the Parrot service at {url} serves no model yet")
        requested = requested or self.model
        if requested is None or (self.base_url is None and requested == self.model):
            return served[0]  # the default, or the model the embedded service was started with
        if requested not in served:
            raise ParrotError(f"the Parrot service at {url} does not serve model {requested!r} "
                              f"(it serves {', '.join(map(repr, served))})")
        if requested != served[0]:
            raise ParrotError(f"model {requested!r} is served at {url}, but native calls run on its "
                              f"default model {served[0]!r}; use that one")
        return requested
