"""Serve the OpenAI-compatible API: validate, build engine requests, shape responses.

The router hands over parsed protocol objects; this class checks the model and what
only its engines can tell (context length), tokenizes, and dispatches one request per
prompt through the service's one ``Dispatcher`` (the same placement by prefix
affinity and load, and failover to another engine, as native calls get; a request's
prompts are placed together), read as a ``RequestGroup``. It returns either a
response object or an ``EventStream`` of server-sent events.

Defaults: a request without ``max_tokens`` gets the rest of the context window,
capped at ``default_max_tokens`` (1024), so a forgotten limit cannot tie the engine
up for the whole window; ``temperature`` defaults to 1.0 as in OpenAI's API.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from parrot.service.api.http import SSE_DONE, EventStream, sse_event
from parrot.service.api.openai.logprobs import CompletionLogprobsBuilder, TokenStrings, chat_logprobs
from parrot.service.api.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    UsageInfo,
)
from parrot.service.api.openai.tools import ToolDeltas, chat_template_messages, reply_message
from parrot.service.dispatch.dispatcher import Dispatch, Dispatcher, DispatchRequest
from parrot.service.dispatch.sampling import sampling_params
from parrot.service.dispatch.streams import RequestGroup
from parrot.service.engine.base import GenerateOutput, InvalidRequestError, SamplingParams, TokenLogprob
from parrot.service.engine.tokenizer import ModelTokenizer, off_loop
from parrot.service.errors import (
    BadRequestError,
    ContextLengthExceededError,
    EngineFailedError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from parrot.service.tenancy import Tenant
from parrot.tool_calls import ToolUse

DEFAULT_MAX_TOKENS = 1024

COMPLETIONS = "completions"
CHAT = "chat.completions"


@dataclass
class _Choice:
    """What one prompt produced so far."""

    texts: list[str] = field(default_factory=list)
    final: GenerateOutput | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


class OpenAIServing:
    def __init__(self, dispatcher: Dispatcher, *, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.dispatcher = dispatcher
        self.default_max_tokens = default_max_tokens
        self._token_strings: weakref.WeakKeyDictionary[ModelTokenizer, TokenStrings] = (
            weakref.WeakKeyDictionary())

    def _strings(self, tokenizer: ModelTokenizer) -> TokenStrings:
        """Token texts and bytes for logprobs, remembered per tokenizer."""
        strings = self._token_strings.get(tokenizer)
        if strings is None:
            strings = self._token_strings[tokenizer] = TokenStrings(tokenizer)
        return strings

    def _model(self, model: str | None) -> str:
        """The model asked for, checked (the first model served when None)."""
        served = self.dispatcher.registry.models()
        if not served:
            raise ServiceUnavailableError("no engine is available yet; try again shortly")
        if model is not None and model not in served:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; this server serves {', '.join(map(repr, served))}",
                param="model",
            )
        return model or served[0]

    # ---- /v1/models -----------------------------------------------------------------
    def _model_card(self, model: str) -> ModelCard:
        engine = next(h.engine for h in self.dispatcher.registry.handles.values() if h.model == model)
        return ModelCard(id=model, max_model_len=engine.max_context_len)

    def list_models(self) -> ModelList:
        return ModelList(data=[self._model_card(m) for m in self.dispatcher.registry.models()])

    def get_model(self, model: str) -> ModelCard:
        return self._model_card(self._model(model))

    # ---- /v1/completions --------------------------------------------------------------
    async def create_completion(
        self, request: CompletionRequest, tenant: Tenant | None = None
    ) -> CompletionResponse | EventStream:
        model = self._model(request.model)
        tokenizer = await self.dispatcher.tokenizer(model)
        prompt = request.prompt
        chars = len(prompt) if isinstance(prompt, str) else sum(len(p) for p in prompt if isinstance(p, str))
        prompts = await off_loop(chars, self._completion_prompts, tokenizer, request)
        echoes = self._echoes(tokenizer, request, prompts)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        group = await self._start(model, response_id, prompts, request, COMPLETIONS, param="prompt",
                                  tenant=tenant)
        if request.stream:
            events = self._completion_events(group, response_id, request, echoes)
            return self._event_stream(events, group, COMPLETIONS)
        choices = await self._collect(group, COMPLETIONS)
        out = []
        for i, c in enumerate(choices):
            echo = echoes[i // group.n] if echoes else None
            logprobs = None
            if request.logprobs is not None:
                builder = CompletionLogprobsBuilder(self._strings(tokenizer), request.logprobs)
                entries: list[TokenLogprob | None] = list(c.logprobs)
                ids = list(c.token_ids)
                if echo is not None:
                    entries = list(c.prompt_logprobs or [None] * len(echo[1])) + entries
                    ids = echo[1] + ids
                logprobs = builder.build(entries, ids)
            out.append(CompletionChoice(index=i, text=(echo[0] if echo else "") + c.text,
                                        logprobs=logprobs, finish_reason=_finish_reason(c.final)))
        return CompletionResponse(id=response_id, model=group.model, usage=_usage(choices, group.n),
                                  choices=out)

    @staticmethod
    def _echoes(tokenizer: ModelTokenizer, request: CompletionRequest,
                prompts: list[list[int]]) -> list[tuple[str, list[int]]] | None:
        """With ``echo``: each prompt's text (as sent, or its ids decoded) and token ids."""
        if not request.echo:
            return None
        given = request.prompt
        texts = [given] if isinstance(given, str) else given if isinstance(given[0], str) else None
        return [(texts[i] if texts is not None else tokenizer.decode(ids), ids)  # type: ignore[misc]
                for i, ids in enumerate(prompts)]

    @staticmethod
    def _completion_prompts(tokenizer: ModelTokenizer, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        # One prompt (text or token ids) or a list of them; the schema checked the shapes.
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        return [tokenizer.encode(p) if isinstance(p, str) else list(p)  # type: ignore[arg-type]
                for p in prompts]

    async def _completion_events(self, group: _Served, response_id: str, request: CompletionRequest,
                                 echoes: list[tuple[str, list[int]]] | None) -> AsyncIterator[str]:
        model = group.model
        choices = [_Choice() for _ in range(len(group))]
        builders = [CompletionLogprobsBuilder(self._strings(group.tokenizer), request.logprobs)
                    for _ in choices] if request.logprobs is not None else None
        async for index, out in group.outputs():
            first = not choices[index].texts
            _observe(choices[index], out)
            if out.error:
                yield _error_event(out.error)
                break
            text, entries, ids = out.text, list(out.logprobs or []), list(out.token_ids)
            if first and echoes:  # the prompt goes first, in the choice's first chunk
                echo = echoes[index // group.n]
                text = echo[0] + text
                if builders is not None:
                    entries = list(out.prompt_logprobs or [None] * len(echo[1])) + entries
                    ids = echo[1] + ids
            logprobs = builders[index].build(entries, ids) if builders is not None and ids else None
            if text or out.finished or logprobs is not None:
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=out.finish_reason if out.finished else None)
                yield sse_event(CompletionStreamResponse(id=response_id, model=model,
                                                         choices=[choice]))
        else:
            if request.include_usage:
                yield sse_event(CompletionStreamResponse(id=response_id, model=model, choices=[],
                                                         usage=_usage(choices, group.n)))
        yield SSE_DONE

    # ---- /v1/chat/completions ---------------------------------------------------------
    async def create_chat_completion(
        self, request: ChatCompletionRequest, tenant: Tenant | None = None
    ) -> ChatCompletionResponse | EventStream:
        tool_use = request.tool_use
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        group = await self.start_chat(request, response_id, tenant)
        if request.stream:
            events = (self._chat_events(group, response_id, request.include_usage) if tool_use is None
                      else self._tool_chat_events(group, response_id, request.include_usage))
            return self._event_stream(events, group, CHAT)
        choices = await self._collect(group, CHAT)
        response = ChatCompletionResponse(
            id=response_id, model=group.model, usage=_usage(choices, group.n),
            choices=[self._chat_choice(i, c, tool_use) for i, c in enumerate(choices)],
        )
        if request.logprobs:
            strings = self._strings(group.tokenizer)
            for out, c in zip(response.choices, choices, strict=True):
                out.logprobs = chat_logprobs(strings, c.logprobs)
        return response

    async def start_chat(self, request: ChatCompletionRequest, response_id: str,
                         tenant: Tenant | None = None, endpoint: str = CHAT) -> _Served:
        """Render, tokenize and dispatch a chat request (also what ``/v1/responses`` runs)."""
        model = self._model(request.model)
        tokenizer = await self.dispatcher.tokenizer(model)
        messages, template_tools = chat_template_messages(
            request.messages, request.tool_use, request.tools, native_tools=tokenizer.supports_tools)
        chars = sum(len(m["content"]) for m in messages)
        prompt = await off_loop(chars, self._chat_prompt, tokenizer, messages, template_tools)
        return await self._start(model, response_id, [prompt], request, endpoint, param="messages",
                                 max_tokens=request.max_output_tokens, messages=messages,
                                 tenant=tenant)

    @staticmethod
    def _chat_choice(index: int, choice: _Choice, tool_use: ToolUse | None) -> ChatCompletionChoice:
        if tool_use is None:
            return ChatCompletionChoice(index=index, message=ChatResponseMessage(content=choice.text),
                                        finish_reason=_finish_reason(choice.final))
        message, finish_reason = reply_message(tool_use, choice.text, _finish_reason(choice.final))
        return ChatCompletionChoice(index=index, message=message, finish_reason=finish_reason)

    async def _tool_chat_events(self, group: _Served, response_id: str,
                                include_usage: bool) -> AsyncIterator[str]:
        """A tool-use reply streamed: message text as it grows, or each call's id and name,
        then its arguments in pieces (``tools.ToolDeltas``)."""
        model = group.model

        def chunk(index: int, delta: DeltaMessage, finish_reason=None) -> str:
            choice = ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish_reason)
            return sse_event(ChatCompletionStreamResponse(id=response_id, model=model, choices=[choice]))

        choices = [_Choice() for _ in range(len(group))]
        readers = [ToolDeltas() for _ in range(len(group))]
        for index in range(len(group)):  # no content yet: a reply that calls tools has none
            yield chunk(index, DeltaMessage(role="assistant"))
        async for index, out in group.outputs():
            _observe(choices[index], out)
            if out.error:
                yield _error_event(out.error)
                break
            reader = readers[index]
            for delta in reader.feed(out.text):
                yield chunk(index, delta)
            if out.finished:
                if not reader.emitted and reader.text:  # cut short before anything was readable
                    yield chunk(index, DeltaMessage(content=reader.text))
                yield chunk(index, DeltaMessage(), reader.finish_reason(_finish_reason(out)))
        else:
            if include_usage:
                yield sse_event(ChatCompletionStreamResponse(id=response_id, model=model,
                                                             choices=[], usage=_usage(choices, group.n)))
        yield SSE_DONE

    @staticmethod
    def _chat_prompt(tokenizer: ModelTokenizer, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]] | None = None) -> list[int]:
        try:
            return tokenizer.apply_chat_template(messages, tools=tools)
        except InvalidRequestError:  # e.g. the model has no chat template
            raise
        except Exception as exc:  # a template that raises (e.g. roles must alternate)
            raise BadRequestError(f"the chat template rejected these messages: {exc}",
                                  param="messages") from exc

    async def _chat_events(self, group: _Served, response_id: str,
                           include_usage: bool) -> AsyncIterator[str]:
        model = group.model

        def chunk(index: int, delta: DeltaMessage, finish_reason=None, logprobs=None) -> str:
            choice = ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                finish_reason=finish_reason)
            return sse_event(ChatCompletionStreamResponse(id=response_id, model=model,
                                                          choices=[choice]))

        choices = [_Choice() for _ in range(len(group))]
        strings = self._strings(group.tokenizer)
        for index in range(len(group)):
            yield chunk(index, DeltaMessage(role="assistant", content=""))
        async for index, out in group.outputs():
            _observe(choices[index], out)
            if out.error:
                yield _error_event(out.error)
                break
            # Each chunk carries its own tokens' logprobs (text held back for a possible stop
            # string may come in a later chunk than its token's logprob).
            logprobs = chat_logprobs(strings, out.logprobs) if out.logprobs else None
            if out.finished:
                yield chunk(index, DeltaMessage(content=out.text or None), _finish_reason(out), logprobs)
            elif out.text or logprobs is not None:
                yield chunk(index, DeltaMessage(content=out.text), logprobs=logprobs)
        else:
            if include_usage:
                yield sse_event(ChatCompletionStreamResponse(id=response_id, model=model,
                                                             choices=[], usage=_usage(choices, group.n)))
        yield SSE_DONE

    # ---- shared -----------------------------------------------------------------------
    def _max_new_tokens(self, max_context_len: int, prompt_len: int, max_tokens: int | None,
                        param: str) -> int:
        limit = max_context_len
        if prompt_len >= limit:
            raise ContextLengthExceededError(
                f"the prompt has {prompt_len} tokens, but the model's context length is {limit} "
                f"tokens; shorten the prompt", param=param)
        left = limit - prompt_len
        if max_tokens is None:
            return min(left, self.default_max_tokens)
        if max_tokens > left:
            raise ContextLengthExceededError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"model's context length of {limit} tokens; at most {left} can be generated",
                param="max_tokens")
        return max_tokens

    @staticmethod
    def _sampling(request: SamplingRequest, max_new_tokens: int, choice: int = 0) -> SamplingParams:
        """The sampling of choice number ``choice`` (of ``n``): each its own seed, ``seed + choice``."""
        logprobs = prompt_logprobs = None
        if isinstance(request, ChatCompletionRequest):
            logprobs = request.num_logprobs
        elif isinstance(request, CompletionRequest):
            logprobs = request.logprobs
            prompt_logprobs = logprobs if request.echo else None
        seed = request.seed
        if seed is not None and choice:
            seed = (seed + choice) % 2**64 if seed >= 0 else seed + choice  # stays within 64 bits
        return sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            seed=seed, stop=request.stop_list, stop_token_ids=request.stop_token_ids or (),
            ignore_eos=bool(request.ignore_eos), json_schema=request.json_schema,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            logit_bias=request.logit_bias_ids, min_tokens=request.min_tokens or 0,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )

    async def _start(self, model: str, response_id: str, prompts: list[list[int]],
                     request: SamplingRequest, endpoint: str, *, param: str,
                     max_tokens: int | None = None,
                     messages: list[dict[str, str]] | None = None,
                     tenant: Tenant | None = None) -> _Served:
        """Dispatch one request per prompt and choice (``n`` per prompt, choice ``i * n + j``);
        fail (4xx/5xx) before any response byte if the engine rejects a prompt or fails at
        once. The request counts as one call of ``tenant`` while it runs, and its tokens are
        charged to it when it ends.

        The ``n`` choices of a prompt go as one task group, so they are placed on one engine,
        where the prompt is prefilled once: the builtin engine holds the later ones back until
        the first has cached the prompt (``shared_prefill_min_tokens``), then they fork from it."""
        if max_tokens is None:
            max_tokens = request.max_tokens
        if tenant is not None:
            if max_tokens is not None:
                tenant.check_max_tokens(max_tokens)
            for prompt in prompts:
                tenant.check_prompt(len(prompt), param=param)
            tenant.check_calls(1)
        max_context_len = min(h.engine.max_context_len for h in await self.dispatcher.engines(model))
        requests = []
        n = request.num_choices
        for i, prompt in enumerate(prompts):
            max_new_tokens = self._max_new_tokens(max_context_len, len(prompt), max_tokens, param)
            if tenant is not None and tenant.config.max_tokens is not None:  # an unset max_tokens
                max_new_tokens = min(max_new_tokens, tenant.config.max_tokens)
            for j in range(n):
                requests.append(DispatchRequest(
                    prompt, self._sampling(request, max_new_tokens, j), model=model,
                    # a request's prompts and choices stay together
                    group_id=response_id if len(prompts) * n > 1 else None,
                    messages=messages, endpoint=endpoint, request_id=f"{response_id}-{i * n + j}",
                ))
        dispatches: list[Dispatch] = []
        lease = _Lease(tenant)
        try:
            for r in requests:
                dispatches.append(await self.dispatcher.open(r))
        except BaseException:
            lease.release(0)
            for dispatch in dispatches:  # placed already: counted in flight until closed
                await dispatch.aclose()
            raise
        group = _Served(dispatches, model, response_id, lease, n)
        try:
            firsts = await group.start()
        except BaseException:
            await self._close(group)
            raise
        failed = [out for out in firsts if out.error]
        if failed:
            await self._close(group)
            raise EngineFailedError(f"the engine failed: {failed[0].error}")
        return group

    async def _collect(self, group: _Served, endpoint: str) -> list[_Choice]:
        choices = [_Choice() for _ in range(len(group))]
        try:
            async for index, out in group.outputs():
                _observe(choices[index], out)
                if out.error:
                    raise EngineFailedError(f"the engine failed: {out.error}")
        finally:
            await self._close(group)
        return choices

    async def _close(self, group: _Served) -> None:
        group.lease.release(group.tokens_used)
        await group.aclose()
        self.dispatcher.scheduler.group_done(group.response_id)

    def _event_stream(self, events: AsyncIterator[str], group: _Served,
                      endpoint: str) -> EventStream:
        return EventStream(events, on_close=lambda: self._close(group))


class _Served(RequestGroup):
    """The dispatched requests of one API request."""

    def __init__(self, dispatches: list[Dispatch], model: str, response_id: str,
                 lease: _Lease | None = None, n: int = 1) -> None:
        super().__init__(dispatches)
        self.model = model
        self.response_id = response_id
        self.n = n  # choices per prompt: dispatch i answers prompt i // n
        self.lease = lease or _Lease(None)
        self.tokens_used = 0  # prompt + output of the prompts that finished

    @property
    def tokenizer(self) -> ModelTokenizer:
        return self.dispatches[0].tokenizer

    async def outputs(self) -> AsyncIterator[tuple[int, GenerateOutput]]:
        async for index, out in super().outputs():
            if out.finished:  # a prompt counts once, however many choices it has (as usage does)
                prompt = out.num_prompt_tokens if index % self.n == 0 else 0
                self.tokens_used += prompt + out.num_output_tokens
            yield index, out


class _Lease:
    """One running OpenAI request of a tenant: a call slot, then its tokens charged once."""

    def __init__(self, tenant: Tenant | None) -> None:
        self.tenant = tenant
        if tenant is not None:
            tenant.requests_running += 1

    def release(self, tokens: int) -> None:
        if self.tenant is not None:
            self.tenant.requests_running -= 1
            self.tenant.charge(tokens)
            self.tenant = None


def _observe(choice: _Choice, out: GenerateOutput) -> None:
    choice.texts.append(out.text)
    choice.token_ids += out.token_ids
    if out.logprobs:
        choice.logprobs += out.logprobs
    if out.prompt_logprobs is not None and choice.prompt_logprobs is None:
        choice.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        choice.final = out


def _finish_reason(out: GenerateOutput | None):
    return None if out is None else out.finish_reason


def _usage(choices: list[_Choice], n: int = 1) -> UsageInfo:
    """Usage of a request whose choices answer prompt ``i // n``: each prompt counts once (as
    in OpenAI's API), with the cache hit of its first choice."""
    finals = [c.final for c in choices if c.final is not None]
    firsts = [c.final for c in choices[::n] if c.final is not None]
    prompt = sum(o.num_prompt_tokens for o in firsts)
    completion = sum(o.num_output_tokens for o in finals)
    cached = sum(o.num_cached_tokens for o in firsts)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def _error_event(message: str) -> str:
    info = EngineFailedError(f"the engine failed: {message}").to_info()
    return sse_event({"error": info.model_dump()})
