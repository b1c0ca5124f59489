"""What ``ChatParrot`` and ``ParrotLLM`` share: their fields, sampling, and Parrot sessions.

Each model invocation runs in its own Parrot session (a ``P.Parrot`` VM): opened
against ``base_url``, or, without one, against the service this process embeds
(``P.Parrot()`` starts it on first use, as the native SDK does), and deleted when
the invocation ends, which cancels whatever it left running. The VM is entered and
left in a context of its own: it is not the caller's "current" VM, and a stream that
LangChain resumes or closes from another context still closes it cleanly.

Native calls run on the service's default model (the first one ``/v1/models``
lists), so ``model`` may only name that one; a ``model`` the service does not serve,
or serves but not as its default, is an error that names it. In embedded mode
``model`` is what the embedded service loads (a local model folder or ``.gguf``
file; ``None`` for the default model).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError

import parrot as P
from parrot.client import ServiceClient
from parrot.errors import ParrotError, ParrotTimeoutError
from parrot.schemas import SamplingConfig

DEFAULT_HTTP_TIMEOUT_S = 60.0  # each HTTP request, when ``timeout`` is not set
RETRY_BACKOFF_S = 0.25  # doubled after each failed attempt to reach the service
# Calls are posted when a result is first awaited, which every invocation does right
# after submitting: the window only guarantees that calls submitted together go together.
BATCH_WINDOW_S = 1.0
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
# Keywords LangChain itself passes along with a call; they do not change the request.
LANGCHAIN_KEYS = ("ls_structured_output_format", "structured_output_format", "stream")


class ParrotModelFields(BaseModel):
    """Connection and sampling fields of the Parrot LangChain models."""

    model_config = ConfigDict(populate_by_name=True)

    base_url: str | None = Field(default_factory=from_env("PARROT_BASE_URL", default=None))
    """The Parrot service, ``http://host:port`` (env ``PARROT_BASE_URL``); ``None`` serves the
    model inside this process (embedded mode)."""
    model: str | None = Field(default=None, alias="model_name")
    """The model; ``None`` is the service's default. See the module docs."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("PARROT_API_KEY", default=None))
    """Sent as a bearer token (env ``PARROT_API_KEY``)."""
    temperature: float | None = Field(default=None, ge=0.0)
    """Sampling temperature; ``None`` and ``0`` are greedy, Parrot's default, so runs repeat."""
    max_tokens: int | None = Field(default=None, ge=1, alias="max_completion_tokens")
    """The most tokens a reply has; ``None`` is the service's default (256)."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    stop: list[str] | str | None = Field(default=None, alias="stop_sequences")
    """Stop strings: the reply ends before the first one it would contain."""
    timeout: float | None = Field(default=None, gt=0.0, alias="request_timeout")
    """Seconds an invocation waits for its reply (``None``: as long as generation takes; a stream
    is not cut) and each HTTP request may take (``None``: 60 s)."""
    max_retries: int = Field(default=2, ge=0)
    """How many more times to try opening a session when the service cannot be reached."""

    _served: dict[str, list[str]] = PrivateAttr(default_factory=dict)  # base URL -> models served
    _served_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "PARROT_API_KEY"}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": self.stop}

    # -- requests ----------------------------------------------------------------------------

    def sampling(self, stop: list[str] | str | None, overrides: Mapping[str, Any],
                 json_schema: dict[str, Any] | None = None) -> SamplingConfig:
        """The sampling of one call: the fields, then per-call ``overrides`` and ``stop``."""
        fields: dict[str, Any] = {key: getattr(self, key) for key in SAMPLING_KEYS}
        fields.update(overrides)
        stops = self.stop if stop is None else stop
        fields["stop"] = [stops] if isinstance(stops, str) else list(stops or [])
        fields["json_schema"] = json_schema
        try:
            return SamplingConfig.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise ValueError(f"invalid sampling parameters: {exc}") from exc

    @staticmethod
    def take_sampling_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
        """Pop the per-call sampling keywords (``max_completion_tokens`` is ``max_tokens``)."""
        overrides = {key: kwargs.pop(key) for key in SAMPLING_KEYS if key in kwargs}
        if "max_completion_tokens" in kwargs:
            overrides["max_tokens"] = kwargs.pop("max_completion_tokens")
        for key in LANGCHAIN_KEYS:
            kwargs.pop(key, None)
        return overrides

    # -- sessions ----------------------------------------------------------------------------

    def _new_vm(self) -> P.Parrot:
        embedded_model = self.model if self.base_url is None else None
        return P.Parrot(self.base_url, api_key=self._api_key(), model=embedded_model,
                        timeout=self.timeout or DEFAULT_HTTP_TIMEOUT_S, batch_window_s=BATCH_WINDOW_S)

    def _api_key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    @contextmanager
    def session(self, model: str | None = None, *,
                retries: int | None = None) -> Iterator[tuple[P.Parrot, str]]:
        """An open Parrot session and the name of the model its calls run on."""
        attempts = (self.max_retries if retries is None else retries) + 1
        for attempt in range(attempts):
            vm, context = self._new_vm(), contextvars.copy_context()
            try:
                context.run(vm.__enter__)
                break
            except ParrotError as exc:
                if attempt + 1 == attempts or not _unreachable(exc):
                    raise
            time.sleep(RETRY_BACKOFF_S * 2 ** attempt)
        try:
            yield vm, self._model_name(vm.base_url or "", self._served_models_sync(vm), model)
        finally:
            context.run(vm.__exit__, None, None, None)

    @asynccontextmanager
    async def asession(self, model: str | None = None, *,
                       retries: int | None = None) -> AsyncIterator[tuple[P.Parrot, str]]:
        """``session`` for async code."""
        attempts = (self.max_retries if retries is None else retries) + 1
        for attempt in range(attempts):
            vm, context = self._new_vm(), contextvars.copy_context()
            try:
                await asyncio.create_task(vm.__aenter__(), context=context)
                break
            except ParrotError as exc:
                if attempt + 1 == attempts or not _unreachable(exc):
                    raise
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** attempt)
        try:
            served = self._served.get(vm.base_url or "")
            if served is None:
                served = await vm.run_async(self._list_models(vm))
            yield vm, self._model_name(vm.base_url or "", served, model)
        finally:
            await asyncio.create_task(vm.__aexit__(None, None, None), context=context)

    def _served_models_sync(self, vm: P.Parrot) -> list[str]:
        served = self._served.get(vm.base_url or "")
        return served if served is not None else vm.run_sync(self._list_models(vm))

    async def _list_models(self, vm: P.Parrot) -> list[str]:
        """The models the service serves, asked once per service (runs on the VM's loop)."""
        client = ServiceClient(vm.base_url or "", api_key=self._api_key(),
                               timeout=self.timeout or DEFAULT_HTTP_TIMEOUT_S)
        try:
            served = await client.list_models()
        finally:
            await client.aclose()
        with self._served_lock:
            self._served[vm.base_url or ""] = served
        return served

    def _model_name(self, url: str, served: list[str], requested: str | None) -> str:
        """The model calls run on; ``requested`` (per call, else the field) must be it."""
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


def _unreachable(exc: ParrotError) -> bool:
    """Whether the service could not be reached at all (worth another try)."""
    cause = exc.__cause__
    return (isinstance(cause, httpx.TransportError) and not isinstance(cause, httpx.TimeoutException)
            and not isinstance(exc, ParrotTimeoutError))
