"""``ParrotLLM``: a LangChain text-completion model whose prompts run as Parrot template calls.

``BaseLLM._generate`` receives every prompt of a ``generate`` / ``batch`` at once: they
become one call each (the prompt's text, then one generated output), submitted
together in one session as one graph.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

import parrot as P
from parrot.errors import ParrotError
from parrot.integrations.common.calls import (
    CallOutcome,
    astream,
    await_all,
    prepare_completion,
    stream,
    submit,
    wait,
)
from parrot.integrations.langchain.base import ParrotModelFields
from parrot.integrations.langchain.constrained import response_format_schema
from parrot.schemas import SamplingConfig


class ParrotLLM(ParrotModelFields, BaseLLM):
    """A text-completion model served by Parrot: the prompt is sent as it is (no chat template).

        from parrot.integrations.langchain import ParrotLLM

        llm = ParrotLLM(base_url="http://127.0.0.1:8000", max_tokens=32)
        llm.invoke("The capital of France is")
        llm.batch(["1 + 1 =", "2 + 2 ="])   # one graph submission, one session

    Each generation's ``generation_info`` has ``finish_reason``; ``llm_output`` has
    ``token_usage`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
    ``cached_tokens``) and ``model_name``. Per-call keywords: the sampling fields,
    ``model``, and ``json_schema`` (or OpenAI's ``response_format``) for constrained output.
    """

    @property
    def _llm_type(self) -> str:
        return "parrot"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "parrot"
        params["ls_model_name"] = kwargs.get("model") or self.model or "default"
        params.setdefault("ls_temperature", self.temperature if self.temperature is not None else 0.0)
        return params

    def completion_sampling(self, stop: list[str] | None,
                            kwargs: dict[str, Any]) -> tuple[SamplingConfig, str | None]:
        """The sampling and model of this invocation's calls (per-call keywords override fields)."""
        kwargs = dict(kwargs)
        overrides = self.take_sampling_overrides(kwargs)
        model = kwargs.pop("model", None)
        schema = kwargs.pop("json_schema", None)
        if "response_format" in kwargs:
            if schema is not None:
                raise ValueError("pass json_schema or response_format, not both")
            schema = response_format_schema(kwargs.pop("response_format"))
        if kwargs:
            raise ValueError(f"unsupported parameters for {type(self).__name__}: {', '.join(sorted(kwargs))}")
        return self.sampling(stop, overrides, schema), model

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        sampling, model = self.completion_sampling(stop, kwargs)
        with self.session(model) as (vm, model_name):
            calls = [prepare_completion(p, sampling) for p in prompts]
            submit(vm, calls)
            results = wait(vm, calls, perf=_criterion(len(calls)), timeout=self.timeout)
        return _result(results, model_name)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> LLMResult:
        sampling, model = self.completion_sampling(stop, kwargs)
        async with self.asession(model) as (vm, model_name):
            calls = [prepare_completion(p, sampling) for p in prompts]
            submit(vm, calls)
            results = await await_all(vm, calls, perf=_criterion(len(calls)), timeout=self.timeout)
        return _result(results, model_name)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        sampling, model = self.completion_sampling(stop, kwargs)
        with self.session(model) as (vm, model_name):
            call = prepare_completion(prompt, sampling)
            submit(vm, [call])
            for item in stream(vm, call):
                chunk = _chunk(item, model_name)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        sampling, model = self.completion_sampling(stop, kwargs)
        async with self.asession(model) as (vm, model_name):
            call = prepare_completion(prompt, sampling)
            submit(vm, [call])
            async for item in astream(vm, call):
                chunk = _chunk(item, model_name)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk


def _criterion(num_calls: int) -> P.Criterion:
    # One prompt is waited for as soon as possible; a batch is done when all of it is.
    return P.LATENCY if num_calls == 1 else P.THROUGHPUT


def _result(results: list[CallOutcome | ParrotError], model_name: str) -> LLMResult:
    failed = next((r for r in results if isinstance(r, ParrotError)), None)
    if failed is not None:
        raise failed
    outcomes = [r for r in results if isinstance(r, CallOutcome)]
    prompt = sum(r.prompt_tokens for r in outcomes)
    completion = sum(r.output_tokens for r in outcomes)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "cached_tokens": sum(r.cached_tokens for r in outcomes)}
    generations = [[Generation(text=r.text, generation_info={"finish_reason": r.finish_reason})]
                   for r in outcomes]
    return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": model_name})


def _chunk(item: str | CallOutcome, model_name: str) -> GenerationChunk:
    if isinstance(item, str):
        return GenerationChunk(text=item)
    usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.output_tokens,
             "total_tokens": item.prompt_tokens + item.output_tokens, "cached_tokens": item.cached_tokens}
    return GenerationChunk(text="", generation_info={"finish_reason": item.finish_reason,
                                                     "model_name": model_name, "token_usage": usage})
