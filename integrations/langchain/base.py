"""What ``ChatParrot`` and ``ParrotLLM`` share: their fields, sampling, and Parrot sessions.

Each model invocation runs in its own Parrot session (see
``parrot.integrations.common.sessions``: against ``base_url``, or the service this
process embeds; ``model`` may only name the service's default model).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

import httpx
from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError

import parrot as P
from parrot.errors import ParrotError
from parrot.integrations.common.sessions import ServiceSessions
from parrot.schemas import SamplingConfig

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

    _opener: ServiceSessions | None = PrivateAttr(default=None)

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

    def _sessions(self) -> ServiceSessions:
        # Built once per model object, so the models a service serves are asked only once.
        if self._opener is None:
            api_key = self.api_key.get_secret_value() if self.api_key is not None else None
            self._opener = ServiceSessions(self.base_url, api_key=api_key, model=self.model,
                                           timeout=self.timeout, max_retries=self.max_retries)
        return self._opener

    def session(self, model: str | None = None, *,
                retries: int | None = None) -> AbstractContextManager[tuple[P.Parrot, str]]:
        """An open Parrot session and the name of the model its calls run on."""
        return self._sessions().session(model, retries=retries)

    def tokenize(self, body: dict[str, Any]) -> list[int]:
        """The service's ``POST /tokenize`` of ``body`` (a prompt or chat messages): the token ids
        its model sees, counted by the model's own tokenizer and chat template."""
        url = self.base_url
        if url is None:
            from parrot.embedded import embedded_url  # the one lazy start of the embedded service

            url = embedded_url(self.model)
        headers = {"Authorization": f"Bearer {self.api_key.get_secret_value()}"} if self.api_key else {}
        if self.model is not None and self.base_url is not None:
            body = {"model": self.model, **body}
        try:
            resp = httpx.post(f"{url.rstrip('/')}/tokenize", json=body, headers=headers,
                              timeout=self.timeout or 60.0)
        except httpx.HTTPError as exc:
            raise ParrotError(f"cannot reach the Parrot service at {url}: {exc!r}") from exc
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text
            raise ParrotError(f"the Parrot service could not tokenize ({resp.status_code}): {message}")
        return list(resp.json()["tokens"])

    def asession(self, model: str | None = None, *,
                 retries: int | None = None) -> AbstractAsyncContextManager[tuple[P.Parrot, str]]:
        """``session`` for async code."""
        return self._sessions().asession(model, retries=retries)
