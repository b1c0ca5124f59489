"""Serve the OpenAI-compatible API: validate, build engine requests, shape responses.

The router hands over parsed protocol objects; this class picks an engine serving
the requested model (the least loaded: these routes are request-centric, with no
app knowledge), checks what only the engine can tell (context length), tokenizes,
runs one engine request per prompt through a ``RequestGroup``, and returns either a
response object or an ``EventStream`` of server-sent events.

Defaults: a request without ``max_tokens`` gets the rest of the context window,
capped at ``default_max_tokens`` (1024), so a forgotten limit cannot tie the engine
up for the whole window; ``temperature`` defaults to 1.0 as in OpenAI's API.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from parrot.service.cluster.placement import GlobalScheduler
from parrot.service.cluster.registry import EngineHandle, EngineRegistry
from parrot.service.engine.base import (
    Engine,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)
from parrot.service.engine.remote import EngineUnavailableError
from parrot.service.errors import (
    BadRequestError,
    ContextLengthExceededError,
    EngineFailedError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from parrot.service.http_utils import SSE_DONE, EventStream, sse_event
from parrot.service.metrics import ServiceMetrics
from parrot.service.openai.protocol import (
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
from parrot.service.streams import RequestGroup

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
    def __init__(self, engines: EngineRegistry, scheduler: GlobalScheduler, *,
                 metrics: ServiceMetrics | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.engines = engines
        self.scheduler = scheduler
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens

    def _pick(self, model: str | None) -> EngineHandle:
        """The least loaded engine serving ``model`` (the first model served when None)."""
        served = self.engines.models()
        if not served:
            raise ServiceUnavailableError("no engine is available yet; try again shortly")
        if model is not None and model not in served:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; this server serves {', '.join(map(repr, served))}",
                param="model",
            )
        return self.scheduler.least_loaded(self.engines.engines(model or served[0]))

    # ---- /v1/models -----------------------------------------------------------------
    def _model_card(self, model: str) -> ModelCard:
        engine = self.engines.engines(model)[0].engine
        return ModelCard(id=model, max_model_len=engine.max_context_len)

    def list_models(self) -> ModelList:
        return ModelList(data=[self._model_card(m) for m in self.engines.models()])

    def get_model(self, model: str) -> ModelCard:
        return self._model_card(self._pick(model).model)

    # ---- /v1/completions --------------------------------------------------------------
    async def create_completion(
        self, request: CompletionRequest
    ) -> CompletionResponse | EventStream:
        handle = self._pick(request.model)
        prompts = self._completion_prompts(handle.engine, request)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        group = await self._start(handle, response_id, prompts, request, COMPLETIONS, param="prompt")
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
    def _completion_prompts(engine: Engine, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        # One prompt (text or token ids) or a list of them; the schema checked the shapes.
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        return [engine.encode(p) if isinstance(p, str) else list(p)  # type: ignore[arg-type]
                for p in prompts]

    async def _completion_events(self, group: _Served, response_id: str,
                                 include_usage: bool) -> AsyncIterator[str]:
        model = group.model
        choices = [_Choice() for _ in range(len(group))]
        async for index, out in group.outputs():
            self._observe(choices[index], out, COMPLETIONS)
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
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | EventStream:
        handle = self._pick(request.model)
        prompt = self._chat_prompt(handle.engine, request)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        group = await self._start(handle, response_id, [prompt], request, CHAT, param="messages",
                                  max_tokens=request.max_output_tokens)
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
    def _chat_prompt(engine: Engine, request: ChatCompletionRequest) -> list[int]:
        messages = [m.to_template_dict() for m in request.messages]
        try:
            return engine.apply_chat_template(messages)
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
            self._observe(choices[index], out, CHAT)
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
    def _max_new_tokens(self, engine: Engine, prompt_len: int, max_tokens: int | None,
                        param: str) -> int:
        limit = engine.max_context_len
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

    def _sampling(self, request: SamplingRequest, max_new_tokens: int) -> SamplingParams:
        fields = dict(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            seed=request.seed,
            stop=tuple(request.stop_list),
            stop_token_ids=tuple(request.stop_token_ids or ()),
            ignore_eos=bool(request.ignore_eos),
            json_schema=request.json_schema,
        )
        try:
            return SamplingParams(**fields)
        except ValidationError as exc:
            raise BadRequestError(f"invalid sampling parameters: {exc}") from exc

    async def _start(self, handle: EngineHandle, response_id: str, prompts: list[list[int]],
                     request: SamplingRequest, endpoint: str, *, param: str,
                     max_tokens: int | None = None) -> _Served:
        """Start one engine request per prompt; fail (4xx/5xx) before any response byte if
        the engine rejects a prompt or fails at once."""
        if max_tokens is None:
            max_tokens = request.max_tokens
        requests = []
        for i, prompt in enumerate(prompts):
            max_new_tokens = self._max_new_tokens(handle.engine, len(prompt), max_tokens, param)
            sampling = self._sampling(request, max_new_tokens)
            requests.append(GenerateRequest(f"{response_id}-{i}", prompt, sampling))
        group = _Served(handle, requests)
        for r in requests:
            self.scheduler.begin(handle, r.objective, r.prompt_token_ids)
        try:
            firsts = await group.start()
        except EngineUnavailableError:
            await self._close(group, endpoint)
            await self.engines.remove(handle.id, "its connection failed")
            raise
        failed = [out for out in firsts if out.error]
        if failed:
            for out in failed:
                self._record(endpoint, out)
            await self._close(group, endpoint)
            raise EngineFailedError(f"the engine failed: {failed[0].error}")
        return group

    async def _collect(self, group: _Served, endpoint: str) -> list[_Choice]:
        choices = [_Choice() for _ in range(len(group))]
        try:
            async for index, out in group.outputs():
                self._observe(choices[index], out, endpoint)
                if out.error:
                    raise EngineFailedError(f"the engine failed: {out.error}")
        finally:
            await self._close(group, endpoint)
        return choices

    def _observe(self, choice: _Choice, out: GenerateOutput, endpoint: str) -> None:
        choice.texts.append(out.text)
        if out.finished:
            choice.final = out
            self._record(endpoint, out)

    def _record(self, endpoint: str, out: GenerateOutput) -> None:
        if self.metrics is not None:
            self.metrics.record_finished(endpoint, out)

    async def _close(self, group: _Served, endpoint: str) -> None:
        if group.counted:
            group.counted = False
            for r in group.requests:
                self.scheduler.end(group.handle, r.objective)
        unfinished = group.num_unfinished
        await group.aclose()
        if self.metrics is not None:
            self.metrics.record_aborted(endpoint, unfinished)

    def _event_stream(self, events: AsyncIterator[str], group: _Served,
                      endpoint: str) -> EventStream:
        return EventStream(events, on_close=lambda: self._close(group, endpoint))


class _Served(RequestGroup):
    """The engine requests of one API request, on the engine that serves them."""

    def __init__(self, handle: EngineHandle, requests: list[GenerateRequest]) -> None:
        super().__init__(handle.engine, requests)
        self.handle = handle
        self.model = handle.model
        self.counted = True  # in the scheduler's in-flight count until closed


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
