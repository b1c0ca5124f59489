"""The one conversion from what a face was asked (native sampling config, OpenAI fields) to
the engines' ``SamplingParams``; values the engines cannot take are a 400 naming them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from parrot.schemas import SamplingConfig
from parrot.service.engine.base import SamplingParams
from parrot.service.errors import BadRequestError


def sampling_params(*, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                    seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                    ignore_eos: bool = False, json_schema: dict[str, Any] | None = None) -> SamplingParams:
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=tuple(stop), stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos,
            json_schema=json_schema,
        )
    except ValidationError as exc:
        raise BadRequestError(f"invalid sampling parameters: {exc}") from exc


def from_config(config: SamplingConfig, max_new_tokens: int | None = None) -> SamplingParams:
    """A native output's sampling (``max_new_tokens`` overrides its budget)."""
    return sampling_params(
        max_new_tokens=config.max_tokens if max_new_tokens is None else max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, seed=config.seed,
        stop=config.stop, ignore_eos=config.ignore_eos, json_schema=config.json_schema,
    )
