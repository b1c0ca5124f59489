"""SGLang's runtime (radix prefix cache, CUDA kernels) as an engine, over its native HTTP API.

The service builds every prompt as token ids with the model's ``ModelTokenizer`` and sends
them as ``input_ids``, so what SGLang caches in its radix tree lines up token for token with
what the service's prefix index believes it sent. Launch the server with
``--enable-priority-scheduling`` so that ``priority`` (higher is sooner) is honoured.

Wire format (SGLang 0.5.x, ``sglang/srt/entrypoints/http_server.py``):

- ``POST /generate`` with ``rid``, ``input_ids``, ``priority``, ``stream: true`` and
  ``sampling_params``. Unknown ``sampling_params`` keys are a 400, so only keys SGLang knows
  are sent. The stream is SSE: ``data: {"text", "output_ids", "meta_info"}`` lines, then
  ``data: [DONE]``. ``text``/``output_ids`` hold everything so far unless the server runs
  ``--incremental-streaming-output``; the mode is read from ``/server_info`` and each chunk
  is checked against ``meta_info.completion_tokens`` as well, so either works.
- Request errors arrive three ways: an HTTP 400 before the stream (a body that breaks the
  schema), a ``data: {"error": {...}}`` chunk (checks SGLang makes while tokenizing, e.g.
  the context length), or a final chunk whose ``finish_reason`` is an ``abort`` carrying a
  ``status_code`` (checks its scheduler makes, e.g. a JSON schema that does not compile).
  A 4xx before any output becomes ``InvalidRequestError``; later, or a 5xx, it ends the
  stream with ``GenerateOutput.error`` set, as the builtin engine reports a failed request.
- ``POST /abort_request {"rid"}`` stops a request; its stream then ends with an ``abort``.
- ``GET /v1/loads?include=core`` reports load per data-parallel rank; they are summed.

What SGLang cannot do, and what happens instead:

- ``set_priority``: SGLang has no way to re-rank a request it already holds; ignored.
- ``pin_prefix``: SGLang has no pin API, so pins are ignored: a pending call's prefix stays
  in the radix cache only as long as SGLang's LRU keeps it. (The call a pin is taken for
  sends that prefix anyway, so prefilling it here would add a round trip and save nothing.)
  ``prefill`` is what the service uses instead: a task group's shared prefix is computed
  once (``max_new_tokens: 0``) before the group's requests fan out.
- ``resumed_output_len``: SGLang cannot start a JSON-schema constraint partway through an
  output, so a constrained output resumed here is refused; without a schema the resumed
  tokens are just prompt tokens.
- ``seed`` is sent as ``sampling_seed``, which SGLang honours only when launched with
  ``--enable-deterministic-inference``.
- ``Load.cached_tokens`` is 0: ``/v1/loads`` reports the tokens live requests hold
  (``num_used_tokens``), not the size of the radix cache.
- Penalties, ``logit_bias`` and ``min_tokens`` go as SGLang's ``sampling_params`` of the same
  names (``min_new_tokens``); logprobs as ``return_logprob``, ``top_logprobs_num`` and
  ``logprob_start_len`` (0 with prompt logprobs), read back from ``meta_info``'s
  ``output_token_logprobs`` / ``output_top_logprobs`` (``input_...`` for the prompt). The
  values are as SGLang computes them, which need not be from the same point of the sampling
  pipeline as the builtin engine's (see ``SamplingParams.logprobs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Any

import httpx

from parrot.service.engine.base import (
    Engine,
    EngineUnavailableError,
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    Load,
    Objective,
    SamplingParams,
    TokenLogprob,
)
from parrot.service.engine.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)

# Control calls (health, info, loads, aborts) answer in well under this; SGLang's /health may
# run a one-token generation and waits up to 20 s for it.
_CONTROL_READ_TIMEOUT_S = 30.0
# Tokenizers without a configured limit report a huge sentinel (1e30) as model_max_length.
_SANE_CONTEXT_LIMIT = 10_000_000

_FINISH_TYPES: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def sampling_params_for_sglang(sp: SamplingParams) -> dict[str, Any]:
    """SGLang's ``sampling_params`` for ``sp``: only keys SGLang accepts (it rejects others)."""
    if sp.json_schema is not None and sp.resumed_output_len > 0:
        raise InvalidRequestError(
            "a JSON-schema constrained output cannot resume on SGLang: it cannot start the "
            "constraint partway through an output"
        )
    params: dict[str, Any] = {
        "max_new_tokens": sp.max_new_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        # SGLang takes -1 for "every token" and rejects 0, which means the same here.
        "top_k": -1 if sp.top_k <= 0 else sp.top_k,
        "ignore_eos": sp.ignore_eos,
    }
    if sp.stop:
        params["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        params["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.seed is not None:
        params["sampling_seed"] = sp.seed
    if sp.json_schema is not None:
        params["json_schema"] = json.dumps(sp.json_schema)  # SGLang takes the schema as a string
    # Penalties and bias under SGLang's names, sent only when set (its defaults otherwise).
    if sp.presence_penalty:
        params["presence_penalty"] = sp.presence_penalty
    if sp.frequency_penalty:
        params["frequency_penalty"] = sp.frequency_penalty
    if sp.repetition_penalty != 1.0:
        params["repetition_penalty"] = sp.repetition_penalty
    if sp.logit_bias:
        params["logit_bias"] = {str(t): b for t, b in sp.logit_bias.items()}
    if sp.min_tokens > sp.resumed_output_len:  # SGLang counts only what it generates
        params["min_new_tokens"] = sp.min_tokens - sp.resumed_output_len
    return params


def logprob_fields_for_sglang(sp: SamplingParams) -> dict[str, Any]:
    """The top-level ``/generate`` keys that ask for logprobs (none when none are wanted):
    ``logprob_start_len`` -1 is the output's only, 0 the prompt's too."""
    if sp.logprobs is None and sp.prompt_logprobs is None:
        return {}
    return {"return_logprob": True,
            "top_logprobs_num": max(sp.logprobs or 0, sp.prompt_logprobs or 0),
            "logprob_start_len": 0 if sp.prompt_logprobs is not None else -1}


def _logprob_entries(values: Any, tops: Any, num_top: int) -> list[TokenLogprob | None]:
    """SGLang's ``[logprob, token_id, text]`` triples (and per position a list of such triples
    for the alternatives) as ``TokenLogprob``s; a null logprob (the first prompt token) is None."""
    out: list[TokenLogprob | None] = []
    tops = tops if isinstance(tops, list) else []
    for i, triple in enumerate(values if isinstance(values, list) else []):
        if not isinstance(triple, list | tuple) or len(triple) < 2 or triple[0] is None:
            out.append(None)
            continue
        alternatives = tops[i] if i < len(tops) and isinstance(tops[i], list) else []
        top = [(int(t[1]), float(t[0])) for t in alternatives[:num_top]
               if isinstance(t, list | tuple) and len(t) >= 2 and t[0] is not None]
        out.append(TokenLogprob(int(triple[1]), float(triple[0]), top))
    return out


def _error_message(body: Any, fallback: str) -> str:
    """The message in any of SGLang's error bodies: ``{"error": "..."}`` (schema violations),
    ``{"error": {"message": ...}}`` (request errors) or ``{"message": ...}`` (HTTP errors)."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, str) and error:
            return error
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return fallback


class _Deltas:
    """Turns SGLang's stream chunks into increments, whether they repeat everything so far
    (the default) or carry only what is new (``--incremental-streaming-output``).

    The server's declared mode decides by default. ``completion_tokens`` (always the total so
    far) tells the two apart whenever they differ, so a wrong or unknown declaration cannot
    drop or repeat tokens."""

    def __init__(self, incremental: bool) -> None:
        self.incremental = incremental
        self.token_ids: list[int] = []
        self.text = ""
        self.sent_prompt_logprobs = False

    def take(self, chunk: dict[str, Any], num_output_tokens: int | None) -> tuple[list[int], str]:
        ids = [int(t) for t in chunk.get("output_ids") or []]
        text = chunk.get("text") or ""
        seen = self.token_ids
        cumulative_fits = ids[: len(seen)] == seen and (
            len(ids) >= len(seen) if num_output_tokens is None else len(ids) == num_output_tokens
        )
        incremental_fits = num_output_tokens is None or len(seen) + len(ids) == num_output_tokens
        if cumulative_fits != incremental_fits and seen:
            self.incremental = incremental_fits  # the chunks show the mode: keep it from now on
        if self.incremental:
            self.token_ids += ids
            self.text += text
            return ids, text
        new_ids = ids[len(seen):]
        self.token_ids = ids
        if text.startswith(self.text):
            new_text, self.text = text[len(self.text):], text
        else:
            # The final text had a stop string trimmed off that was already streamed: what was
            # sent cannot be taken back, and there is nothing new.
            new_text = ""
        return new_ids, new_text


class SGLangEngine(Engine):
    """An SGLang server reached at ``url``; prompts are token ids from ``tokenizer``.

    ``model_name`` defaults to the server's served model name (the last part of its model path
    when it was not given one); ``max_context_len`` to the server's context length.
    ``load()`` returns the last poll of ``/v1/loads``, taken every ``load_interval_s``.
    """

    kind = "sglang"
    supports_prefix_control = True

    def __init__(self, url: str, *, tokenizer: ModelTokenizer, model_name: str | None = None,
                 max_context_len: int | None = None, connect_timeout_s: float = 5.0,
                 load_interval_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.model_name = model_name or ""
        self.max_context_len = max_context_len or 0
        self._given_model_name = model_name
        self._given_max_context_len = max_context_len
        self._connect_timeout_s = connect_timeout_s
        self._load_interval_s = load_interval_s
        # Streams may stay silent for long (queued behind other work), so no read timeout there.
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(connect_timeout_s, read=None)
        )
        self._control_timeout = httpx.Timeout(connect_timeout_s, read=_CONTROL_READ_TIMEOUT_S)
        self._load = Load(0, 0, 0, 0, 0)
        self._poller: asyncio.Task[None] | None = None
        self._latency_requests: set[str] = set()
        self._closed = False
        # Server settings read by start().
        self.server_info: dict[str, Any] = {}
        self.incremental_streaming = False
        self.priority_scheduling = False
        self._low_priority_values_first = False
        self._priority_refused = False

    # ---- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Check the server is up, read its model, limits and streaming mode, start polling load."""
        if self._poller is not None:
            return
        try:
            health = await self._client.get("/health", timeout=self._control_timeout)
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"SGLang server at {self.url} is unreachable: {exc}") from exc
        if health.status_code != 200:
            raise EngineUnavailableError(
                f"SGLang server at {self.url} is not ready: GET /health answered {health.status_code}"
                + (" (it is still starting, or unhealthy)" if health.status_code == 503 else "")
            )
        server_info = await self._get_json("/server_info")
        model_info = await self._get_json("/model_info")
        self.server_info = server_info
        self.model_name = self._given_model_name or self._served_model_name(model_info, server_info)
        self.max_context_len = self._given_max_context_len or await self._context_length(server_info)
        self.incremental_streaming = bool(server_info.get("incremental_streaming_output", False))
        self.priority_scheduling = bool(server_info.get("enable_priority_scheduling", False))
        self._low_priority_values_first = bool(server_info.get("schedule_low_priority_values_first", False))
        # Such a server aborts every request that names a priority; leave it out there.
        self._priority_refused = not self.priority_scheduling and bool(
            server_info.get("abort_on_priority_when_disabled", False)
        )
        if not self.priority_scheduling:
            logger.warning("SGLang server at %s runs without --enable-priority-scheduling: "
                           "request priorities are ignored", self.url)
        await self._poll_load()
        self._poller = asyncio.create_task(self._poll_loads_forever(), name=f"sglang-load-{self.url}")

    async def shutdown(self) -> None:
        """Stop polling and close the connection; open streams fail with ``EngineUnavailableError``."""
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self._client.aclose()

    def _served_model_name(self, model_info: dict[str, Any], server_info: dict[str, Any]) -> str:
        model_path = model_info.get("model_path") or server_info.get("model_path")
        served = model_info.get("served_model_name") or server_info.get("served_model_name")
        # SGLang fills served_model_name with model_path when none was given; a path is not a
        # name, so then the path's last part names the model.
        if served and served != model_path:
            return str(served)
        if model_path:
            return PurePosixPath(str(model_path).rstrip("/")).name or str(model_path)
        return self.tokenizer.model_name

    async def _context_length(self, server_info: dict[str, Any]) -> int:
        """``--context-length`` when given; else the model's own limit, which SGLang reports
        only on ``/v1/models`` (``max_model_len``); else the tokenizer's, if it has a real one."""
        if isinstance(server_info.get("context_length"), int) and server_info["context_length"] > 0:
            return int(server_info["context_length"])
        models = await self._get_json("/v1/models")
        for card in models.get("data") or []:
            if isinstance(card, dict) and isinstance(card.get("max_model_len"), int):
                return int(card["max_model_len"])
        limit = getattr(self.tokenizer.hf, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < _SANE_CONTEXT_LIMIT:
            return limit
        raise EngineUnavailableError(
            f"SGLang server at {self.url} does not report its context length; "
            "give max_context_len for it"
        )

    # ---- load --------------------------------------------------------------------
    def load(self) -> Load:
        """The last polled load; ``num_latency`` counts this service's latency requests here."""
        last = self._load
        return Load(last.num_running, last.num_waiting, last.kv_tokens_used, last.kv_tokens_total,
                    last.cached_tokens, num_latency=len(self._latency_requests))

    async def _poll_loads_forever(self) -> None:
        while True:
            await asyncio.sleep(self._load_interval_s)
            await self._poll_load()

    async def _poll_load(self) -> None:
        try:
            resp = await self._client.get("/v1/loads", params={"include": "core"},
                                          timeout=self._control_timeout)
            ranks = resp.json()["loads"] if resp.status_code == 200 else None
            if not isinstance(ranks, list):
                return  # keep the last load; health checks decide whether the server is gone
            self._load = Load(
                num_running=sum(int(r.get("num_running_reqs", 0)) for r in ranks),
                num_waiting=sum(int(r.get("num_waiting_reqs", 0)) for r in ranks),
                kv_tokens_used=sum(int(r.get("num_used_tokens", 0)) for r in ranks),
                kv_tokens_total=sum(int(r.get("max_total_num_tokens", 0)) for r in ranks),
                cached_tokens=0,  # not reported by SGLang (see the module docstring)
            )
        except (httpx.TransportError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # RuntimeError: the client was closed. ValueError: not JSON.
            logger.debug("load poll of %s failed: %s", self.url, exc)

    # ---- requests ----------------------------------------------------------------
    def _generate_body(self, request: GenerateRequest, *, stream: bool) -> dict[str, Any]:
        n = len(request.prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        sp = request.sampling
        if self.max_context_len and n + sp.max_new_tokens > self.max_context_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) plus max_new_tokens ({sp.max_new_tokens}) "
                f"exceeds the context length of {self.max_context_len} tokens"
            )
        body: dict[str, Any] = {
            "rid": request.request_id,
            "input_ids": list(request.prompt_token_ids),
            "sampling_params": sampling_params_for_sglang(sp),
            "stream": stream,
            **logprob_fields_for_sglang(sp),
        }
        if not self._priority_refused:
            body["priority"] = -request.priority if self._low_priority_values_first else request.priority
        return body

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream ``request``'s increments; see the module docstring for how errors surface."""
        body = self._generate_body(request, stream=True)
        rid = request.request_id
        deltas = _Deltas(self.incremental_streaming)
        emitted = False  # whether any output went to the caller
        settled = False  # whether the server is done with the request
        if request.objective == "latency":
            self._latency_requests.add(rid)
        try:
            async with self._client.stream("POST", "/generate", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    settled = True
                    raise self._http_error(resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    if settled:
                        continue  # nothing may follow a finish but [DONE]
                    chunk = json.loads(data)
                    try:
                        out = self._output(request, chunk, deltas, emitted)
                    except InvalidRequestError:
                        settled = True  # a rejection: the server holds nothing of it
                        raise
                    settled = out.finished
                    emitted = True
                    yield out
        except (httpx.TransportError, RuntimeError, json.JSONDecodeError) as exc:
            # RuntimeError: the client was closed (shutdown). A connection that breaks after the
            # finish lost nothing.
            if not settled:
                raise EngineUnavailableError(
                    f"SGLang server at {self.url} failed during request {rid}: {exc!r}"
                ) from exc
        finally:
            self._latency_requests.discard(rid)
            if not settled:  # the caller went away, or the stream broke: free the server's work
                await self._quiet_post("/abort_request", {"rid": rid})
        if not settled:
            raise EngineUnavailableError(
                f"SGLang server at {self.url} ended the stream of request {rid} without finishing it"
            )

    def _output(self, request: GenerateRequest, chunk: dict[str, Any], deltas: _Deltas,
                emitted: bool) -> GenerateOutput:
        """The ``GenerateOutput`` of one stream chunk; raises ``InvalidRequestError`` for a
        rejection that comes before any output."""
        rid = request.request_id
        if "error" in chunk:
            error = chunk["error"]
            code = error.get("code") if isinstance(error, dict) else None
            message = _error_message(chunk, "SGLang failed the request")
            if not emitted and isinstance(code, int) and 400 <= code < 500:
                raise InvalidRequestError(message)
            return GenerateOutput(rid, [], "", len(request.prompt_token_ids), 0,
                                  len(deltas.token_ids), finished=True, finish_reason="abort",
                                  error=message)
        meta = chunk.get("meta_info") or {}
        completion = meta.get("completion_tokens")
        num_output = int(completion) if isinstance(completion, int) else None
        token_ids, text = deltas.take(chunk, num_output)
        finish = meta.get("finish_reason")
        finish_reason: FinishReason | None = None
        error_message: str | None = None
        if isinstance(finish, dict):
            finish_reason = _FINISH_TYPES.get(str(finish.get("type")), "stop")
            status = finish.get("status_code")
            if finish_reason == "abort" and isinstance(status, int) and status >= 400:
                error_message = str(finish.get("message") or "SGLang aborted the request")
                if status < 500 and not emitted and not token_ids:
                    raise InvalidRequestError(error_message)
        elif isinstance(finish, str):  # older servers sent the bare type
            finish_reason = _FINISH_TYPES.get(finish, "stop")
        logprobs = prompt_logprobs = None
        sp = request.sampling
        if sp.logprobs is not None:
            entries = _logprob_entries(meta.get("output_token_logprobs"), meta.get("output_top_logprobs"),
                                       sp.logprobs)
            # Cumulative or incremental like the rest of the chunk: the newest are this chunk's.
            new = entries[len(entries) - len(token_ids):] if token_ids else []
            logprobs = [e for e in new if e is not None]
        if sp.prompt_logprobs is not None and not deltas.sent_prompt_logprobs:
            entries = _logprob_entries(meta.get("input_token_logprobs"), meta.get("input_top_logprobs"),
                                       sp.prompt_logprobs)
            if entries:
                prompt_logprobs, deltas.sent_prompt_logprobs = [None, *entries[1:]], True
        return GenerateOutput(
            request_id=rid,
            token_ids=token_ids,
            text=text,
            num_prompt_tokens=int(meta.get("prompt_tokens") or len(request.prompt_token_ids)),
            num_cached_tokens=int(meta.get("cached_tokens") or 0),
            num_output_tokens=num_output if num_output is not None else len(deltas.token_ids),
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            error=error_message,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    async def abort(self, request_id: str) -> None:
        """Ask the server to stop ``request_id``; its stream ends with ``finish_reason == "abort"``."""
        await self._quiet_post("/abort_request", {"rid": request_id})

    async def set_priority(self, request_id: str, priority: int, objective: Objective) -> None:
        """SGLang fixes a request's priority when it arrives and cannot re-rank it; ignored."""
        return None

    async def health(self) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        if self._closed:
            return False
        try:
            resp = await self._client.get("/health", timeout=self._control_timeout)
        except (httpx.TransportError, RuntimeError):
            return False
        return resp.status_code == 200

    # ---- prefix control ----------------------------------------------------------
    async def prefill(self, token_ids: list[int], priority: int = 0) -> None:
        """Compute and cache ``token_ids``' KV: a generation of ``max_new_tokens: 0``.
        Raises ``InvalidRequestError`` when the server refuses it, ``EngineUnavailableError``
        when it cannot be reached."""
        if not token_ids:
            return
        body: dict[str, Any] = {
            "input_ids": list(token_ids),
            "sampling_params": {"max_new_tokens": 0},
            "stream": False,
        }
        if priority and not self._priority_refused:  # as for a generation (see ``generate``)
            body["priority"] = -priority if self._low_priority_values_first else priority
        try:
            resp = await self._client.post("/generate", json=body)
        except (httpx.TransportError, RuntimeError) as exc:
            raise EngineUnavailableError(f"SGLang server at {self.url} is unreachable: {exc!r}") from exc
        if resp.status_code != 200:
            raise self._http_error(resp)

    async def flush_cache(self) -> bool:
        """Empty the server's radix cache; False when it refuses (it has requests in flight)."""
        try:
            resp = await self._client.post("/flush_cache", timeout=self._control_timeout)
        except (httpx.TransportError, RuntimeError) as exc:
            raise EngineUnavailableError(f"SGLang server at {self.url} is unreachable: {exc!r}") from exc
        return resp.status_code == 200

    # ---- HTTP --------------------------------------------------------------------
    async def _get_json(self, path: str) -> dict[str, Any]:
        try:
            resp = await self._client.get(path, timeout=self._control_timeout)
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"SGLang server at {self.url} is unreachable: {exc!r}") from exc
        if resp.status_code != 200:
            raise EngineUnavailableError(
                f"SGLang server at {self.url} answered GET {path} with HTTP {resp.status_code}: "
                + _error_message(_json_or_none(resp), resp.text[:200])
            )
        body = _json_or_none(resp)
        if not isinstance(body, dict):
            raise EngineUnavailableError(f"SGLang server at {self.url} sent no JSON object for GET {path}")
        return body

    async def _quiet_post(self, path: str, body: dict[str, Any]) -> None:
        # Aborts: a server that is gone has nothing left to abort.
        if self._closed:
            return
        try:
            await self._client.post(path, json=body, timeout=self._control_timeout)
        except (httpx.TransportError, RuntimeError) as exc:
            logger.debug("POST %s to %s failed: %s", path, self.url, exc)

    def _http_error(self, resp: httpx.Response) -> Exception:
        message = _error_message(_json_or_none(resp), resp.text or f"HTTP {resp.status_code}")
        if 400 <= resp.status_code < 500:
            return InvalidRequestError(message)
        return EngineUnavailableError(
            f"SGLang server at {self.url} failed with HTTP {resp.status_code}: {message}"
        )


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None
