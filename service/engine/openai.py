"""An engine behind any OpenAI-compatible HTTP server: vLLM, SGLang's OpenAI routes, another
Parrot service, or a hosted API.

What Parrot keeps on such a server: everything above the engine. Apps are still submitted
as graphs, calls still run as soon as their inputs are set, fetch objectives still flow
backwards through the DAG, and the scheduler still places calls across engines by
objective, load and (estimated) prefix affinity, re-running work elsewhere when a server
goes away. What it loses is every engine-side control:

- no prefix control: ``pin_prefix``/``unpin_prefix``/``prefill`` are no-ops, so shared
  prefixes are kept only if the server's own cache (e.g. vLLM's automatic prefix caching)
  happens to keep them;
- no priority inside the server: ``set_priority`` is ignored, and requests are served in
  arrival order, both here (at most ``max_concurrency`` at once, the rest wait) and in the
  server, so a latency request waits behind throughput work sent before it;
- no token ids back: outputs carry text only (``token_ids == []``). The service tokenizes
  the text again with the model's tokenizer where it needs ids (a consumer's prompt, a
  generation resumed on another engine), so the ids may differ from the ones sampled.
  For the same reason a request for logprobs is refused; penalties, ``logit_bias`` (by
  token id: the server must serve the same tokenizer) and ``min_tokens`` are passed on,
  and after a resume the server's penalties see only the tokens it generated itself.

Prompts go as token ids where the server takes them (vLLM, SGLang and Parrot do), else as
text, or as chat messages for servers that serve chat only. A text prompt is the prompt's
ids decoded with their special tokens kept, minus the model's leading BOS: servers
tokenize a text prompt as a new document and add that themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from parrot.service.engine.base import (
    Engine,
    EngineError,
    EngineUnavailableError,
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    Load,
    SamplingParams,
)
from parrot.service.engine.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)

PromptFormat = Literal["auto", "tokens", "text", "chat"]

# Statuses that say "not now" rather than "not this request": worth another try.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A Retry-After longer than this is cut short: the caller's own deadline matters more.
MAX_RETRY_AFTER_S = 60.0
# transformers' placeholder model_max_length when a tokenizer does not know its limit is 1e30.
_SANE_CONTEXT_LIMIT = 10_000_000
_MAX_ERROR_CHARS = 500

# How servers word a 400 (or 422) for a token-id prompt they do not take, once lower-cased:
#   OpenAI:            "Invalid type for 'prompt': expected a string, but got an array instead."
#                      "'$.prompt' is invalid. Please check the API reference ..."
#   pydantic servers   "... 'loc': ('body', 'prompt', 'str'), 'msg': 'Input should be a valid
#   (vLLM, SGLang,      string' ..." / Parrot: "prompt: prompt must be a string, ..."
#   Parrot, LiteLLM):  "Unmapped prompt format. Your prompt is neither a list of strings nor ..."
#   Rust (TGI, axum):  "Failed to deserialize the JSON body into the target type: prompt:
#                      invalid type: sequence, expected a string"
#   Go (Ollama):       "json: cannot unmarshal array into Go struct field .prompt of type string"
# A message about the prompt that talks about types; a context-length complaint ("... in your
# prompt; ...") or an out-of-vocabulary token id (a tokenizer mismatch) does not qualify.
_PROMPT_TYPE_WORDS = re.compile(
    r"invalid type|\btype\b|string|\bstr\b|unmarshal|deseriali[sz]e|\barray\b|sequence|integer"
    r"|\bint\b|is invalid|prompt format|not supported"
)


@dataclass(frozen=True)
class UpstreamError:
    """An error answer of the server: its message, and the OpenAI ``param``/``code`` if given."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def from_response(cls, resp: httpx.Response) -> UpstreamError:
        message, param, code = "", None, None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            err = body.get("error", body.get("detail", body.get("message")))
            if isinstance(err, dict):
                message = str(err.get("message") or err.get("msg") or err)
                param = err.get("param") if isinstance(err.get("param"), str) else None
                code = str(err["code"]) if err.get("code") is not None else None
            elif err is not None:
                message = str(err)
        if not message:
            message = resp.text.strip() or resp.reason_phrase or "no message"
        if len(message) > _MAX_ERROR_CHARS:
            message = message[:_MAX_ERROR_CHARS] + "..."
        return cls(resp.status_code, message, param, code)

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}"


def rejects_token_prompt(error: UpstreamError) -> bool:
    """Whether ``error``, the answer to a token-id prompt, says the server takes no such prompts."""
    if error.status not in (400, 422) or error.code == "context_length_exceeded":
        return False
    text = error.message.lower()
    if "context length" in text or "maximum context" in text:
        return False
    return ("prompt" in text or error.param == "prompt") and bool(_PROMPT_TYPE_WORDS.search(text))


def retry_after_s(headers: httpx.Headers, now: float | None = None) -> float | None:
    """The wait a server asks for: ``retry-after-ms`` (OpenAI's), or ``Retry-After`` in seconds
    or as an HTTP date; ``None`` when it asks for nothing (or nothing readable)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return min(max(float(ms) / 1000, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        delay = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(delay, 0.0), MAX_RETRY_AFTER_S)


def _finish_reason(reason: str | None) -> FinishReason:
    # "tool_calls", "function_call" and "content_filter" end the output as a stop does.
    if reason == "length":
        return "length"
    if reason == "abort":
        return "abort"
    return "stop"


@dataclass
class _Flight:
    """One request in flight: the reader talking to the server and the outputs it queued."""

    request: GenerateRequest
    outputs: asyncio.Queue[GenerateOutput | None] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None
    aborted: bool = False
    streamed: bool = False  # an output chunk arrived: the request may not be sent again
    text: str = ""
    chunks: int = 0

    def emit(self, out: GenerateOutput) -> None:
        self.outputs.put_nowait(out)

    def output(self, text: str = "", **kw: Any) -> GenerateOutput:
        defaults: dict[str, Any] = dict(
            num_prompt_tokens=len(self.request.prompt_token_ids), num_cached_tokens=0,
            num_output_tokens=self.chunks,
        )
        return GenerateOutput(self.request.request_id, [], text, **{**defaults, **kw})


class OpenAIEngine(Engine):
    """An engine reached over the OpenAI API (``/models``, ``/completions``, ``/chat/completions``).

    ``base_url`` is the API root, ending in ``/v1``. ``tokenizer`` must be the served model's:
    prompts arrive as its token ids. ``model`` picks one of the served models (default: the
    first listed). ``prompt_format`` says how prompts are sent: ``tokens`` (token ids to
    ``/completions``), ``text`` (the ids' text to ``/completions``), ``chat`` (the request's
    chat messages to ``/chat/completions``; requests without messages are rejected), or
    ``auto``: token ids, switching to text for good once the server rejects a token-id prompt.

    At most ``max_concurrency`` requests are sent at once; the rest wait here, in order.
    A request that fails before its first output chunk (429, 5xx, a connection error) is
    sent again up to ``max_retries`` times, after the server's ``Retry-After`` or an
    exponential backoff with full jitter; once output has streamed, it never is.
    """

    kind = "openai"
    supports_prefix_control = False
    # Backoff between tries: uniform in [0, min(max, base * 2**(tries - 1))] seconds.
    retry_backoff_s = 0.5
    retry_backoff_max_s = 8.0

    def __init__(
        self,
        base_url: str,
        *,
        tokenizer: ModelTokenizer,
        model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 16,
        max_retries: int = 3,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        prompt_format: PromptFormat = "auto",
        max_context_len: int | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if prompt_format not in ("auto", "tokens", "text", "chat"):
            raise ValueError(f"prompt_format must be auto, tokens, text or chat, not {prompt_format!r}")
        self.url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.model_name = model or ""
        self.max_context_len = max_context_len or 0
        self.prompt_format: PromptFormat = prompt_format
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self._requested_model = model
        self._requested_context_len = max_context_len
        self._token_prompts_rejected = False
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers,
            # A request waits for a slot here, never in the connection pool.
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=None),
            limits=httpx.Limits(max_connections=max_concurrency + 4,
                                max_keepalive_connections=max_concurrency),
        )
        self._slots = asyncio.Semaphore(max_concurrency)
        self._flights: dict[str, _Flight] = {}
        self._num_waiting = 0
        self._num_running = 0
        self._num_latency = 0

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Check the server answers, pick the served model and learn its context length."""
        try:
            listing = (await self._get_models()).json()
        except ValueError as exc:
            raise EngineError(f"the server at {self.url} answered /models with something that is "
                              f"not JSON; is {self.url} an OpenAI API root (ending in /v1)?") from exc
        cards = [c for c in (listing.get("data") if isinstance(listing, dict) else None) or []
                 if isinstance(c, dict) and isinstance(c.get("id"), str)]
        if not cards:
            raise EngineError(f"the server at {self.url} lists no models at /models")
        names = [c["id"] for c in cards]
        wanted = self._requested_model
        if wanted is not None and wanted not in names:
            raise EngineError(f"the server at {self.url} does not serve model {wanted!r}; "
                              f"it lists {', '.join(map(repr, names))}")
        card = cards[names.index(wanted)] if wanted is not None else cards[0]
        self.model_name = card["id"]
        self.max_context_len = self._context_len(card)

    def _context_len(self, card: dict[str, Any]) -> int:
        if self._requested_context_len:
            return self._requested_context_len
        # vLLM and Parrot say max_model_len; some other servers context_length.
        for key in ("max_model_len", "context_length", "max_context_length"):
            value = card.get(key)
            if isinstance(value, int) and value > 0:
                return value
        value = getattr(self.tokenizer.hf, "model_max_length", None)
        if isinstance(value, int) and 0 < value < _SANE_CONTEXT_LIMIT:
            return value
        raise EngineError(f"the server at {self.url} does not report the context length of "
                          f"{self.model_name!r}, nor does its tokenizer; pass max_context_len")

    async def shutdown(self) -> None:
        """Close every stream (each ends with ``EngineUnavailableError``) and the connections."""
        readers = [f.reader for f in self._flights.values()
                   if f.reader is not None and not f.reader.done()]
        for reader in readers:
            reader.cancel()
        if readers:
            await asyncio.wait(readers)
        await self._client.aclose()

    async def health(self) -> bool:
        try:
            return (await self._client.get("/models")).status_code == 200
        except (httpx.HTTPError, RuntimeError):  # RuntimeError: the client was closed
            return False

    def load(self) -> Load:
        return Load(num_running=self._num_running, num_waiting=self._num_waiting, kv_tokens_used=0,
                    kv_tokens_total=0, cached_tokens=0, num_latency=self._num_latency)

    @property
    def active_prompt_format(self) -> Literal["tokens", "text", "chat"]:
        """How the next prompt goes out (``auto`` resolved)."""
        if self.prompt_format == "auto":
            return "text" if self._token_prompts_rejected else "tokens"
        return self.prompt_format

    # ---- requests ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream ``request``'s text as the server sends it (``token_ids`` stay empty; see the
        module docstring). The last output has ``finished`` set and the server's usage counts."""
        self._check(request)
        if request.request_id in self._flights:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running")
        flight = _Flight(request)
        if request.sampling.max_new_tokens == 0:  # OpenAI servers reject max_tokens=0
            yield flight.output(finished=True, finish_reason="length")
            return
        # The server is read by a coroutine of its own, so an abort can stop it wherever it waits
        # (for a slot, between tries, or on the network) by cancelling it.
        reader = asyncio.create_task(self._serve(flight), name=f"openai-{request.request_id}")
        reader.add_done_callback(lambda _: flight.outputs.put_nowait(None))
        flight.reader = reader
        self._flights[request.request_id] = flight
        try:
            while True:
                out = await flight.outputs.get()
                if out is None:  # the reader ended without a final output
                    if flight.aborted:
                        yield flight.output(num_output_tokens=self._count_output(flight.text),
                                            finished=True, finish_reason="abort")
                        return
                    if not reader.cancelled() and (exc := reader.exception()) is not None:
                        raise exc
                    raise EngineUnavailableError(f"the engine at {self.url} was shut down")
                yield out
                if out.finished:
                    return
        finally:
            if self._flights.get(request.request_id) is flight:
                del self._flights[request.request_id]
            if not reader.done():
                # Closing early: cancelling closes the HTTP stream, which the server sees as a
                # disconnect and aborts. Wait, so the connection is gone when the caller goes on.
                reader.cancel()
                await asyncio.wait([reader])
            elif not reader.cancelled():
                reader.exception()  # retrieved: an error nobody reads is not logged as lost

    async def abort(self, request_id: str) -> None:
        flight = self._flights.get(request_id)
        if flight is not None and flight.reader is not None and not flight.reader.done():
            flight.aborted = True
            flight.reader.cancel()

    def _check(self, request: GenerateRequest) -> None:
        sampling = request.sampling
        if sampling.json_schema is not None and sampling.resumed_output_len > 0:
            raise InvalidRequestError("an OpenAI-compatible server cannot continue JSON-constrained "
                                      "output from the middle; the request must start over")
        if self.active_prompt_format == "chat":
            if not request.messages:
                raise InvalidRequestError(
                    f"the engine at {self.url} serves chat only (prompt_format='chat'); this request "
                    "has a prompt but no chat messages")
        elif not request.prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        if sampling.logprobs is not None or sampling.prompt_logprobs is not None:
            # The server names tokens by their text only, which does not map back to token ids.
            raise InvalidRequestError(f"logprobs are not available from the OpenAI-compatible engine at "
                                      f"{self.url}: it reports tokens as text, not ids")

    async def _serve(self, flight: _Flight) -> None:
        is_latency = flight.request.objective == "latency"
        self._num_latency += is_latency
        try:
            self._num_waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._num_waiting -= 1
            self._num_running += 1
            try:
                await self._send_with_retries(flight)
            finally:
                self._num_running -= 1
                self._slots.release()
        finally:
            self._num_latency -= is_latency

    async def _send_with_retries(self, flight: _Flight) -> None:
        failures = 0
        while True:
            if self._client.is_closed:
                raise EngineUnavailableError(f"the engine at {self.url} was shut down")
            prompt_format = self.active_prompt_format
            path, body = self._request_body(flight.request, prompt_format)
            try:
                async with self._client.stream("POST", path, json=body) as resp:
                    if resp.status_code == 200:
                        await self._relay(flight, resp, prompt_format)
                        return
                    await resp.aread()
                    error: UpstreamError | str = UpstreamError.from_response(resp)
                    delay = retry_after_s(resp.headers)
            except httpx.TransportError as exc:
                if flight.streamed:
                    raise EngineUnavailableError(
                        f"the stream from {self.url} broke off: {type(exc).__name__}: {exc}") from exc
                error, delay = f"{type(exc).__name__}: {exc}".rstrip(": "), None
            if isinstance(error, UpstreamError) and error.status not in RETRY_STATUSES:
                if prompt_format == "tokens" and self.prompt_format == "auto" and rejects_token_prompt(error):
                    logger.warning("the server at %s takes no token-id prompts (%s); sending text "
                                   "prompts from now on", self.url, error)
                    self._token_prompts_rejected = True
                    continue
                if error.status in (401, 403):
                    raise EngineError(f"the server at {self.url} refused the API key ({error})")
                raise InvalidRequestError(error.message)
            failures += 1
            if failures > self.max_retries:
                raise EngineUnavailableError(
                    f"the server at {self.url} failed {failures} tries; the last one: {error}")
            if delay is None:
                delay = random.uniform(0, min(self.retry_backoff_max_s,
                                              self.retry_backoff_s * 2 ** (failures - 1)))
            logger.info("retrying a request to %s in %.2fs after %s", self.url, delay, error)
            await asyncio.sleep(delay)

    def _request_body(self, request: GenerateRequest, prompt_format: str) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model_name, **_sampling_fields(request.sampling),
                                "stream": True, "stream_options": {"include_usage": True}}
        if prompt_format == "chat":
            return "/chat/completions", {"messages": request.messages, **body}
        ids = request.prompt_token_ids
        if prompt_format == "tokens":
            return "/completions", {"prompt": list(ids), **body}
        prefix = self.tokenizer.prompt_prefix_ids
        if prefix and ids[:len(prefix)] == prefix and len(ids) > len(prefix):
            ids = ids[len(prefix):]  # the server adds the BOS itself when it tokenizes text
        return "/completions", {"prompt": self.tokenizer.prompt_text(list(ids)), **body}

    async def _relay(self, flight: _Flight, resp: httpx.Response, prompt_format: str) -> None:
        """Turn the server's event stream into outputs on ``flight``, ending with a final one."""
        usage: dict[str, Any] | None = None
        reason: str | None = None
        done = False
        if resp.headers.get("content-type", "").startswith("application/json"):
            # A server that ignored "stream": its whole answer is the one event.
            events: AsyncGenerator[str, None] = _each([(await resp.aread()).decode(errors="replace")])
        else:
            events = _event_data(resp)
        async with contextlib.aclosing(events):
            async for data in events:
                if data == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError as exc:
                    raise EngineUnavailableError(
                        f"the server at {self.url} sent an event that is not JSON: {data[:200]!r}") from exc
                if not isinstance(event, dict):
                    continue
                if event.get("error") is not None:
                    err = event["error"]
                    message = str(err.get("message") or err) if isinstance(err, dict) else str(err)
                    flight.emit(flight.output(num_output_tokens=self._count_output(flight.text),
                                              finished=True, error=message))
                    return
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    if prompt_format == "chat":
                        piece = (choice.get("delta") or choice.get("message") or {}).get("content")
                    else:
                        piece = choice.get("text")
                    if piece:
                        flight.streamed = True
                        flight.text += piece
                        flight.chunks += 1
                        flight.emit(flight.output(piece))
                    reason = choice.get("finish_reason") or reason
        if reason is None and not done:
            raise EngineUnavailableError(f"the stream from {self.url} ended before the request finished")
        flight.emit(self._final(flight, reason, usage))

    def _final(self, flight: _Flight, reason: str | None, usage: dict[str, Any] | None) -> GenerateOutput:
        prompt_tokens = len(flight.request.prompt_token_ids)
        output_tokens = cached = None
        if usage is not None:
            reported = _count(usage.get("prompt_tokens"))
            prompt_tokens = prompt_tokens if reported is None else reported
            output_tokens = _count(usage.get("completion_tokens"))
            details = usage.get("prompt_tokens_details")  # null on servers without a prefix cache
            cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
        if output_tokens is None:
            output_tokens = self._count_output(flight.text)
        return flight.output(num_prompt_tokens=prompt_tokens, num_cached_tokens=cached or 0,
                             num_output_tokens=output_tokens, finished=True,
                             finish_reason=_finish_reason(reason))

    def _count_output(self, text: str) -> int:
        return len(self.tokenizer.encode(text)) if text else 0

    async def _get_models(self) -> httpx.Response:
        try:
            resp = await self._client.get("/models")
        except httpx.TransportError as exc:
            raise EngineUnavailableError(
                f"cannot reach the server at {self.url}: {type(exc).__name__}: {exc}".rstrip(": ")
            ) from exc
        if resp.status_code in (401, 403):
            raise EngineError(f"the server at {self.url} refused the API key "
                              f"({UpstreamError.from_response(resp)})")
        if resp.status_code != 200:
            error = UpstreamError.from_response(resp)
            raise EngineUnavailableError(f"the server at {self.url} answered /models with {error}")
        return resp


def _sampling_fields(s: SamplingParams) -> dict[str, Any]:
    fields: dict[str, Any] = {"max_tokens": s.max_new_tokens, "temperature": s.temperature,
                              "top_p": s.top_p}
    # Extensions vLLM, SGLang and Parrot take, sent only when they matter: a hosted API may
    # reject fields it does not know. top_k 0 and -1 both mean "every token".
    if s.top_k > 0:
        fields["top_k"] = s.top_k
    if s.ignore_eos:
        fields["ignore_eos"] = True
    if s.stop_token_ids:
        fields["stop_token_ids"] = list(s.stop_token_ids)
    if s.seed is not None:
        fields["seed"] = s.seed
    if s.stop:
        fields["stop"] = list(s.stop)
    # Sent only when set, for the same reason; a hosted API takes the first three, vLLM (and
    # SGLang's and Parrot's OpenAI routes) all five.
    if s.presence_penalty:
        fields["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        fields["frequency_penalty"] = s.frequency_penalty
    if s.logit_bias:
        fields["logit_bias"] = {str(t): b for t, b in s.logit_bias.items()}
    if s.repetition_penalty != 1.0:
        fields["repetition_penalty"] = s.repetition_penalty
    if s.min_tokens > s.resumed_output_len:  # the server counts only what it generates
        fields["min_tokens"] = s.min_tokens - s.resumed_output_len
    if s.json_schema == {"type": "object"}:
        fields["response_format"] = {"type": "json_object"}
    elif s.json_schema is not None:
        fields["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": s.json_schema}}
    return fields


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def _event_data(resp: httpx.Response) -> AsyncGenerator[str, None]:
    """The ``data`` of each server-sent event (one line each, as OpenAI servers send them)."""
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


async def _each(items: list[str]) -> AsyncGenerator[str, None]:
    for item in items:
        yield item
