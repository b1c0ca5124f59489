"""The one conversion from what a face was asked (native sampling config, OpenAI fields) to
the engines' ``SamplingParams``; values the engines cannot take are a 400 naming them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from parrot.schemas import SamplingConfig
from parrot.service.engine.base import SamplingParams
from parrot.service.errors import BadRequestError


def sampling_params(*, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                    seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                    ignore_eos: bool = False, json_schema: dict[str, Any] | None = None,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    repetition_penalty: float = 1.0, logit_bias: Mapping[int, float] | None = None,
                    min_tokens: int = 0, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    if min_tokens > max_new_tokens:
        raise BadRequestError(f"min_tokens ({min_tokens}) must not exceed the output budget "
                              f"({max_new_tokens} tokens)", param="min_tokens")
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=tuple(stop), stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos,
            json_schema=json_schema, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
            logit_bias=dict(logit_bias or {}), min_tokens=min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValidationError as exc:
        param = str(exc.errors()[0]["loc"][0]) if exc.errors() and exc.errors()[0]["loc"] else None
        raise BadRequestError(f"invalid sampling parameters: {exc}", param=param) from exc


def from_config(config: SamplingConfig, max_new_tokens: int | None = None) -> SamplingParams:
    """A native output's sampling (``max_new_tokens`` overrides its budget)."""
    return sampling_params(
        max_new_tokens=config.max_tokens if max_new_tokens is None else max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, seed=config.seed,
        stop=config.stop, ignore_eos=config.ignore_eos, json_schema=config.json_schema,
        presence_penalty=config.presence_penalty, frequency_penalty=config.frequency_penalty,
        repetition_penalty=config.repetition_penalty, logit_bias=config.logit_bias_ids,
        min_tokens=min(config.min_tokens, config.max_tokens if max_new_tokens is None else max_new_tokens),
    )
