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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from parrot.service.api.http import SSE_DONE, EventStream, sse_event
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
from parrot.service.dispatch.dispatcher import Dispatch, Dispatcher, DispatchRequest
from parrot.service.dispatch.sampling import sampling_params
from parrot.service.dispatch.streams import RequestGroup
from parrot.service.engine.base import GenerateOutput, InvalidRequestError, SamplingParams
from parrot.service.engine.tokenizer import ModelTokenizer, off_loop
from parrot.service.errors import (
    BadRequestError,
    ContextLengthExceededError,
    EngineFailedError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from parrot.service.tenancy import Tenant

DEFAULT_MAX_TOKENS = 1024

COMPLETIONS = "completions"
CHAT = "chat.completions"


@dataclass
class _Choice:
    """What one prompt produced so far."""

    texts: list[str] = field(default_factory=list)
    final: GenerateOutput | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


class OpenAIServing:
    def __init__(self, dispatcher: Dispatcher, *, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.dispatcher = dispatcher
        self.default_max_tokens = default_max_tokens

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
        response_id = f"cmpl-{uuid.uuid4().hex}"
        group = await self._start(model, response_id, prompts, request, COMPLETIONS, param="prompt",
                                  tenant=tenant)
        if request.stream:
            events = self._completion_events(group, response_id, request.include_usage)
            return self._event_stream(events, group, COMPLETIONS)
        choices = await self._collect(group, COMPLETIONS)
        return CompletionResponse(
            id=response_id, model=group.model, usage=_usage(choices),
            choices=[CompletionChoice(index=i, text=c.text, finish_reason=_finish_reason(c.final))
                     for i, c in enumerate(choices)],
        )

    @staticmethod
    def _completion_prompts(tokenizer: ModelTokenizer, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        # One prompt (text or token ids) or a list of them; the schema checked the shapes.
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        return [tokenizer.encode(p) if isinstance(p, str) else list(p)  # type: ignore[arg-type]
                for p in prompts]

    async def _completion_events(self, group: _Served, response_id: str,
                                 include_usage: bool) -> AsyncIterator[str]:
        model = group.model
        choices = [_Choice() for _ in range(len(group))]
        async for index, out in group.outputs():
            _observe(choices[index], out)
            if out.error:
                yield _error_event(out.error)
                break
            if out.text or out.finished:
                choice = CompletionChoice(index=index, text=out.text,
                                          finish_reason=out.finish_reason if out.finished else None)
                yield sse_event(CompletionStreamResponse(id=response_id, model=model,
                                                         choices=[choice]))
        else:
            if include_usage:
                yield sse_event(CompletionStreamResponse(id=response_id, model=model, choices=[],
                                                         usage=_usage(choices)))
        yield SSE_DONE

    # ---- /v1/chat/completions ---------------------------------------------------------
    async def create_chat_completion(
        self, request: ChatCompletionRequest, tenant: Tenant | None = None
    ) -> ChatCompletionResponse | EventStream:
        model = self._model(request.model)
        messages = [m.to_template_dict() for m in request.messages]
        tokenizer = await self.dispatcher.tokenizer(model)
        chars = sum(len(m["content"]) for m in messages)
        prompt = await off_loop(chars, self._chat_prompt, tokenizer, messages)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        group = await self._start(model, response_id, [prompt], request, CHAT, param="messages",
                                  max_tokens=request.max_output_tokens, messages=messages,
                                  tenant=tenant)
        if request.stream:
            events = self._chat_events(group, response_id, request.include_usage)
            return self._event_stream(events, group, CHAT)
        choices = await self._collect(group, CHAT)
        return ChatCompletionResponse(
            id=response_id, model=group.model, usage=_usage(choices),
            choices=[ChatCompletionChoice(index=i, message=ChatResponseMessage(content=c.text),
                                          finish_reason=_finish_reason(c.final))
                     for i, c in enumerate(choices)],
        )

    @staticmethod
    def _chat_prompt(tokenizer: ModelTokenizer, messages: list[dict[str, str]]) -> list[int]:
        try:
            return tokenizer.apply_chat_template(messages)
        except InvalidRequestError:  # e.g. the model has no chat template
            raise
        except Exception as exc:  # a template that raises (e.g. roles must alternate)
            raise BadRequestError(f"the chat template rejected these messages: {exc}",
                                  param="messages") from exc

    async def _chat_events(self, group: _Served, response_id: str,
                           include_usage: bool) -> AsyncIterator[str]:
        model = group.model

        def chunk(index: int, delta: DeltaMessage, finish_reason=None) -> str:
            choice = ChatCompletionStreamChoice(index=index, delta=delta,
                                                finish_reason=finish_reason)
            return sse_event(ChatCompletionStreamResponse(id=response_id, model=model,
                                                          choices=[choice]))

        choices = [_Choice() for _ in range(len(group))]
        for index in range(len(group)):
            yield chunk(index, DeltaMessage(role="assistant", content=""))
        async for index, out in group.outputs():
            _observe(choices[index], out)
            if out.error:
                yield _error_event(out.error)
                break
            if out.finished:
                yield chunk(index, DeltaMessage(content=out.text or None), _finish_reason(out))
            elif out.text:
                yield chunk(index, DeltaMessage(content=out.text))
        else:
            if include_usage:
                yield sse_event(ChatCompletionStreamResponse(id=response_id, model=model,
                                                             choices=[], usage=_usage(choices)))
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
    def _sampling(request: SamplingRequest, max_new_tokens: int) -> SamplingParams:
        return sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            seed=request.seed, stop=request.stop_list, stop_token_ids=request.stop_token_ids or (),
            ignore_eos=bool(request.ignore_eos), json_schema=request.json_schema,
        )

    async def _start(self, model: str, response_id: str, prompts: list[list[int]],
                     request: SamplingRequest, endpoint: str, *, param: str,
                     max_tokens: int | None = None,
                     messages: list[dict[str, str]] | None = None,
                     tenant: Tenant | None = None) -> _Served:
        """Dispatch one request per prompt; fail (4xx/5xx) before any response byte if the
        engine rejects a prompt or fails at once. The request counts as one call of
        ``tenant`` while it runs, and its tokens are charged to it when it ends."""
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
        for i, prompt in enumerate(prompts):
            max_new_tokens = self._max_new_tokens(max_context_len, len(prompt), max_tokens, param)
            if tenant is not None and tenant.config.max_tokens is not None:  # an unset max_tokens
                max_new_tokens = min(max_new_tokens, tenant.config.max_tokens)
            requests.append(DispatchRequest(
                prompt, self._sampling(request, max_new_tokens), model=model,
                group_id=response_id if len(prompts) > 1 else None,  # a request's prompts stay together
                messages=messages, endpoint=endpoint, request_id=f"{response_id}-{i}",
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
        group = _Served(dispatches, model, response_id, lease)
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
                 lease: _Lease | None = None) -> None:
        super().__init__(dispatches)
        self.model = model
        self.response_id = response_id
        self.lease = lease or _Lease(None)
        self.tokens_used = 0  # prompt + output of the prompts that finished

    async def outputs(self) -> AsyncIterator[tuple[int, GenerateOutput]]:
        async for index, out in super().outputs():
            if out.finished:
                self.tokens_used += out.num_prompt_tokens + out.num_output_tokens
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
    if out.finished:
        choice.final = out


def _finish_reason(out: GenerateOutput | None):
    return None if out is None else out.finish_reason


def _usage(choices: list[_Choice]) -> UsageInfo:
    finals = [c.final for c in choices if c.final is not None]
    prompt = sum(o.num_prompt_tokens for o in finals)
    completion = sum(o.num_output_tokens for o in finals)
    cached = sum(o.num_cached_tokens for o in finals)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def _error_event(message: str) -> str:
    info = EngineFailedError(f"the engine failed: {message}").to_info()
    return sse_event({"error": info.model_dump()})
