"""The one dispatcher: every engine request of every face (native calls, OpenAI routes) goes
through here, so each gets the same placement, failover and accounting.

    face ──► Dispatcher.open(DispatchRequest) ──► Dispatch (an async stream of outputs)
                 place: GlobalScheduler (objective, task group, prefix affinity, load)
                 start the request on that engine, stream its outputs
                 the engine dies mid-way ──► registry.failed(engine) ──► place again,
                     resume from the prompt plus the tokens generated so far
                 end: scheduler counts, the prompt+output noted in the engine's prefix index,
                     per-request metrics (finish reason, tokens)

A resumed request reads as one: its outputs' counts are those of the whole generation,
and text held back for a possible stop string on the lost engine is sent on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from parrot.service.dispatch.registry import EngineHandle, EngineRegistry
from parrot.service.dispatch.scheduler import GlobalScheduler
from parrot.service.engine.base import (
    EngineUnavailableError,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    Objective,
    SamplingParams,
)
from parrot.service.engine.tokenizer import ModelTokenizer
from parrot.service.errors import ServiceUnavailableError
from parrot.service.observe.observer import Observer, RequestRecord

logger = logging.getLogger(__name__)

DEFAULT_ENGINE_WAIT_S = 30.0

OnPlaced = Callable[[EngineHandle, list[int]], Awaitable[None]]


@dataclass
class DispatchRequest:
    """One generation, as a face asks for it; the dispatcher picks the engine."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    model: str | None = None  # None: the service's default model
    objective: Objective = "latency"
    priority: int = 0
    group_id: str | None = None  # requests feeding one consumer: placed together
    messages: list[dict[str, str]] | None = None  # the chat the prompt renders, if any
    endpoint: str = "native"  # the metrics label of the face
    engine: EngineHandle | None = None  # run here while it takes work (a template's later outputs)
    on_placed: OnPlaced | None = None  # told the engine and prompt before the request starts
    request_id: str | None = None


class Dispatcher:
    def __init__(self, registry: EngineRegistry, scheduler: GlobalScheduler, *,
                 observer: Observer | None = None,
                 engine_wait_s: float = DEFAULT_ENGINE_WAIT_S) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.observer = observer  # metrics, logs, traces and the dashboard's record
        self.engine_wait_s = engine_wait_s  # how long a request waits for an engine to take it
        self._ids = itertools.count()
        self._prefills: dict[tuple[str, tuple[int, ...]], asyncio.Future[None]] = {}
        registry.on_removed.append(self._forget_prefills)

    async def engines(self, model: str | None = None) -> list[EngineHandle]:
        """The engines serving ``model`` (the default model when None), waiting for one to
        join or come back for up to ``engine_wait_s``."""
        model = model or self.registry.default_model
        handles = await self.registry.wait_for_engines(model, self.engine_wait_s)
        if not handles:
            raise ServiceUnavailableError(
                f"no engine {'for ' + repr(model) + ' ' if model else ''}became available within "
                f"{self.engine_wait_s:g} s")
        return handles

    async def tokenizer(self, model: str | None = None) -> ModelTokenizer:
        """The tokenizer of ``model`` (engines of one model share their vocabulary)."""
        return (await self.engines(model))[0].engine.tokenizer

    def tokenizer_now(self, model: str | None = None) -> ModelTokenizer | None:
        """The tokenizer of ``model`` if an engine serves it now, without waiting."""
        handles = [h for h in self.registry.handles.values()
                   if h.model == (model or self.registry.default_model)]
        return handles[0].engine.tokenizer if handles else None

    async def open(self, request: DispatchRequest) -> Dispatch:
        """Place ``request`` on an engine; iterate the returned ``Dispatch`` for its outputs."""
        if request.request_id is None:
            request.request_id = f"req-{next(self._ids)}"
        dispatch = Dispatch(self, request)
        try:
            await dispatch.place(request.engine)
        except BaseException as exc:
            self.record_failed(dispatch, exc)
            raise
        return dispatch

    def engine_for(self, prompt: list[int], objective: Objective, group: str | None = None,
                   model: str | None = None) -> EngineHandle | None:
        """The engine a request for ``prompt`` would be placed on now (None when no engine takes
        work), without placing anything: where to prefill ahead for a call still waiting."""
        candidates = self.registry.engines(model or self.registry.default_model)
        if not candidates:
            return None
        return self.scheduler.place(candidates, prompt, objective, group, record=False)

    async def prefill(self, handle: EngineHandle, token_ids: list[int], priority: int = 0) -> None:
        """Have ``handle`` compute ``token_ids``' KV once (a task group's shared start before it
        fans out, a waiting call's known start), ranked as throughput work of ``priority``;
        concurrent askers for the same prefix wait for the one prefill, and a prefix already
        sent there whole is not prefilled again."""
        if not handle.engine.supports_prefix_control or not token_ids:
            return
        key = (handle.id, tuple(token_ids))
        pending = self._prefills.get(key)
        if pending is None:
            if self.scheduler.affinity(handle, token_ids) >= len(token_ids):
                return  # already sent there whole, so cached (or being computed) already
            pending = asyncio.ensure_future(handle.engine.prefill(list(token_ids), priority))
            self._prefills[key] = pending

            def done(future: asyncio.Future[None]) -> None:
                if self._prefills.get(key) is future:
                    del self._prefills[key]
                if not future.cancelled() and future.exception() is None:
                    self.scheduler.sent(handle, token_ids)  # cached there now: never again

            pending.add_done_callback(done)
        try:
            await asyncio.shield(pending)
        except asyncio.CancelledError:
            if not pending.cancelled():  # this waiter was cancelled, not the prefill
                raise
        except Exception:  # noqa: BLE001 -- a prefill is a hint: the calls run without it
            pass

    def cancel_prefill(self, handle: EngineHandle, token_ids: list[int]) -> None:
        """Stop a prefill under way (what it computed so far stays cached); its waiters go on."""
        pending = self._prefills.get((handle.id, tuple(token_ids)))
        if pending is not None:
            pending.cancel()

    def _forget_prefills(self, handle: EngineHandle) -> None:
        for key in [k for k in self._prefills if k[0] == handle.id]:
            del self._prefills[key]

    def record_finished(self, dispatch: Dispatch, out: GenerateOutput) -> None:
        if self.observer is not None and dispatch.record is not None:
            self.observer.request_finished(dispatch.record, out, dispatch.handle,
                                           dispatch.request.prompt_token_ids)

    def record_aborted(self, dispatch: Dispatch) -> None:
        if self.observer is not None and dispatch.record is not None:
            self.observer.request_aborted(dispatch.record)

    def record_failed(self, dispatch: Dispatch, exc: BaseException) -> None:
        """A request refused or failed by an exception (not an engine's error output)."""
        if self.observer is not None and dispatch.record is not None:
            if isinstance(exc, asyncio.CancelledError):
                self.observer.request_aborted(dispatch.record)
            else:
                outcome = "rejected" if isinstance(exc, InvalidRequestError) else "error"
                self.observer.request_failed(dispatch.record, f"{type(exc).__name__}: {exc}", outcome)


class Dispatch:
    """One request's life across engines: iterate it for outputs, ``aclose`` to abort it."""

    def __init__(self, dispatcher: Dispatcher, request: DispatchRequest) -> None:
        self._dispatcher = dispatcher
        self.request = request
        self.handle: EngineHandle | None = None
        self.objective: Objective = request.objective
        self.engine_request_id: str | None = None  # the request on the current engine
        self.finished = False
        self._counted = False  # in the scheduler's in-flight count of ``handle``
        self._attempt = 0
        self._stream: AsyncIterator[GenerateOutput] | None = None
        observer = dispatcher.observer
        self.record: RequestRecord | None = observer.request_opened(request) if observer else None

    @property
    def tokenizer(self) -> ModelTokenizer:
        assert self.handle is not None
        return self.handle.engine.tokenizer

    async def place(self, preferred: EngineHandle | None = None, prompt: list[int] | None = None) -> None:
        d = self._dispatcher
        prompt = self.request.prompt_token_ids if prompt is None else prompt
        candidates = await d.engines(self.request.model)
        if preferred is not None and preferred in candidates:
            self.handle = preferred
        else:
            self.handle = d.scheduler.place(candidates, prompt, self.objective, self.request.group_id)
        # Counted in flight from now on, so the next placement (a sibling placed in the same
        # tick) sees this one.
        d.scheduler.begin(self.handle, self.objective)
        self._counted = True
        if self.request.on_placed is not None:
            try:
                await self.request.on_placed(self.handle, prompt)
            except BaseException:  # cancelled (its session went) or failed: it never started, and
                self._end_count(self.handle)  # whoever placed it gets no Dispatch to close
                raise
        if d.observer is not None and self.record is not None:
            d.observer.request_placed(self.record, self.handle)  # after any shared-prefix prefill

    async def set_priority(self, priority: int, objective: Objective) -> None:
        """A fetch raised this request's importance: re-count and re-rank it where it runs."""
        self.request.priority = priority
        if self.handle is not None and self._counted:
            self._dispatcher.scheduler.retarget(self.handle, self.objective, objective)
        self.objective = objective
        if self.handle is not None and self.engine_request_id is not None:
            await self.handle.engine.set_priority(self.engine_request_id, priority, objective)

    def __aiter__(self) -> AsyncIterator[GenerateOutput]:
        if self._stream is None:
            self._stream = self._run_once()
        return self._stream

    async def _run_once(self) -> AsyncIterator[GenerateOutput]:
        try:
            async for out in self._run():
                yield out
        except Exception as exc:
            self.finished = True  # rejected or failed: the face reports it, it was not aborted
            self._dispatcher.record_failed(self, exc)
            raise

    async def aclose(self) -> None:
        """Abort the request if it still runs (its engine stream closes, which aborts it)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # "already running": its reader's task closes it
                await stream.aclose()  # type: ignore[attr-defined]
        elif self.handle is not None:
            self._end_count(self.handle)  # placed, never started
        if not self.finished:
            self.finished = True
            self._dispatcher.record_aborted(self)

    async def _run(self) -> AsyncIterator[GenerateOutput]:
        d, req = self._dispatcher, self.request
        ids: list[int] = []  # generated so far, on every engine
        text = ""  # the text sent on so far
        first: GenerateOutput | None = None  # the first engine's report (prompt and cache counts)
        while True:
            assert self.handle is not None
            handle = self.handle
            left = req.sampling.max_new_tokens - len(ids)
            if ids and left <= 0:  # the lost engine had generated everything asked for
                yield self._finish(GenerateOutput(
                    req.request_id, [], "", first.num_prompt_tokens if first else 0,
                    first.num_cached_tokens if first else 0, len(ids), finished=True,
                    finish_reason="length"))
                return
            engine_request = GenerateRequest(
                request_id=req.request_id if not self._attempt else f"{req.request_id}-{self._attempt}",
                prompt_token_ids=req.prompt_token_ids + ids,
                sampling=replace_sampling(req.sampling, left, len(ids)),
                objective=self.objective, priority=req.priority, group_id=req.group_id,
                messages=req.messages if not ids else None,
            )
            self.engine_request_id = engine_request.request_id
            done_before = len(ids)  # tokens earlier engines generated
            expected_hit = d.scheduler.affinity(handle, engine_request.prompt_token_ids)
            reported = not handle.engine.supports_prefix_control  # its cache hit, once per attempt
            d.scheduler.sent(handle, engine_request.prompt_token_ids)
            try:
                async with contextlib.aclosing(handle.engine.generate(engine_request)) as stream:
                    async for out in stream:
                        if not reported:
                            reported = True
                            d.scheduler.cache_hit(handle, engine_request.prompt_token_ids, expected_hit,
                                                  out.num_cached_tokens)
                        first = first or out
                        ids += out.token_ids
                        text += out.text
                        out = replace(out, request_id=req.request_id,
                                      num_prompt_tokens=first.num_prompt_tokens,
                                      num_cached_tokens=first.num_cached_tokens,
                                      num_output_tokens=done_before + out.num_output_tokens)
                        if d.observer is not None and self.record is not None:
                            d.observer.request_output(self.record, out)
                        if out.finished:
                            if not out.error:
                                d.scheduler.sent(handle, req.prompt_token_ids + ids)  # cached there too
                            yield self._finish(out)
                            return
                        yield out
                raise EngineUnavailableError(f"{handle.kind} engine {handle.id} ended a request "
                                             f"without finishing it")
            except EngineUnavailableError as exc:
                logger.warning("request %s lost engine %s (%s); resuming elsewhere", req.request_id,
                               handle.id, exc)
                await d.registry.failed(handle, str(exc))
            finally:
                self._end_count(handle)
            self._attempt += 1
            if text and not ids:  # a backend that reports no token ids (an OpenAI server)
                ids = handle.engine.tokenizer.encode(text)
            await self.place(prompt=req.prompt_token_ids + ids)
            if ids:  # text held back for a stop string on the lost engine is complete now
                tail = self.tokenizer.decode(ids)[len(text):]
                if tail:
                    text += tail
                    yield GenerateOutput(req.request_id, [], tail, 0, 0, len(ids))

    def _end_count(self, handle: EngineHandle) -> None:
        if self._counted:
            self._counted = False
            self._dispatcher.scheduler.end(handle, self.objective)  # a fetch may have changed it

    def _finish(self, out: GenerateOutput) -> GenerateOutput:
        self.finished = True
        self._dispatcher.record_finished(self, out)
        return out


def replace_sampling(sampling: SamplingParams, max_new_tokens: int, resumed: int) -> SamplingParams:
    if not resumed:
        return sampling
    # The prompt's logprobs went out with the first engine's first output.
    return sampling.model_copy(update={"max_new_tokens": max_new_tokens, "prompt_logprobs": None,
                                       "resumed_output_len": sampling.resumed_output_len + resumed})
