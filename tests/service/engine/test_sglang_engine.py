"""The SGLang engine against a stand-in SGLang server (see sglang_standin.py) that serves a tiny
random-weight builtin engine behind SGLang's wire format, on a loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from parrot.service.engine.base import (
    EngineUnavailableError,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)
from parrot.service.engine.sglang import SGLangEngine
from parrot.service.engine.tokenizer import ModelTokenizer
from tests.conftest import run_request
from tests.service.engine.sglang_standin import SAMPLING_KEYS

PROMPT = "The quick brown fox jumps over the lazy dog because"


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@asynccontextmanager
async def connected(url: str, tokenizer: Any, **options: Any) -> AsyncIterator[SGLangEngine]:
    engine = SGLangEngine(url, tokenizer=ModelTokenizer(tokenizer, "tiny-llama"), **options)
    try:
        await engine.start()
        yield engine
    finally:
        await engine.shutdown()


async def collect(engine: SGLangEngine, request: GenerateRequest) -> list[GenerateOutput]:
    return [out async for out in engine.generate(request)]


def joined(outs: list[GenerateOutput]) -> tuple[list[int], str]:
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)


async def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_greedy_output_usage_and_server_facts_match_the_builtin_engine(standin, tokenizer):
    server = standin()
    ids = tokenizer.encode(PROMPT)
    ref_tokens, ref_text, ref_last = await run_request(server.engine, ids, greedy(12), "reference")
    async with connected(server.url, tokenizer) as engine:
        assert (engine.kind, engine.url, engine.supports_prefix_control) == ("sglang", server.url, True)
        assert engine.model_name == "tiny-llama"  # the last part of --model-path /models/tiny-llama
        assert engine.max_context_len == server.engine.max_context_len  # from /v1/models
        outs = await collect(engine, GenerateRequest("r1", ids, greedy(12)))
    tokens, text = joined(outs)
    assert (tokens, text) == (ref_tokens, ref_text)
    assert len(outs) > 1 and all(not o.finished for o in outs[:-1])
    last = outs[-1]
    assert last.finished and last.finish_reason == "length" and last.error is None
    assert (last.num_prompt_tokens, last.num_output_tokens) == (len(ids), 12)
    # The same prompt ran just before: all but its last token came from the prefix cache.
    assert ref_last.num_cached_tokens == 0 and last.num_cached_tokens == len(ids) - 1


async def test_cumulative_and_incremental_streams_give_the_same_deltas(standin, tokenizer):
    cumulative = standin()
    incremental = standin(cumulative.engine, incremental_streaming=True)
    # A server whose /server_info misstates its mode: the chunks themselves still tell.
    misreported = standin(cumulative.engine, incremental_streaming=True,
                          server_args={"incremental_streaming_output": False})
    ids = tokenizer.encode("Once upon a time")
    streams = []
    for n, server in enumerate((cumulative, incremental, misreported)):
        async with connected(server.url, tokenizer) as engine:
            assert engine.incremental_streaming == (server is incremental)
            outs = await collect(engine, GenerateRequest(f"s{n}", ids, greedy(10)))
        streams.append([(o.token_ids, o.text, o.num_output_tokens, o.finish_reason) for o in outs])
    wire = [r.body for r in incremental.received("/generate")]
    assert streams[0] == streams[1] == streams[2]
    assert sum(len(t) for t, *_ in streams[0]) == 10
    assert wire and wire[0]["stream"] is True


async def test_the_request_on_the_wire_has_sglang_fields_only(standin, tokenizer):
    server = standin()
    ids = tokenizer.encode(PROMPT)
    sampling = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=0, seed=3,
                              stop=("zzz",), stop_token_ids=(7,), json_schema={"type": "object"})
    async with connected(server.url, tokenizer) as engine:
        outs = await collect(engine, GenerateRequest("wire-1", ids, sampling, priority=7))
        plain = await collect(engine, GenerateRequest("wire-2", ids, greedy(2, resumed_output_len=2)))
        with pytest.raises(InvalidRequestError, match="cannot resume on SGLang"):
            await collect(engine, GenerateRequest(
                "wire-3", ids, sampling.model_copy(update={"resumed_output_len": 2})))
    assert outs[-1].finished and plain[-1].finish_reason == "length"
    first, second = server.generate_bodies()  # the refused resume never left the service
    assert (first["rid"], first["input_ids"], first["priority"], first["stream"]) == ("wire-1", ids, 7, True)
    sp = first["sampling_params"]
    assert set(sp) <= set(SAMPLING_KEYS)
    assert isinstance(sp["json_schema"], str) and json.loads(sp["json_schema"]) == {"type": "object"}
    assert (sp["sampling_seed"], sp["top_k"], sp["top_p"], sp["temperature"]) == (3, -1, 0.9, 0.7)
    assert (sp["stop"], sp["stop_token_ids"], sp["max_new_tokens"]) == (["zzz"], [7], 6)
    assert set(second["sampling_params"]) <= set(SAMPLING_KEYS) - {"json_schema"}


async def test_priority_follows_the_servers_order_and_is_left_out_where_refused(standin, tokenizer):
    low_first = standin(server_args={"schedule_low_priority_values_first": True})
    refusing = standin(low_first.engine, server_args={"enable_priority_scheduling": False,
                                                      "abort_on_priority_when_disabled": True})
    ids = tokenizer.encode(PROMPT)
    for n, server in enumerate((low_first, refusing)):
        async with connected(server.url, tokenizer) as engine:
            outs = await collect(engine, GenerateRequest(f"p{n}", ids, greedy(2), priority=5))
        assert outs[-1].finish_reason == "length"
    assert low_first.generate_bodies()[0]["priority"] == -5
    assert "priority" not in refusing.generate_bodies()[0]


async def test_stop_token_stop_string_and_length_finish_reasons(standin, tokenizer):
    server = standin()
    ids = tokenizer.encode(PROMPT)
    ref_tokens, ref_text, _ = await run_request(server.engine, ids, greedy(20))
    stop = ref_text[len(ref_text) // 2:len(ref_text) // 2 + 3]
    async with connected(server.url, tokenizer) as engine:
        by_token = await collect(engine, GenerateRequest(
            "f1", ids, greedy(20, stop_token_ids=(ref_tokens[4],))))
        by_string = await collect(engine, GenerateRequest("f2", ids, greedy(20, stop=(stop,))))
        by_length = await collect(engine, GenerateRequest("f3", ids, greedy(5)))
    stop_at = ref_tokens.index(ref_tokens[4])
    assert by_token[-1].finish_reason == "stop" and by_token[-1].num_output_tokens == stop_at + 1
    assert joined(by_token)[0] == ref_tokens[: stop_at + 1]
    assert by_string[-1].finish_reason == "stop" and joined(by_string)[1] == ref_text[: ref_text.index(stop)]
    assert by_length[-1].finish_reason == "length" and joined(by_length)[0] == ref_tokens[:5]


async def test_the_standin_rejects_unknown_sampling_keys_as_sglang_does(standin):
    server = standin()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        unknown = http.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"seed": 1}})
        schema_dict = http.post("/generate", json={
            "input_ids": [1, 2, 3], "sampling_params": {"json_schema": {"type": "object"}}})
        fine = http.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1},
                                            "unknown_top_level": True})
    assert unknown.status_code == 400 and unknown.json()["error"].startswith("unknown field `seed`")
    assert schema_dict.status_code == 400 and "expected a string" in schema_dict.json()["error"]
    assert fine.status_code == 200 and fine.json()["meta_info"]["completion_tokens"] == 1


async def test_rejections_raise_invalid_request_before_any_output(standin, tokenizer):
    server = standin()
    ids = tokenizer.encode(PROMPT)
    outs: list[GenerateOutput] = []
    async with connected(server.url, tokenizer) as engine:
        with pytest.raises(InvalidRequestError, match="token ids"):  # an error chunk, after the 200
            async for out in engine.generate(GenerateRequest("bad-1", [*ids, 10**6], greedy(4))):
                outs.append(out)
        with pytest.raises(InvalidRequestError, match="Failed to compile json grammar"):  # an abort
            async for out in engine.generate(GenerateRequest(
                    "bad-2", ids, greedy(4, json_schema={"type": "object", "minProperties": "x"}))):
                outs.append(out)
        with pytest.raises(InvalidRequestError, match="token ids"):  # HTTP 400, not streamed
            await engine.prefill([*ids, 10**6])
        with pytest.raises(InvalidRequestError, match="context length"):  # refused before sending
            await collect(engine, GenerateRequest("bad-3", ids, greedy(engine.max_context_len)))
        assert (await collect(engine, GenerateRequest("ok", ids, greedy(2))))[-1].finish_reason == "length"
    assert outs == []
    assert [b.get("rid") for b in server.generate_bodies()] == ["bad-1", "bad-2", None, "ok"]
    assert server.received("/abort_request") == []  # nothing was left running to abort


async def test_abort_and_closing_the_stream_early_reach_abort_request(standin, tokenizer):
    server = standin()
    ids = tokenizer.encode(PROMPT)
    long = greedy(1500)
    async with connected(server.url, tokenizer) as engine:
        outs = []
        async for out in engine.generate(GenerateRequest("explicit", ids, long)):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("explicit")
        assert outs[-1].finished and outs[-1].finish_reason == "abort" and outs[-1].error is None
        assert len(outs) < 1000

        stream = engine.generate(GenerateRequest("closed", ids, long))
        assert not (await anext(stream)).finished
        assert engine.load().num_latency == 1
        await stream.aclose()
        assert engine.load().num_latency == 0
    assert [r.body["rid"] for r in server.received("/abort_request")] == ["explicit", "closed"]
    await wait_for(lambda: server.engine.load().num_running == 0)
    steps = server.engine.num_steps
    await asyncio.sleep(0.2)
    assert server.engine.num_steps == steps  # nothing runs on after the aborts


async def test_prefill_sends_zero_new_tokens_and_later_requests_hit_the_cache(standin, tokenizer):
    server = standin()
    prefix = tokenizer.encode("You are a helpful assistant. Answer briefly and precisely.")
    async with connected(server.url, tokenizer) as engine:
        await engine.prefill(prefix)
        outs = await collect(engine, GenerateRequest("after", prefix + tokenizer.encode(" Hi"), greedy(2)))
        assert await engine.flush_cache()
        await engine.pin_prefix("pin-1", prefix)  # SGLang has no pins: nothing is sent
        await engine.unpin_prefix("pin-1")
        flushed = await collect(engine, GenerateRequest("again", tokenizer.encode("Unrelated"), greedy(2)))
    bodies = server.generate_bodies()
    assert bodies[0] == {"input_ids": prefix, "sampling_params": {"max_new_tokens": 0}, "stream": False}
    assert len(bodies) == 3 and bodies[2]["input_ids"] == tokenizer.encode("Unrelated")
    assert outs[-1].num_cached_tokens >= len(prefix) - 1 > 0
    assert flushed[-1].num_cached_tokens == 0
    assert len(server.received("/flush_cache")) == 1


async def test_load_sums_the_ranks_of_v1_loads(standin, tokenizer):
    server = standin()
    server.app.state.extra_dp_ranks = [{"dp_rank": 1, "num_running_reqs": 3, "num_waiting_reqs": 2,
                                        "num_used_tokens": 100, "max_total_num_tokens": 1000}]
    own = server.engine.load()
    async with connected(server.url, tokenizer, load_interval_s=0.05) as engine:
        first = engine.load()  # polled once by start()
        server.app.state.extra_dp_ranks[0]["num_waiting_reqs"] = 9
        await wait_for(lambda: engine.load().num_waiting == 9)
    assert (first.num_running, first.num_waiting, first.kv_tokens_used) == (3, 2, 100)
    assert first.kv_tokens_total == own.kv_tokens_total + 1000
    loads = server.received("/v1/loads")
    assert len(loads) >= 2 and all(r.query == {"include": "core"} for r in loads)


async def test_a_server_dying_mid_stream_is_unavailable_after_the_tokens_it_sent(standin, tokenizer):
    server = standin()
    ids = tokenizer.encode(PROMPT)
    ref_tokens, _, _ = await run_request(server.engine, ids, greedy(10), "reference")
    server.app.state.die_after_tokens = 3
    outs: list[GenerateOutput] = []
    async with connected(server.url, tokenizer) as engine:
        with pytest.raises(EngineUnavailableError, match="failed during request dying"):
            async for out in engine.generate(GenerateRequest("dying", ids, greedy(10))):
                outs.append(out)
    assert joined(outs)[0] == ref_tokens[:3] and not any(o.finished for o in outs)


async def test_a_request_the_server_fails_midway_ends_with_its_error(standin, tokenizer):
    server = standin()
    ids = tokenizer.encode(PROMPT)
    ref_tokens, _, _ = await run_request(server.engine, ids, greedy(10), "reference")
    server.app.state.fail_after_tokens = 3
    async with connected(server.url, tokenizer) as engine:
        outs = await collect(engine, GenerateRequest("failing", ids, greedy(10)))
        # The same failure before any output is the server's, not the request's fault.
        server.app.state.fail_after_tokens = 0
        early = await collect(engine, GenerateRequest("failing-early", ids, greedy(10)))
    last = outs[-1]
    assert joined(outs)[0] == ref_tokens[:3]
    assert last.finished and last.finish_reason == "abort" and last.error == "Internal server error"
    assert last.num_output_tokens == 3 and not any(o.error for o in outs[:-1])
    assert len(early) == 1 and early[0].error == "Internal server error" and early[0].token_ids == []


async def test_start_names_the_url_when_the_server_is_down_or_starting(standin, tokenizer):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening
        with pytest.raises(EngineUnavailableError, match=f"{closed_url} is unreachable"):
            async with connected(closed_url, tokenizer):
                pass
    server = standin()
    server.app.state.healthy = False
    with pytest.raises(EngineUnavailableError, match=f"{server.url} is not ready.*503"):
        async with connected(server.url, tokenizer):
            pass
    server.app.state.healthy = True
    async with connected(server.url, tokenizer, model_name="mine", max_context_len=256) as engine:
        assert (engine.model_name, engine.max_context_len) == ("mine", 256)
        assert await engine.health()
        server.app.state.healthy = False
        assert not await engine.health()
