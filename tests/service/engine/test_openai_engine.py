"""``OpenAIEngine`` against a real ``parrot serve`` process on loopback (a tiny random llama), and
through small proxies in front of it that answer like other servers do: token-id prompts
refused, 429/503 before passing on, a stream that breaks off, an API key check."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from parrot.service.engine.base import (
    EngineError,
    EngineUnavailableError,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)
from parrot.service.engine.openai import OpenAIEngine, UpstreamError, rejects_token_prompt, retry_after_s
from parrot.service.engine.tokenizer import ModelTokenizer
from tests.conftest import serve_in_thread
from tests.service.conftest import Upstream, free_port

GREEDY = dict(temperature=0.0, max_new_tokens=12)
CHAT = [{"role": "user", "content": "Tell me about parrots."}]
OPENAI_TYPE_ERROR = "Invalid type for 'prompt': expected a string, but got an array instead."


@dataclass
class Script:
    """What the proxy does to the requests it gets; everything else passes on unchanged."""

    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # answered first, in order
    reject_token_prompts: bool = False  # 400 a list prompt, as OpenAI words it
    api_key: str | None = None  # 401 requests without this bearer key
    break_after_events: int | None = None  # cut the connection after this many stream events
    error_after_events: int | None = None  # send an error event after this many stream events
    seen: list[tuple[float, str, Any]] = field(default_factory=list)  # (time, path, body) of each

    def prompts(self) -> list[Any]:
        return [body.get("prompt") for _, path, body in self.seen if path == "completions"]

    def times(self) -> list[float]:
        return [t for t, path, _ in self.seen if path != "models"]


class CutOff(Exception):
    """Raised inside a streamed body: uvicorn drops the connection mid-response."""


@dataclass
class Proxy:
    api: str = ""
    script: Script = field(default_factory=Script)


def proxy_app(upstream_api: str, proxy: Proxy) -> FastAPI:
    app = FastAPI()

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def relay(path: str, request: Request) -> Response:
        script = proxy.script
        raw = await request.body()
        body = json.loads(raw) if raw else None
        script.seen.append((time.monotonic(), path, body))
        if script.api_key and request.headers.get("authorization") != f"Bearer {script.api_key}":
            return JSONResponse({"error": {"message": "Incorrect API key provided.",
                                           "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
        if script.failures and path != "models":
            status, headers = script.failures.pop(0)
            return JSONResponse({"error": {"message": f"busy, try later (test answer {status})",
                                           "type": "server_error"}}, status, headers=headers)
        if script.reject_token_prompts and isinstance(body, dict) and isinstance(body.get("prompt"), list):
            return JSONResponse({"error": {"message": OPENAI_TYPE_ERROR, "type": "invalid_request_error",
                                           "param": "prompt", "code": "invalid_type"}}, 400)
        client = httpx.AsyncClient(base_url=upstream_api, timeout=60)
        resp = await client.send(client.build_request(
            request.method, f"/{path}", content=raw, headers={"content-type": "application/json"}),
            stream=True)

        async def events() -> AsyncIterator[bytes]:
            try:
                sent = 0
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        if sent == script.break_after_events:
                            raise CutOff
                        if sent == script.error_after_events:
                            error = {"error": {"message": "the engine failed: out of memory",
                                               "type": "server_error"}}
                            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
                            return
                        sent += 1
                    yield (line + "\n").encode()
            finally:
                await resp.aclose()
                await client.aclose()

        return StreamingResponse(events(), status_code=resp.status_code,
                                 media_type=resp.headers.get("content-type"))

    return app


@pytest.fixture(scope="module")
def proxy_server(upstream) -> Iterator[Proxy]:
    proxy = Proxy()
    with serve_in_thread(proxy_app(upstream.api, proxy)) as url:
        proxy.api = f"{url}/v1"
        yield proxy


@pytest.fixture
def proxy(proxy_server) -> Proxy:
    """The module's proxy with a fresh script (tests set ``proxy.script``'s fields)."""
    proxy_server.script = Script()
    return proxy_server


@pytest.fixture(scope="module")
def model_tokenizer(tokenizer) -> ModelTokenizer:
    return ModelTokenizer(tokenizer, "tiny")


@pytest.fixture
def engine_at(model_tokenizer) -> Callable[..., AbstractAsyncContextManager[OpenAIEngine]]:
    """``async with engine_at(base_url, **options) as engine``: a started engine, shut down after."""

    @asynccontextmanager
    async def start(base_url: str, **options: Any) -> AsyncIterator[OpenAIEngine]:
        engine = OpenAIEngine(base_url, tokenizer=model_tokenizer, **options)
        try:
            await engine.start()
            yield engine
        finally:
            await engine.shutdown()

    return start


def request(ids: list[int], rid: str = "r", messages: list[dict[str, str]] | None = None,
            **sampling: Any) -> GenerateRequest:
    return GenerateRequest(rid, list(ids), SamplingParams(**{**GREEDY, **sampling}), messages=messages)


async def run(engine: OpenAIEngine, req: GenerateRequest) -> list[GenerateOutput]:
    return [out async for out in engine.generate(req)]


def joined(outs: list[GenerateOutput]) -> str:
    return "".join(o.text for o in outs)


# ---- output -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_format", ["tokens", "text", "chat"])
async def test_greedy_stream_equals_the_upstream_answer_in_every_prompt_format(
        upstream, engine_at, model_tokenizer, prompt_format):
    if prompt_format == "chat":
        ids, messages = model_tokenizer.apply_chat_template(CHAT), CHAT
    else:
        ids, messages = model_tokenizer.encode("The parrot said to the crow"), None
    ref = await upstream.completion(ids, max_tokens=12)
    async with engine_at(upstream.api, prompt_format=prompt_format) as engine:
        assert (engine.kind, engine.url, engine.model_name) == ("openai", upstream.api, upstream.model)
        assert engine.max_context_len == 2048  # from the listing's max_model_len
        outs = await run(engine, request(ids, messages=messages))
        assert engine.active_prompt_format == prompt_format
    final = outs[-1]
    assert joined(outs) == ref["choices"][0]["text"] != ""
    assert len(outs) > 2  # streamed, not one whole answer
    assert all(o.token_ids == [] and o.request_id == "r" for o in outs)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert final.finish_reason == ref["choices"][0]["finish_reason"]
    assert final.num_prompt_tokens == ref["usage"]["prompt_tokens"] == len(ids)
    assert final.num_output_tokens == ref["usage"]["completion_tokens"]
    assert final.error is None


async def test_usage_finish_reasons_and_cached_tokens(upstream, engine_at, model_tokenizer):
    ids = model_tokenizer.encode("A long shared preamble about birds, their songs and their feathers. " * 3)
    async with engine_at(upstream.api) as engine:
        first = await run(engine, request(ids, rid="a", max_new_tokens=6, ignore_eos=True))
        assert (first[-1].finish_reason, first[-1].num_output_tokens) == ("length", 6)
        # The same prompt again: the upstream's prefix cache serves it, and usage says so.
        again = await run(engine, request(ids, rid="b", max_new_tokens=6, ignore_eos=True))
        assert joined(again) == joined(first)
        assert 0 < again[-1].num_cached_tokens <= len(ids)
        assert again[-1].num_prompt_tokens == len(ids)
        # A stop string ends the output before it, with finish reason "stop".
        text = joined(first)
        stop = first[2].text
        stopped = await run(engine, request(ids, rid="c", max_new_tokens=6, ignore_eos=True, stop=(stop,)))
        assert joined(stopped) == text[:text.index(stop)]
        assert stopped[-1].finish_reason == "stop"
        # max_new_tokens=0 asks for nothing; OpenAI servers take no max_tokens=0, so nothing is sent.
        [empty] = await run(engine, request(ids, rid="d", max_new_tokens=0))
        assert (empty.finished, empty.finish_reason, empty.num_output_tokens) == (True, "length", 0)


@pytest.mark.parametrize("schema", [{"type": "object"},
                                    {"type": "object", "properties": {"a": {"type": "integer"}},
                                     "required": ["a"]}])
async def test_json_schema_goes_as_response_format(upstream, engine_at, model_tokenizer, schema):
    ids = model_tokenizer.encode("Answer in JSON:")
    fmt = ({"type": "json_object"} if schema == {"type": "object"}
           else {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}})
    ref = await upstream.completion(ids, max_tokens=16, response_format=fmt)
    async with engine_at(upstream.api) as engine:
        outs = await run(engine, request(ids, max_new_tokens=16, json_schema=schema))
    assert joined(outs) == ref["choices"][0]["text"]
    assert joined(outs).lstrip().startswith("{")


async def test_requests_this_backend_cannot_serve_are_refused_before_sending(engine_at, proxy):
    async with engine_at(proxy.api, prompt_format="chat") as engine:
        with pytest.raises(InvalidRequestError, match="serves chat only"):
            await run(engine, request([1, 2, 3]))
    async with engine_at(proxy.api) as engine:
        with pytest.raises(InvalidRequestError, match="JSON-constrained"):
            await run(engine, request([1, 2, 3], json_schema={"type": "object"}, resumed_output_len=2))
    assert proxy.script.times() == []  # nothing but /models reached the server


async def test_penalties_bias_and_min_tokens_pass_on_and_logprobs_are_refused(
        upstream, engine_at, proxy, model_tokenizer):
    ids = model_tokenizer.encode("Once upon a time")
    token = model_tokenizer.encode(" banana")[0]
    fields = {"presence_penalty": 2.0, "frequency_penalty": 2.0, "logit_bias": {str(token): 20.0},
              "repetition_penalty": 1.5, "min_tokens": 3}
    ref = await upstream.completion(ids, max_tokens=12, ignore_eos=True, **fields)
    async with engine_at(proxy.api) as engine:
        outs = await run(engine, request(ids, max_new_tokens=12, ignore_eos=True, presence_penalty=2.0,
                                         frequency_penalty=2.0, logit_bias={token: 20.0},
                                         repetition_penalty=1.5, min_tokens=3))
        assert joined(outs) == ref["choices"][0]["text"]
        [(_, _, sent)] = [seen for seen in proxy.script.seen if seen[1] == "completions"]
        assert {k: sent[k] for k in fields} == fields
        for asked in ({"logprobs": 2}, {"prompt_logprobs": 0}):
            with pytest.raises(InvalidRequestError, match="logprobs"):
                await run(engine, request(ids, **asked))


# ---- prompt format fallback -------------------------------------------------------------------


async def test_auto_falls_back_to_text_once_the_server_refuses_token_ids(
        upstream, engine_at, proxy, model_tokenizer):
    proxy.script.reject_token_prompts = True
    ids = model_tokenizer.encode("Parrots can live for decades")
    ref = await upstream.completion(ids, max_tokens=12)
    async with engine_at(proxy.api) as engine:
        assert engine.active_prompt_format == "tokens"
        outs = await run(engine, request(ids))
        assert joined(outs) == ref["choices"][0]["text"]
        assert engine.active_prompt_format == "text"
        await run(engine, request(ids, rid="again"))
    # One refused token-id prompt, then text only: the engine remembered.
    text = model_tokenizer.prompt_text(ids)
    assert proxy.script.prompts() == [ids, text, text]
    # Told to send token ids, it does not switch: the refusal is the caller's error.
    async with engine_at(proxy.api, prompt_format="tokens") as engine:
        with pytest.raises(InvalidRequestError, match="Invalid type for 'prompt'"):
            await run(engine, request(ids))


@pytest.mark.parametrize("status,message,param,code,refused", [
    (400, OPENAI_TYPE_ERROR, "prompt", "invalid_type", True),
    (400, "'$.prompt' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
     None, None, True),
    (400, "[{'type': 'string_type', 'loc': ('body', 'prompt', 'str'), 'msg': 'Input should be a valid "
          "string', 'input': [1, 2]}]", None, None, True),
    (400, "prompt: prompt must be a string, a non-empty list of strings, a list of token ids, or a list "
          "of non-empty token-id lists", "prompt", None, True),
    (422, "Failed to deserialize the JSON body into the target type: prompt: invalid type: sequence, "
          "expected a string at line 1 column 12", None, None, True),
    (400, "json: cannot unmarshal array into Go struct field CompletionRequest.prompt of type string",
     None, None, True),
    (400, "Unmapped prompt format. Your prompt is neither a list of strings nor a string.", None, None, True),
    # Not about the prompt's type: no fallback.
    (400, "the prompt (3 tokens) plus max_tokens (5000) exceeds the model's context length of 2048 "
          "tokens; at most 2045 can be generated", "max_tokens", "context_length_exceeded", False),
    (400, "This model's maximum context length is 4097 tokens, however you requested 5000 tokens (10 in "
          "your prompt; 4990 for the completion). Please reduce your prompt; or completion length.",
     None, None, False),
    (400, "prompt token ids must lie in [0, 49152)", None, None, False),
    (400, "temperature: Input should be less than or equal to 2", "temperature", None, False),
    (500, OPENAI_TYPE_ERROR, "prompt", None, False),
])
def test_which_refusals_mean_no_token_id_prompts(status, message, param, code, refused):
    assert rejects_token_prompt(UpstreamError(status, message, param, code)) is refused


# ---- retries and errors -------------------------------------------------------------------


async def test_retries_honour_retry_after_then_succeed(upstream, engine_at, proxy, model_tokenizer):
    ids = model_tokenizer.encode("Retry me")
    ref = await upstream.completion(ids, max_tokens=12)
    proxy.script.failures = [(429, {"Retry-After": "0.2"}), (503, {})]
    async with engine_at(proxy.api, max_retries=3) as engine:
        outs = await run(engine, request(ids))
    assert joined(outs) == ref["choices"][0]["text"]
    times = proxy.script.times()
    assert len(times) == 3
    assert times[1] - times[0] >= 0.2  # the server's Retry-After, not a shorter backoff


async def test_exhausted_retries_make_the_engine_unavailable(engine_at, proxy):
    now = email.utils.formatdate(time.time(), usegmt=True)  # an HTTP date: retry right away
    proxy.script.failures = [(503, {"Retry-After": now})] * 3
    async with engine_at(proxy.api, max_retries=2) as engine:
        with pytest.raises(EngineUnavailableError, match=r"failed 3 tries.*HTTP 503.*busy, try later"):
            await run(engine, request([10, 20, 30]))
    assert len(proxy.script.times()) == 3


def test_retry_after_forms():
    assert retry_after_s(httpx.Headers({"Retry-After": "1.5"})) == 1.5
    assert retry_after_s(httpx.Headers({"retry-after-ms": "250", "Retry-After": "9"})) == 0.25
    later = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after_s(httpx.Headers({"Retry-After": later}), now=1_000_000) == 30
    assert retry_after_s(httpx.Headers({"Retry-After": "3600"})) == 60  # capped
    assert retry_after_s(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after_s(httpx.Headers({})) is None


async def test_an_upstream_400_is_an_invalid_request_with_its_message(upstream, engine_at, model_tokenizer):
    async with engine_at(upstream.api) as engine:
        with pytest.raises(InvalidRequestError, match="exceeds the model's context length of 2048"):
            await run(engine, request(model_tokenizer.encode("Too long"), max_new_tokens=5000))
        assert engine.active_prompt_format == "tokens"  # not mistaken for a prompt-type refusal
        assert engine.load().num_running == engine.load().num_waiting == 0


async def test_an_error_event_mid_stream_is_a_failed_final_output(engine_at, proxy, model_tokenizer):
    proxy.script.error_after_events = 2
    async with engine_at(proxy.api) as engine:
        outs = await run(engine, request(model_tokenizer.encode("Fail later"), ignore_eos=True))
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].error == "the engine failed: out of memory"


async def test_a_stream_that_breaks_off_is_never_sent_again(engine_at, proxy, model_tokenizer):
    proxy.script.break_after_events = 2
    async with engine_at(proxy.api, max_retries=3) as engine:
        outs: list[GenerateOutput] = []
        with pytest.raises(EngineUnavailableError, match="broke off"):
            async for out in engine.generate(request(model_tokenizer.encode("Break"), ignore_eos=True)):
                outs.append(out)
    assert len(outs) == 2 and not outs[-1].finished
    assert len(proxy.script.times()) == 1


# ---- concurrency, cancellation, abort -------------------------------------------------------


async def test_the_concurrency_limit_queues_requests_here(upstream, engine_at, model_tokenizer):
    ids = model_tokenizer.encode("Two at once")
    async with engine_at(upstream.api, max_concurrency=1) as engine:
        samples: list[tuple[int, int, int]] = []

        async def watch() -> None:
            while True:
                load = engine.load()
                samples.append((load.num_running, load.num_waiting, load.num_latency))
                await asyncio.sleep(0.001)

        watcher = asyncio.ensure_future(watch())
        try:
            results = await asyncio.gather(
                run(engine, request(ids, rid="x", max_new_tokens=16, ignore_eos=True)),
                run(engine, request(ids, rid="y", max_new_tokens=16, ignore_eos=True)))
        finally:
            watcher.cancel()
        assert (1, 1, 2) in samples
        assert max(running for running, _, _ in samples) == 1
        assert [r[-1].num_output_tokens for r in results] == [16, 16]
        assert engine.load().num_running == engine.load().num_waiting == engine.load().num_latency == 0


async def wait_for_upstream_abort(upstream: Upstream, before: float) -> None:
    deadline = time.monotonic() + 10
    while aborted_so_far(upstream) <= before:
        assert time.monotonic() < deadline, "the upstream never saw the request go away"
        await asyncio.sleep(0.05)


def aborted_so_far(upstream: Upstream) -> float:
    return upstream.metric("parrot_requests_total", endpoint="completions", finish_reason="abort")


async def test_closing_a_stream_early_aborts_the_upstream_request(upstream, engine_at, model_tokenizer):
    before = aborted_so_far(upstream)
    async with engine_at(upstream.api) as engine:
        # Long enough to still run when the stream closes; aborted, it costs nothing more.
        stream = engine.generate(request(model_tokenizer.encode("Go on"), max_new_tokens=1000,
                                         ignore_eos=True))
        first = await anext(stream)
        assert not first.finished
        await stream.aclose()
        assert engine.load().num_running == 0
        await wait_for_upstream_abort(upstream, before)


async def test_abort_ends_the_stream_with_finish_reason_abort(upstream, engine_at, model_tokenizer):
    before = aborted_so_far(upstream)
    async with engine_at(upstream.api) as engine:
        outs = []
        async for out in engine.generate(request(model_tokenizer.encode("Stop me"), rid="victim",
                                                 max_new_tokens=1000, ignore_eos=True)):
            outs.append(out)
            if len(outs) == 1:
                await engine.abort("victim")
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        assert 0 < outs[-1].num_output_tokens < 1000
        await wait_for_upstream_abort(upstream, before)
    # A request waiting for a slot is aborted too, without ever being sent.
    async with engine_at(upstream.api, max_concurrency=1) as engine:
        ids = model_tokenizer.encode("Queue")
        running = asyncio.ensure_future(run(engine, request(ids, rid="first", max_new_tokens=16)))
        queued = asyncio.ensure_future(run(engine, request(ids, rid="second", max_new_tokens=16)))
        while engine.load().num_waiting == 0:
            await asyncio.sleep(0.001)
        await engine.abort("second")
        [out] = await queued
        assert (out.finish_reason, out.num_output_tokens, out.text) == ("abort", 0, "")
        assert (await running)[-1].finish_reason in ("stop", "length")


# ---- start, health, keys ----------------------------------------------------------------------


async def test_a_closed_port_is_a_clear_unavailable_error(model_tokenizer):
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = OpenAIEngine(url, tokenizer=model_tokenizer, connect_timeout_s=2)
    try:
        with pytest.raises(EngineUnavailableError, match=f"cannot reach the server at {url}"):
            await engine.start()
        assert await engine.health() is False
    finally:
        await engine.shutdown()


async def test_an_unknown_model_is_a_clear_error(upstream, engine_at):
    with pytest.raises(EngineError, match=f"does not serve model 'gpt-9'; it lists '{upstream.model}'"):
        async with engine_at(upstream.api, model="gpt-9"):
            pass
    async with engine_at(upstream.api, model=upstream.model, max_context_len=512) as engine:
        assert engine.max_context_len == 512  # the caller's word wins over the listing
        assert await engine.health() is True


async def test_a_refused_api_key_says_so(engine_at, proxy, model_tokenizer):
    proxy.script.api_key = "sk-right"
    with pytest.raises(EngineError, match="refused the API key.*Incorrect API key"):
        async with engine_at(proxy.api, api_key="sk-wrong"):
            pass
    async with engine_at(proxy.api, api_key="sk-right") as engine:
        outs = await run(engine, request(model_tokenizer.encode("With a key"), max_new_tokens=4))
        assert outs[-1].finished and outs[-1].error is None
