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
    # resumed on another engine): a json_schema constraint continues after them, and the
    # penalties and ``min_tokens`` count them as output.
    resumed_output_len: int = Field(0, ge=0)
    # OpenAI's penalties, over the output's tokens: subtract ``presence_penalty`` from the logit
    # of every token already generated, and ``frequency_penalty`` times its count.
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    # vLLM's (CTRL's) penalty over prompt and output tokens: a seen token's positive logit is
    # divided by it, a negative one multiplied. 1 is off.
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    # Added to the token's logit before sampling (token id -> -100..100).
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=limits.MAX_LOGIT_BIAS)
    # EOS and stop tokens are masked, and stop strings not looked for, until this many tokens.
    min_tokens: int = Field(0, ge=0)
    # Report the log probability of each output token, with this many most likely
    # alternatives (0..MAX_LOGPROBS); None reports none. Computed from the logits the token is
    # sampled from after penalties, bias and constraints, before temperature, top-k and top-p.
    logprobs: int | None = Field(None, ge=0, le=limits.MAX_LOGPROBS)
    # The same for the prompt's tokens (from the model's raw logits; the first has none).
    prompt_logprobs: int | None = Field(None, ge=0, le=limits.MAX_LOGPROBS)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        for token, bias in v.items():
            if token < 0:
                raise ValueError(f"logit_bias token ids must be non-negative (got {token})")
            if not -100.0 <= bias <= 100.0:  # also refuses NaN
                raise ValueError(f"logit_bias values must lie in [-100, 100] (got {bias} for {token})")
        return v

    @property
    def is_greedy(self) -> bool:
        return self.temperature < limits.MIN_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether sampling needs the tokens seen so far (presence, frequency or repetition)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


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
class TokenLogprob:
    """A token's log probability, and the ``top`` most likely tokens at its position as
    ``(token id, logprob)`` pairs, most likely first (as many as the request asked for)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def coerce(cls, value: TokenLogprob | dict[str, Any] | None) -> TokenLogprob | None:
        # Outputs cross process boundaries as JSON (the remote engine): rebuild from dicts.
        if value is None or isinstance(value, TokenLogprob):
            return value
        return cls(int(value["token_id"]), float(value["logprob"]),
                   [(int(t), float(lp)) for t, lp in value.get("top") or []])


@dataclass
class GenerateOutput:
    """One incremental update of a request: tokens and text produced since the last one.

    ``logprobs`` (when the sampling asked for them) holds one entry per token of
    ``token_ids``; ``prompt_logprobs`` one per prompt token (None for the first), sent once,
    on the request's first output."""

    request_id: str
    token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    num_output_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when the engine failed this request
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None:
            self.logprobs = [lp for lp in map(TokenLogprob.coerce, self.logprobs) if lp is not None]
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = [TokenLogprob.coerce(lp) for lp in self.prompt_logprobs]


@dataclass
class Load:
    num_running: int
    num_waiting: int
    kv_tokens_used: int
    kv_tokens_total: int
    cached_tokens: int  # tokens held by the prefix cache
    num_latency: int = 0  # latency requests running or waiting
    num_preemptions: int = 0  # requests preempted since the engine started (a counter)
    num_steps: int = 0  # forward passes run since the engine started (a counter)
    busy_s: float = 0.0  # seconds spent running steps since the engine started (a counter)


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
    # Whether requests sent together that share a prefix not cached yet compute it once (the
    # engine holds the others until it is cached); the service then sends a task group's
    # requests without prefilling their shared start first.
    computes_shared_prefix_once: bool = False

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

    async def flush_cache(self) -> bool:
        """Empty the prefix cache (SGLang's ``/flush_cache``, vLLM's ``reset_prefix_cache``): what
        running requests and pins hold stays. False when the engine has no cache it can flush, or
        refuses now."""
        return False

    async def pin_prefix(self, pin_id: str, token_ids: list[int]) -> None:
        """Keep the cached KV of this prefix from eviction until unpinned; a prefix not cached
        yet is protected as soon as it is. Pinning a ``pin_id`` in use replaces that pin.
        Engines without prefix control ignore it."""
        return None

    async def unpin_prefix(self, pin_id: str) -> None:
        """Drop a pin (unknown ids are ignored); its prefix becomes evictable again."""
        return None

    async def prefill(self, token_ids: list[int], priority: int = 0) -> None:
        """Compute and cache the KV of ``token_ids`` without generating (a task group's shared
        prefix before the group fans out, a waiting call's known prompt start), ranked as a
        throughput request of ``priority`` (that of whatever waits for it). Engines without
        prefix control ignore it."""
        return None
