"""Penalties, logit_bias, min_tokens and logprobs through the SGLang engine, on SGLang's wire
format (the stand-in server of sglang_standin.py serving a tiny builtin engine)."""

from __future__ import annotations

from typing import Any

import pytest

from parrot.service.engine.base import GenerateRequest, SamplingParams
from parrot.service.engine.sglang import SGLangEngine
from parrot.service.engine.tokenizer import ModelTokenizer
from tests.conftest import run_request
from tests.service.engine.sglang_standin import SAMPLING_KEYS

PROMPT = "Once upon a time"


async def generate(url: str, tokenizer: Any, request: GenerateRequest) -> list:
    engine = SGLangEngine(url, tokenizer=ModelTokenizer(tokenizer, "tiny-llama"))
    try:
        await engine.start()
        return [out async for out in engine.generate(request)]
    finally:
        await engine.shutdown()


async def test_penalties_bias_and_min_tokens_go_under_sglangs_names(standin, tokenizer):
    server = standin()
    ids = tokenizer.encode(PROMPT)
    forced = tokenizer.encode(" banana")[0]
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=2.0,
                              frequency_penalty=2.0, repetition_penalty=1.3, logit_bias={forced: 20.0},
                              min_tokens=4)
    ref, *_ = await run_request(server.engine, ids, sampling, "reference")
    outs = await generate(server.url, tokenizer, GenerateRequest("pen-1", ids, sampling))
    assert [t for o in outs for t in o.token_ids] == ref
    assert ref.count(forced) < 12  # the penalties acted
    [body] = server.generate_bodies()
    sp = body["sampling_params"]
    assert set(sp) <= set(SAMPLING_KEYS) and "return_logprob" not in body
    assert (sp["presence_penalty"], sp["frequency_penalty"], sp["repetition_penalty"]) == (2.0, 2.0, 1.3)
    assert sp["logit_bias"] == {str(forced): 20.0} and sp["min_new_tokens"] == 4
    # A resumed output: SGLang's min_new_tokens counts only what it generates itself.
    resumed = sampling.model_copy(update={"resumed_output_len": 3, "max_new_tokens": 4})
    await generate(server.url, tokenizer, GenerateRequest("pen-2", ids + ref[:3], resumed))
    assert server.generate_bodies()[-1]["sampling_params"]["min_new_tokens"] == 1


@pytest.mark.parametrize("incremental", [False, True])
async def test_logprobs_come_back_per_chunk_and_for_the_prompt(standin, tokenizer, incremental):
    server = standin(incremental_streaming=incremental)
    ids = tokenizer.encode(PROMPT)
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3,
                              prompt_logprobs=3)
    outs = await generate(server.url, tokenizer, GenerateRequest("lp-1", ids, sampling))
    tokens = [t for o in outs for t in o.token_ids]
    entries = [e for o in outs for e in o.logprobs or []]
    assert [e.token_id for e in entries] == tokens and len(tokens) == 6
    for o in outs:
        assert len(o.logprobs or []) == len(o.token_ids)
    for e in entries:
        assert len(e.top) == 3 and e.top[0] == (e.token_id, pytest.approx(e.logprob))
    prompt = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(prompt) == 1 and len(prompt[0]) == len(ids) and prompt[0][0] is None
    assert [e.token_id for e in prompt[0][1:]] == ids[1:]
    [body] = server.generate_bodies()
    assert (body["return_logprob"], body["top_logprobs_num"], body["logprob_start_len"]) == (True, 3, 0)
