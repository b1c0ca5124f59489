"""The one async interface every engine backend implements, and every engine error.

A request carries token ids and sampling parameters; ``generate`` streams
incremental outputs until one of them says ``finished``. Backends: ``builtin``
(embedded torch runner), ``remote`` (the builtin engine in another process),
``sglang`` (SGLang's native HTTP API) and ``openai`` (any OpenAI-compatible server).
Text <-> tokens is not the engine's job: each engine holds the ``ModelTokenizer`` of
the model it serves, which the service uses to build prompts.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from parrot import limits
from parrot.service.engine.tokenizer import ModelTokenizer

FinishReason = Literal["stop", "length", "abort"]


class EngineError(Exception):
    """An engine failed to serve a request."""


class EngineUnavailableError(EngineError):
    """The engine cannot be reached (its process died, the network failed, it is overloaded):
    the work may run again on another engine."""


class InvalidRequestError(ValueError):
    """A request an engine cannot serve as asked (too long, bad parameter); maps to HTTP 400."""


class SamplingParams(BaseModel):
    """How to pick tokens. ``temperature`` below ``limits.MIN_TEMPERATURE`` (or ``top_k == 1``)
    is greedy. ``seed`` takes any 64-bit value, signed or unsigned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=0)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 keeps every token")
    seed: int | None = Field(None, ge=limits.MIN_SEED, le=limits.MAX_SEED)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Constrain the output to JSON that validates against this JSON Schema ({"type": "object"}:
    # any JSON object). The output ends when the JSON is complete; engines that cannot
    # constrain reject it.
    json_schema: dict[str, Any] | None = None
    # The last this-many prompt tokens are this output's own earlier tokens (a generation
    # resumed on another engine): a json_schema constraint continues after them.
    resumed_output_len: int = Field(0, ge=0)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def is_greedy(self) -> bool:
        return self.temperature < limits.MIN_TEMPERATURE or self.top_k == 1


Objective = Literal["latency", "throughput"]


@dataclass
class GenerateRequest:
    """One generation. ``objective``/``priority``/``group_id`` come from the app's graph:
    higher priority is served first; requests of one group feed the same consumer."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    objective: Objective = "latency"
    priority: int = 0
    group_id: str | None = None
    # The chat messages the prompt renders, when it came from chat: backends that speak
    # chat (an OpenAI-compatible server without token-id prompts) send these instead.
    messages: list[dict[str, str]] | None = None


@dataclass
class GenerateOutput:
    """One incremental update of a request: tokens and text produced since the last one."""

    request_id: str
    token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    num_output_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when the engine failed this request


@dataclass
class Load:
    num_running: int
    num_waiting: int
    kv_tokens_used: int
    kv_tokens_total: int
    cached_tokens: int  # tokens held by the prefix cache
    num_latency: int = 0  # latency requests running or waiting


class Engine(abc.ABC):
    """An LLM engine the service can send requests to.

    ``tokenizer`` is the served model's tokenizer and chat template, used by the service
    to build prompts; ``kind`` names the backend (``builtin``, ``remote``, ``sglang``,
    ``openai``) and ``url`` where it is reached, if anywhere.
    """

    kind: str = "engine"
    url: str | None = None
    model_name: str
    max_context_len: int
    tokenizer: ModelTokenizer
    # Whether the engine keeps prefixes the service asks for (``pin_prefix``, ``prefill``);
    # without it, placement still follows what the engine probably cached.
    supports_prefix_control: bool = False

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect or load; raises ``EngineError`` with a clear message when it cannot."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream outputs of ``request``; raises ``InvalidRequestError`` before any output when
        the engine rejects the request, ``EngineUnavailableError`` when the engine is gone.
        Closing the stream early aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``finish_reason == "abort"``."""

    async def set_priority(self, request_id: str, priority: int, objective: Objective) -> None:
        """Re-rank a request that is queued or running (a new fetch raised its importance).
        Engines that cannot re-rank a request in flight ignore it."""
        return None

    @abc.abstractmethod
    def load(self) -> Load: ...

    async def health(self) -> bool:
        """Whether the engine answers now (probed while it is marked down)."""
        return True

    @property
    def alive(self) -> bool:
        """False once the engine can never serve again without a restart (an in-process
        runner thread that died); a server that stopped answering may come back, so it stays
        alive and is marked down instead."""
        return True

    async def pin_prefix(self, pin_id: str, token_ids: list[int]) -> None:
        """Keep the cached KV of this prefix from eviction until unpinned; a prefix not cached
        yet is protected as soon as it is. Pinning a ``pin_id`` in use replaces that pin.
        Engines without prefix control ignore it."""
        return None

    async def unpin_prefix(self, pin_id: str) -> None:
        """Drop a pin (unknown ids are ignored); its prefix becomes evictable again."""
        return None

    async def prefill(self, token_ids: list[int]) -> None:
        """Compute and cache the KV of ``token_ids`` without generating (a task group's shared
        prefix, before the group fans out). Engines without prefix control ignore it."""
        return None
