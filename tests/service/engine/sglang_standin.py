"""A stand-in SGLang server: a stand-in that follows SGLang's documented wire format field by
field; SGLang itself is GPU-only and never installed where our tests run.

It serves a real ``BuiltinEngine`` (a tiny random-weight model in tests) behind the routes of
SGLang 0.5.x's native API, as read from the ``sglang==0.5.23`` wheel:

- ``/generate`` (``entrypoints/http_server.py``): the body is first checked against SGLang's
  JSON contract (``sglang/api/v1/api_types.py``): unknown ``sampling_params`` keys and wrong
  types are an HTTP 400 whose body is ``{"error": "<serde-style text>"}``. Checks SGLang
  makes while tokenizing (``managers/tokenizer_manager.py``: context length, sampling values)
  are a 400 ``{"error": {"message": ...}}`` without streaming, and a
  ``data: {"error": {"message", "type", "code", "retryable"}}`` chunk with streaming (its
  stream has already answered 200). A JSON schema that does not compile is its scheduler's
  finding: the request ends with ``finish_reason {"type": "abort", "status_code": 400, ...}``.
- Streams send ``data: {"text", "output_ids", "meta_info"}`` chunks holding everything so far,
  or only what is new with ``incremental_streaming=True`` (``--incremental-streaming-output``),
  then ``data: [DONE]``. ``finish_reason`` is null until the end, then
  ``{"type": "stop", "matched": ...}``, ``{"type": "length", "length": N}`` or
  ``{"type": "abort", "message": ..., "status_code": ..., "err_type": ...}``.
- ``/abort_request``, ``/v1/loads`` (``entrypoints/v1_loads.py``, ``managers/load_snapshot.py``),
  ``/health``, ``/server_info``, ``/model_info``, ``/v1/models``, ``/flush_cache``.

Test hooks on ``app.state``: ``requests`` (every ``Received`` request, in order),
``healthy = False`` (``/health`` answers 503, as while SGLang starts), ``die_after_tokens = N``
(a stream is cut after N output tokens with no finish and no ``[DONE]``, as when the server
process dies), ``fail_after_tokens = N`` (after N output tokens the request ends with an
``abort`` carrying a 500, as when SGLang's scheduler fails it), ``extra_dp_ranks`` (more
per-rank entries for ``/v1/loads``).

Where the builtin engine cannot do what SGLang's sampling keys ask (``min_p``, ``regex``,
``n`` > 1, ...), the stand-in refuses the request rather than ignore the key. Penalties,
``logit_bias``, ``min_new_tokens`` and logprobs (``return_logprob``, ``top_logprobs_num``,
``logprob_start_len`` 0 or -1) are served by the builtin engine.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from parrot.service.engine.base import GenerateOutput, GenerateRequest, InvalidRequestError, SamplingParams
from parrot.service.engine.builtin.engine import BuiltinEngine

SGLANG_VERSION = "0.5.23"
TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary" top_k

# SGLang's sampling_params keys and their defaults (api_types.SamplingParams). The builtin engine
# honours the first group; the second only at these defaults.
_HONOURED_KEYS = {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k",
                  "ignore_eos", "json_schema", "sampling_seed", "frequency_penalty", "presence_penalty",
                  "repetition_penalty", "min_new_tokens", "logit_bias"}
_DEFAULT_ONLY: dict[str, Any] = {
    "stop_regex": None, "min_p": 0.0, "n": 1, "regex": None, "ebnf": None,
    "structural_tag": None, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "no_stop_trim": False, "stream_interval": None, "custom_params": None,
    "beam_width": None, "watermark": None, "choice": [],
}
# In SGLang's declared order, which its "unknown field" message lists.
SAMPLING_KEYS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)
_INT_KEYS = {"max_new_tokens", "top_k", "min_new_tokens", "n", "stream_interval", "sampling_seed",
             "beam_width"}
_FLOAT_KEYS = {"temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
               "repetition_penalty"}
_STR_KEYS = {"json_schema", "regex", "ebnf", "structural_tag"}
_BOOL_KEYS = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
_LOAD_SECTIONS = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}


@dataclass
class Received:
    """One request the stand-in got: its route, query and JSON body (None when it had none)."""

    path: str
    query: dict[str, str]
    body: Any


class ContractError(ValueError):
    """The body breaks SGLang's JSON contract: a 400 before anything runs."""


class RequestError(ValueError):
    """A check SGLang's tokenizer manager makes: a 400, or an error chunk once streaming."""


class _ServerDied(Exception):
    """Raised inside a stream to cut the connection, as a crashed server does."""


class _HideServerDeaths(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _ServerDied))


def _describe(v: Any) -> str:
    # serde's names for unexpected values, as SGLang's contract errors print them.
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    return "sequence" if isinstance(v, list) else "map"


def check_contract(body: Any) -> dict[str, Any]:
    """The parts of SGLang's ``GenerateRequest`` contract the stand-in serves; raises
    ``ContractError`` with SGLang's message text."""
    if not isinstance(body, dict):
        raise ContractError(f"invalid type: {_describe(body)}, expected struct GenerateRequest")
    sampling = body.get("sampling_params")
    if sampling is not None:
        if not isinstance(sampling, dict):  # a list is a batch, which the stand-in does not serve
            raise ContractError(f"invalid type: {_describe(sampling)}, expected struct SamplingParams")
        for key, value in sampling.items():
            if key not in SAMPLING_KEYS:
                listed = ", ".join(f"`{k}`" for k in SAMPLING_KEYS)
                raise ContractError(f"unknown field `{key}`, expected one of {listed}")
            if value is None:
                continue
            if key in _INT_KEYS and (not isinstance(value, int) or isinstance(value, bool)):
                raise ContractError(f"invalid type: {_describe(value)}, expected i64")
            if key in _FLOAT_KEYS and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise ContractError(f"invalid type: {_describe(value)}, expected f64")
            if key in _STR_KEYS and not isinstance(value, str):
                raise ContractError(f"invalid type: {_describe(value)}, expected a string")
            if key in _BOOL_KEYS and not isinstance(value, bool):
                raise ContractError(f"invalid type: {_describe(value)}, expected a boolean")
    priority = body.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        raise ContractError(f"invalid type: {_describe(priority)}, expected i64")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise ContractError(f"invalid type: {_describe(body['stream'])}, expected a boolean")
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise ContractError(f"invalid type: {_describe(rid)}, expected a string")
    return body


def create_sglang_standin(engine: BuiltinEngine, *, incremental_streaming: bool = False,
                          model_path: str = "/models/tiny-llama",
                          server_args: dict[str, Any] | None = None) -> FastAPI:
    """An app that answers as ``python -m sglang.launch_server --model-path <model_path>
    --enable-priority-scheduling`` would, serving ``engine``; ``server_args`` overrides what
    ``/server_info`` reports."""
    logging.getLogger("uvicorn.error").addFilter(_HideServerDeaths())
    app = FastAPI()
    app.state.requests = []
    app.state.healthy = True
    app.state.die_after_tokens = None
    app.state.fail_after_tokens = None
    app.state.extra_dp_ranks = []
    stats = {"prompt_tokens": 0, "cached_tokens": 0}
    args: dict[str, Any] = {
        "model_path": model_path,
        "tokenizer_path": model_path,
        "served_model_name": model_path,  # SGLang's default when no name is given
        "context_length": None,  # only set by --context-length
        "incremental_streaming_output": incremental_streaming,
        "enable_priority_scheduling": True,
        "schedule_low_priority_values_first": False,
        "abort_on_priority_when_disabled": False,
        "priority_scheduling_preemption_threshold": 10,
        "skip_tokenizer_init": False,
        **(server_args or {}),
    }

    async def record(request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        app.state.requests.append(Received(request.url.path, dict(request.query_params), body))
        return body

    def engine_request(body: dict[str, Any]) -> tuple[GenerateRequest, str | None]:
        """The builtin request for an SGLang body, and why its JSON schema is unusable if it is;
        raises ``RequestError`` for what SGLang's tokenizer manager (or ``SamplingParams.verify``)
        refuses."""
        if (body.get("input_ids") is None) == (body.get("text") is None):
            raise RequestError("Either text, input_ids or input_embeds should be provided.")
        if body.get("input_ids") is not None:
            ids = body["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise RequestError("input_ids must be a list of token ids (batches are not served here)")
        elif isinstance(body["text"], str):
            ids = engine.tokenizer.hf.encode(body["text"])  # SGLang adds the BOS as the tokenizer does
        else:
            raise RequestError("text must be a string (batches are not served here)")
        raw_sp = body.get("sampling_params") or {}
        sp = {k: v for k, v in raw_sp.items() if v is not None}  # null means the default
        for key, default in _DEFAULT_ONLY.items():
            if key in sp and sp[key] != default:
                raise RequestError(f"the SGLang stand-in's engine cannot honour {key}={sp[key]!r}")
        top_k = sp.get("top_k", -1)
        if top_k == 0 or top_k < -1:
            raise RequestError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
        temperature = float(sp.get("temperature", 1.0))
        if temperature < 0:
            raise RequestError(f"temperature must be a non-negative finite number, got {temperature}.")
        top_p = float(sp.get("top_p", 1.0))
        if not 0.0 < top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}.")
        # An explicit null lets the output run to the end of the context.
        max_new = sp.get("max_new_tokens", 128 if "max_new_tokens" not in raw_sp else
                         max(engine.max_context_len - len(ids), 0))
        if max_new < 0:
            raise RequestError(f"max_new_tokens must be at least 0, got {max_new}.")
        stop = sp.get("stop") or ()
        schema = sp.get("json_schema")
        json_schema, grammar_error = None, None
        if schema is not None:
            try:
                json_schema = json.loads(schema)
            except ValueError as exc:
                grammar_error = f"Failed to compile json grammar: {exc}"
            if not isinstance(json_schema, dict):
                json_schema = None
                grammar_error = grammar_error or "Failed to compile json grammar: a schema is an object"
        # Logprobs (top-level keys): triples [logprob, token id, text] in meta_info.
        num_top = int(body.get("top_logprobs_num") or 0)
        wants_logprobs = bool(body.get("return_logprob"))
        prompt_from = body.get("logprob_start_len")
        try:
            sampling = SamplingParams(
                logprobs=num_top if wants_logprobs else None,
                prompt_logprobs=num_top if wants_logprobs and prompt_from == 0 else None,
                presence_penalty=float(sp.get("presence_penalty", 0.0)),
                frequency_penalty=float(sp.get("frequency_penalty", 0.0)),
                repetition_penalty=float(sp.get("repetition_penalty", 1.0)),
                min_tokens=int(sp.get("min_new_tokens", 0)),
                logit_bias={int(k): float(v) for k, v in (sp.get("logit_bias") or {}).items()},
                max_new_tokens=max_new,
                temperature=temperature,
                top_p=top_p,
                top_k=-1 if top_k in (-1, TOP_K_ALL) else top_k,
                seed=sp.get("sampling_seed"),
                stop=(stop,) if isinstance(stop, str) else tuple(stop),
                stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
                ignore_eos=bool(sp.get("ignore_eos", False)),
                json_schema=json_schema,
            )
        except ValidationError as exc:  # values SGLang's verify() refuses too (e.g. an empty stop)
            raise RequestError(str(exc)) from exc
        request = GenerateRequest(str(body.get("rid") or uuid.uuid4().hex), list(ids), sampling,
                                  priority=int(body.get("priority") or 0))
        try:
            engine.validate(request)  # context length, vocabulary, duplicate rid
        except InvalidRequestError as exc:
            raise RequestError(str(exc)) from exc
        return request, grammar_error

    def finish_reason(out: GenerateOutput, request: GenerateRequest, token_ids: list[int]) -> Any:
        if not out.finished:
            return None
        if out.finish_reason == "length":
            return {"type": "length", "length": out.num_output_tokens}
        if out.finish_reason == "abort":
            if out.error:  # the engine failed the request: SGLang's internal-error abort
                return {"type": "abort", "message": out.error, "status_code": 500,
                        "err_type": "InternalServerError"}
            return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
        # SGLang names what matched: the stop token (EOS included), else the stop string.
        last = token_ids[-1] if token_ids else None
        if last is not None and (last in request.sampling.stop_token_ids or last in engine.eos_token_ids):
            return {"type": "stop", "matched": last}
        text = engine.tokenizer.decode(token_ids)
        return {"type": "stop", "matched": next((s for s in request.sampling.stop if s in text), last)}

    logprob_log: dict[str, tuple[list[Any], list[Any] | None]] = {}  # rid -> (output's, prompt's)

    def triples(entries: list[Any]) -> tuple[list[Any], list[Any]]:
        return ([[e.logprob, e.token_id, None] for e in entries],
                [[[lp, t, None] for t, lp in e.top] for e in entries])

    def logprob_meta(out: GenerateOutput, request: GenerateRequest) -> dict[str, Any]:
        if request.sampling.logprobs is None:
            return {}
        seen, prompt = logprob_log.setdefault(request.request_id, ([], None))
        seen += out.logprobs or []
        if out.prompt_logprobs is not None:
            prompt = [e for e in out.prompt_logprobs[1:] if e is not None]
            logprob_log[request.request_id] = (seen, prompt)
        values, tops = triples(list(out.logprobs or []) if incremental_streaming else seen)
        meta: dict[str, Any] = {"output_token_logprobs": values, "output_top_logprobs": tops}
        if prompt is not None:
            values, tops = triples(prompt)
            meta["input_token_logprobs"] = [[None, request.prompt_token_ids[0], None], *values]
            meta["input_top_logprobs"] = [None, *tops]
        if out.finished:
            logprob_log.pop(request.request_id, None)
        return meta

    def meta_info(out: GenerateOutput, request: GenerateRequest, token_ids: list[int],
                  started: float) -> dict[str, Any]:
        return {
            **logprob_meta(out, request),
            "id": request.request_id,
            "finish_reason": finish_reason(out, request, token_ids),
            "prompt_tokens": out.num_prompt_tokens,
            "weight_version": "default",
            "num_retractions": 0,
            "reasoning_tokens": 0,
            "completion_tokens": out.num_output_tokens,
            "cached_tokens": out.num_cached_tokens,
            "e2e_latency": time.monotonic() - started,
        }

    async def run(request: GenerateRequest) -> AsyncGenerator[tuple[GenerateOutput, list[int], str]]:
        """The builtin engine's outputs, with all token ids and text so far."""
        token_ids: list[int] = []
        text = ""
        stats["prompt_tokens"] += len(request.prompt_token_ids)
        async with aclosing(engine.generate(request)) as outputs:  # closing it aborts the request
            async for out in outputs:
                token_ids += out.token_ids
                text += out.text
                if out.finished:
                    stats["cached_tokens"] += out.num_cached_tokens
                yield out, token_ids, text

    def sse(payload: Any) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    async def rejected(error: RequestError) -> AsyncIterator[bytes]:
        # A tokenizer-manager rejection once streaming: the 200 already went out.
        yield sse({"error": {"message": str(error), "type": "invalid_request_error", "code": 400,
                             "retryable": False}})
        yield b"data: [DONE]\n\n"

    async def grammar_aborted(request: GenerateRequest, message: str) -> AsyncIterator[bytes]:
        # The scheduler's grammar failure: the request ends with an abort carrying a 400.
        yield sse({"text": "", "output_ids": [], "meta_info": {
            "id": request.request_id, "prompt_tokens": len(request.prompt_token_ids),
            "completion_tokens": 0, "cached_tokens": 0,
            "finish_reason": {"type": "abort", "message": message, "status_code": 400,
                              "err_type": "BadRequestError"}}})
        yield b"data: [DONE]\n\n"

    async def stream(request: GenerateRequest) -> AsyncIterator[bytes]:
        started = time.monotonic()
        sent_ids: list[int] = []
        sent_text = ""
        async with aclosing(run(request)) as outputs:  # leaving it early aborts the request
            async for out, token_ids, text in outputs:
                die_after = app.state.die_after_tokens
                if die_after is not None and len(token_ids) > die_after:
                    raise _ServerDied(f"the stand-in died after {die_after} tokens")
                fail_after = app.state.fail_after_tokens
                if fail_after is not None and len(token_ids) > fail_after:
                    # SGLang's scheduler failing a request: it ends with an abort carrying a 500.
                    yield sse({
                        "text": "" if incremental_streaming else sent_text,
                        "output_ids": [] if incremental_streaming else sent_ids,
                        "meta_info": {
                            "id": request.request_id, "prompt_tokens": out.num_prompt_tokens,
                            "completion_tokens": len(sent_ids), "cached_tokens": out.num_cached_tokens,
                            "finish_reason": {"type": "abort", "message": "Internal server error",
                                              "status_code": 500, "err_type": "InternalServerError"}}})
                    break
                if incremental_streaming:
                    chunk: dict[str, Any] = {"text": out.text, "output_ids": out.token_ids}
                else:
                    chunk = {"text": text, "output_ids": list(token_ids)}
                chunk["meta_info"] = meta_info(out, request, token_ids, started)
                sent_ids, sent_text = list(token_ids), text
                yield sse(chunk)
        yield b"data: [DONE]\n\n"

    @app.post("/generate")
    async def generate(raw: Request) -> Response:
        body = await record(raw)
        try:
            check_contract(body)
        except ContractError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        is_stream = bool(body.get("stream"))
        try:
            request, grammar_error = engine_request(body)
        except RequestError as exc:
            if is_stream:
                return StreamingResponse(rejected(exc), media_type="text/event-stream")
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)
        if grammar_error is None:
            try:
                await engine.check(request)  # compiles the JSON schema, as SGLang's grammar queue does
            except InvalidRequestError as exc:
                grammar_error = f"Failed to compile json grammar: {exc}"
        if grammar_error is not None:
            if is_stream:
                return StreamingResponse(grammar_aborted(request, grammar_error),
                                         media_type="text/event-stream")
            return JSONResponse({"error": {"message": grammar_error}}, status_code=400)
        if is_stream:
            return StreamingResponse(stream(request), media_type="text/event-stream")
        started = time.monotonic()
        final = None
        async with aclosing(run(request)) as outputs:
            async for out, token_ids, text in outputs:
                final = (out, list(token_ids), text)
        assert final is not None
        out, token_ids, text = final
        if out.finish_reason == "abort" and out.error:
            return JSONResponse({"object": "error", "message": out.error, "type": "500", "param": None,
                                 "code": 500}, status_code=500)
        return JSONResponse({"text": text, "output_ids": token_ids,
                             "meta_info": meta_info(out, request, token_ids, started)})

    @app.post("/abort_request")
    async def abort_request(raw: Request) -> Response:
        body = await record(raw) or {}
        rid = body.get("rid") or ""
        if rid:  # SGLang ignores an empty rid unless abort_all is set
            await engine.abort(rid)
        return Response(status_code=200)

    @app.get("/v1/loads")
    async def loads(raw: Request, include: str | None = None) -> Response:
        await record(raw)
        sections = {s.strip() for s in include.split(",")} if include else None
        if sections is not None and not sections <= _LOAD_SECTIONS:
            message = (f"Invalid include sections: {sections - _LOAD_SECTIONS}. "
                       f"Valid options: {sorted(_LOAD_SECTIONS)}")
            return JSONResponse({"object": "error", "message": message, "type": "400", "param": None,
                                 "code": 400}, status_code=400)
        load = engine.load()
        # SGLang's num_used_tokens leaves out what its radix cache could evict.
        used = max(load.kv_tokens_used - engine.cache.evictable_size, 0)
        hit_rate = stats["cached_tokens"] / stats["prompt_tokens"] if stats["prompt_tokens"] else 0.0
        rank = {
            "timestamp": time.time(), "dp_rank": 0,
            "num_running_reqs": load.num_running, "num_waiting_reqs": load.num_waiting,
            "num_waiting_uncached_tokens": 0, "num_used_tokens": used,
            "num_total_tokens": used, "num_active_tokens": used, "num_prealloc_ready_tokens": 0,
            "max_total_num_tokens": load.kv_tokens_total, "max_running_requests": engine.config.max_running,
            "token_usage": round(used / load.kv_tokens_total, 4) if load.kv_tokens_total else 0.0,
            "gen_throughput": 0.0, "cache_hit_rate": round(hit_rate, 4), "utilization": 0.0,
            "total_prefill_uncached_tokens": 0, "total_prefill_busy_us": 0, "decode_moments": None,
        }
        return JSONResponse({
            "timestamp": datetime.now(UTC).isoformat(), "version": SGLANG_VERSION,
            "accelerator": None, "num_accelerators": 1,
            "loads": [rank, *app.state.extra_dp_ranks],
        })

    @app.get("/health")
    @app.get("/health_generate")
    async def health(raw: Request) -> Response:
        await record(raw)
        return Response(status_code=200 if app.state.healthy else 503)

    @app.get("/server_info")
    async def server_info(raw: Request) -> dict[str, Any]:
        await record(raw)
        load = engine.load()
        return {
            **args,
            "max_total_num_tokens": load.kv_tokens_total,
            "max_req_input_len": engine.max_context_len - 5,
            "status": "ready",
            "internal_states": [{"last_gen_throughput": 0.0}],
            "version": SGLANG_VERSION,
            "frontend": "python",
        }

    @app.get("/model_info")
    async def model_info(raw: Request) -> dict[str, Any]:
        await record(raw)
        return {
            "model_path": args["model_path"], "served_model_name": args["served_model_name"],
            "tokenizer_path": args["tokenizer_path"], "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default", "load_format": "auto",
            "reasoning_parser": None, "tool_call_parser": None, "disaggregation_mode": "null",
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        }

    @app.get("/v1/models")
    async def models(raw: Request) -> dict[str, Any]:
        await record(raw)
        name = args["served_model_name"]
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": int(time.time()), "owned_by": "sglang",
            "root": name, "parent": None, "max_model_len": args["context_length"] or engine.max_context_len,
        }]}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(raw: Request) -> Response:
        await record(raw)
        load = engine.load()
        if load.num_running or load.num_waiting:  # SGLang flushes only an idle server
            return Response("Flush cache failed.\n", status_code=400)
        # Idle: the runner thread waits for commands and does not touch the cache meanwhile.
        engine.cache.reset()
        return Response("Cache flushed.\nPlease check backend logs for more details. "
                        "(When there are running or waiting requests, the operation will not be "
                        "performed.)\n", status_code=200)

    return app

