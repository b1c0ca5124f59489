"""What the Parrot chat and text connectors share: connection fields, sessions, and running one
request's call where it belongs.

Where a call goes (the scope rule): inside a graph run (``scope.current_scope()``, opened
by ``enable_graphs``) on the same service (``scope.base_url == self.base_url``), the call
is submitted to the run's session, with the run's placeholders turned into inputs, and its
reply is waited for (or streamed) there; otherwise each request opens a session of its own
(``sessions()``: against ``base_url``, or the service this process embeds), submits its
call, waits for it, and closes the session.

Errors are SK's: a request the connector cannot send (non-text content, unsupported settings)
is refused before anything reaches the service, a refusal by the service is a
``ServiceInvalidRequestError``, and a service that cannot be reached, a failed call or a
timeout is a ``ServiceResponseException``; each message says what went wrong.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

from openai.types.completion_usage import PromptTokensDetails
from pydantic import Field, PrivateAttr, SecretStr
from semantic_kernel.connectors.ai.completion_usage import CompletionUsage
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.exceptions import (
    ServiceInvalidExecutionSettingsError,
    ServiceInvalidRequestError,
    ServiceResponseException,
)
from semantic_kernel.services.ai_service_client_base import AIServiceClientBase

import parrot as P
from parrot.errors import ParrotError
from parrot.integrations.common.calls import CallOutcome, astream, await_all, submit
from parrot.integrations.common.placeholders import Placeholders
from parrot.integrations.common.sessions import ServiceSessions
from parrot.integrations.semantic_kernel.scope import GraphScope, current_scope
from parrot.integrations.semantic_kernel.settings import ParrotPromptExecutionSettings
from parrot.sdk import PreparedCall

# ``ai_model_id`` until the service says which model it serves (SK requires a non-empty one).
UNKNOWN_MODEL_ID = "parrot-default"

CallBuilder = Callable[[Placeholders | None], PreparedCall]


class ParrotServiceBase(AIServiceClientBase):
    """Connection fields of the Parrot connectors (see the module docs for where calls go).

    ``ai_model_id`` names the model (``None``: the service's default one; native calls run on
    that model only); until the first reply it is ``UNKNOWN_MODEL_ID`` unless given, then the
    name the service reports. ``service_id`` defaults to the given ``ai_model_id``, else
    ``"parrot"``.
    """

    MODEL_PROVIDER_NAME: ClassVar[str] = "parrot"

    base_url: str | None = None
    """The Parrot service, ``http://host:port`` (env ``PARROT_BASE_URL``); ``None`` serves the default
    model inside this process (embedded mode)."""
    api_key: SecretStr | None = None
    """Sent as a bearer token (env ``PARROT_API_KEY``)."""
    timeout: float | None = Field(default=None, gt=0.0)
    """Seconds a request waits for its reply (``None``: as long as generation takes; a stream is not
    cut) and each HTTP request may take (``None``: 60 s)."""
    max_retries: int = Field(default=2, ge=0)
    """How many more times to try opening a session when the service cannot be reached."""

    _model: str | None = PrivateAttr(default=None)  # the model asked for (None: the default one)
    _sessions: ServiceSessions | None = PrivateAttr(default=None)

    def __init__(self, ai_model_id: str | None = None, service_id: str | None = None, *,
                 base_url: str | None = None, api_key: str | SecretStr | None = None,
                 timeout: float | None = None, max_retries: int = 2, **kwargs: Any) -> None:
        """Connect to ``base_url`` (or env ``PARROT_BASE_URL``; neither: the embedded service)."""
        base_url = base_url or os.environ.get("PARROT_BASE_URL") or None
        api_key = api_key or os.environ.get("PARROT_API_KEY") or None
        super().__init__(ai_model_id=ai_model_id or UNKNOWN_MODEL_ID,
                         service_id=service_id or ai_model_id or "parrot",
                         base_url=base_url.rstrip("/") if base_url else None, api_key=api_key,
                         timeout=timeout, max_retries=max_retries, **kwargs)
        self._model = ai_model_id

    def service_url(self) -> str | None:
        return self.base_url

    def get_prompt_execution_settings_class(self) -> type[PromptExecutionSettings]:
        return ParrotPromptExecutionSettings

    def sessions(self) -> ServiceSessions:
        """The sessions this connector opens (built once, so a service's models are asked once)."""
        if self._sessions is None:
            api_key = self.api_key.get_secret_value() if self.api_key is not None else None
            self._sessions = ServiceSessions(self.base_url, api_key=api_key, model=self._model,
                                             timeout=self.timeout, max_retries=self.max_retries)
        return self._sessions

    def parrot_settings(self, settings: PromptExecutionSettings) -> ParrotPromptExecutionSettings:
        """``settings`` as this connector's own class (SK's generic ones are converted)."""
        if not isinstance(settings, ParrotPromptExecutionSettings):
            settings = ParrotPromptExecutionSettings.from_prompt_execution_settings(settings)
        assert isinstance(settings, ParrotPromptExecutionSettings)  # nosec
        return settings

    # -- running calls ---------------------------------------------------------------------------

    def joined_scope(self, settings: ParrotPromptExecutionSettings) -> GraphScope | None:
        """The graph run this request joins, if any (see the module docs)."""
        scope = current_scope()
        if scope is None or scope.base_url != self.base_url:
            return None
        if settings.ai_model_id and settings.ai_model_id not in (scope.model_name, self._model):
            raise ServiceInvalidExecutionSettingsError(
                f"ai_model_id {settings.ai_model_id!r}: this graph runs on {scope.model_name!r}")
        return scope

    async def run_call(self, build: CallBuilder, settings: ParrotPromptExecutionSettings,
                       ) -> tuple[CallOutcome, str]:
        """Build the request's call (given the placeholders of the graph it joins, if any),
        submit it, and wait for its outcome; returns it with the name of the model that ran it."""
        scope = self.joined_scope(settings)
        try:
            if scope is not None:
                call = build(scope.placeholders)
                submit(scope.vm, [call])
                [result] = await await_all(scope.vm, [call], perf=scope.placeholders.criterion,
                                           timeout=self.timeout)
                return _ok(result), scope.model_name
            call = build(None)  # a request that cannot be sent fails before a session opens
            async with self.sessions().asession(settings.ai_model_id) as (vm, model_name):
                self._learn(model_name)
                submit(vm, [call])
                [result] = await await_all(vm, [call], perf=P.LATENCY, timeout=self.timeout)
            return _ok(result), model_name
        except ParrotError as exc:
            raise self.service_error(exc) from exc

    async def stream_call(self, build: CallBuilder, settings: ParrotPromptExecutionSettings,
                          ) -> AsyncIterator[tuple[str, str | CallOutcome]]:
        """``run_call``, streamed: the model's name with each text delta, then with the outcome."""
        scope = self.joined_scope(settings)
        try:
            if scope is not None:
                call = build(scope.placeholders)
                submit(scope.vm, [call])
                async for item in astream(scope.vm, call, perf=P.TTFT):
                    yield scope.model_name, item
                return
            call = build(None)
            async with self.sessions().asession(settings.ai_model_id) as (vm, model_name):
                self._learn(model_name)
                submit(vm, [call])
                async for item in astream(vm, call, perf=P.TTFT):
                    yield model_name, item
        except ParrotError as exc:
            raise self.service_error(exc) from exc

    def service_error(self, exc: ParrotError) -> ServiceResponseException:
        """SK's exception for a Parrot error: a request the service refused, or any other failure."""
        where = f"{type(self).__name__} ({self.base_url or 'embedded Parrot service'})"
        if exc.status_code is not None and 400 <= exc.status_code < 500:
            return ServiceInvalidRequestError(f"{where}: the service refused the request: {exc}")
        return ServiceResponseException(f"{where}: {exc}")

    def _learn(self, model_name: str) -> None:
        if self.ai_model_id != model_name:
            self.ai_model_id = model_name


def completion_usage(outcome: CallOutcome) -> CompletionUsage:
    """Token counts as SK's OpenAI connector reports them; prompt tokens read from the prefix cache
    are ``prompt_tokens_details.cached_tokens``."""
    return CompletionUsage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.output_tokens,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=outcome.cached_tokens))


def _ok(result: CallOutcome | ParrotError) -> CallOutcome:
    if isinstance(result, ParrotError):
        raise result
    return result
