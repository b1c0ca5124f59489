"""Runs a session's LLM calls on the engines as soon as their inputs are set.

A template call's prompt is built segment by segment: static text, then input
values as the token ids their producer generated (so a dependent call's prompt
extends its parent's KV in the radix cache), then for each output one generation
whose tokens become part of the context for the rest of the template: fill →
generate → fill → generate in one KV sequence. A chat call's prompt is its messages
rendered with the model's chat template (see ``chat``), then one generation.
Outputs flow into dependents with no client round trip.

The global scheduler picks the engine once the prompt is known. If that engine
dies mid-generation, the call resumes on another engine from the tokens already
generated, so nothing is lost. A failed call fails its dependents with the cause;
nothing is left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

from parrot.schemas import CallDecl, InputSegment, OutputSegment, SamplingConfig, TextSegment
from parrot.service.cluster.placement import GlobalScheduler
from parrot.service.cluster.registry import EngineHandle, EngineRegistry
from parrot.service.engine.base import Engine, GenerateRequest, SamplingParams
from parrot.service.engine.remote import EngineUnavailableError
from parrot.service.errors import ParrotAPIError
from parrot.service.native import chat
from parrot.service.native.graph import Call, Variable
from parrot.service.native.objectives import objective_of
from parrot.service.native.pins import PrefixPins

logger = logging.getLogger(__name__)

DEFAULT_ENGINE_WAIT_S = 30.0


def sampling_params(config: SamplingConfig, max_new_tokens: int | None = None,
                    resumed_output_len: int = 0) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=config.max_tokens if max_new_tokens is None else max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, seed=config.seed,
        stop=tuple(config.stop), ignore_eos=config.ignore_eos, json_schema=config.json_schema,
        resumed_output_len=resumed_output_len,
    )


class CallFailed(Exception):
    pass


@dataclass
class _Progress:
    """One output generated so far (kept across a move to another engine)."""

    text: str = ""
    ids: list[int] = field(default_factory=list)


class Executor:
    def __init__(self, registry: EngineRegistry, scheduler: GlobalScheduler, *,
                 engine_wait_s: float = DEFAULT_ENGINE_WAIT_S) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.engine_wait_s = engine_wait_s  # how long a ready call waits for an engine to exist
        self.pins = PrefixPins()
        self._ids = itertools.count()
        self._background: set[asyncio.Task] = set()

    # ---- graph events -----------------------------------------------------------
    def check(self, decls: list[CallDecl]) -> None:
        """Reject, before they join the graph, chat calls the model's chat template refuses."""
        handles = self.registry.engines(self.registry.default_model)
        if not handles:
            return  # no engine to ask yet: such a call fails when it runs
        for decl in decls:
            if decl.messages is not None:
                chat.layout(handles[0].engine, decl.messages)

    def calls_added(self, calls: list[Call]) -> None:
        handles = self.registry.engines(self.registry.default_model)
        if handles:
            for call in calls:
                if call.kind == "llm":
                    self.pins.add_pending(call, self._static_prefix(handles[0].engine, call))
        for call in calls:
            self.maybe_launch(call)

    def variable_settled(self, var: Variable) -> None:
        """A value or an error arrived: wake or fail the consumers."""
        for consumer in var.consumers:
            self.maybe_launch(consumer)
        producer = var.producer
        if producer is not None and producer.kind == "native" and not producer.is_terminal:
            if var.error is not None:
                self._fail(producer, var.error)
            elif all(v.ready for v in producer.outputs):
                producer.state, producer.finished = "done", time.time()

    def maybe_launch(self, call: Call) -> None:
        if call.state != "pending":
            return
        failed = next((v for v in call.inputs if v.error is not None), None)
        if failed is not None:
            self._fail(call, f"input {failed.name or failed.id!r} failed: {failed.error}")
            return
        if not all(v.ready for v in call.inputs):
            return
        call.state, call.started = "running", time.time()
        self.scheduler.group_done(call.id)  # every member of the group it consumes is done
        if call.kind == "llm":  # native calls run in the client, which sets their outputs
            call.task = asyncio.get_running_loop().create_task(self._run(call))

    def cancel(self, call: Call, reason: str) -> None:
        if call.is_terminal:
            return
        if call.task is not None:
            call.task.cancel()
        call.state, call.error, call.finished = "cancelled", reason, time.time()
        self.pins.resolved(call)
        for var in call.outputs:
            var.fail(reason)

    async def reprioritize(self, call: Call) -> None:
        handle = self.registry.handles.get(call.engine_id or "")
        if call.request_id is not None and handle is not None and call.objective is not None:
            objective = objective_of(call.criterion)
            self.scheduler.retarget(handle, call.objective, objective)
            call.objective = objective
            await handle.engine.set_priority(call.request_id, call.priority, objective)

    def reprioritize_soon(self, call: Call) -> None:
        task = asyncio.get_running_loop().create_task(self.reprioritize(call))
        self._background.add(task)  # held until done, so it is not collected mid-flight
        task.add_done_callback(self._background.discard)

    # ---- running a call ------------------------------------------------------------
    async def _run(self, call: Call) -> None:
        try:
            await self._generate(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure becomes the call's error
            known = CallFailed | ValueError | ParrotAPIError  # errors whose message says it all
            message = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
            self._fail(call, message)
        else:
            call.state, call.finished = "done", time.time()
        finally:
            call.request_id = None
            self.pins.resolved(call)

    async def _engines(self) -> list[EngineHandle]:
        handles = await self.registry.wait_for_engines(self.registry.default_model, self.engine_wait_s)
        if not handles:
            raise CallFailed(f"no engine became available within {self.engine_wait_s:g} s")
        return handles

    def _static_prefix(self, engine: Engine, call: Call) -> list[int]:
        """The prompt tokens known before any input is: the leading static text."""
        if call.messages is not None:
            return chat.static_prefix_ids(engine, call.messages)
        tokens = list(engine.prompt_prefix_ids)
        for segment in call.segments:
            if not isinstance(segment, TextSegment):
                break
            tokens += engine.encode(segment.text)  # segment by segment, as the prompt is built
        return tokens

    async def _generate(self, call: Call) -> None:
        tokenizer = (await self._engines())[0].engine  # engines of one model share a tokenizer
        if call.messages is not None and call.reply is not None:
            values = {v.id: v.value or "" for v in call.inputs}
            await self._output(call, None, chat.prompt_ids(tokenizer, call.messages, values), call.reply)
            return
        context = list(tokenizer.prompt_prefix_ids)
        handle: EngineHandle | None = None
        for segment in call.segments:
            if isinstance(segment, TextSegment):
                context += tokenizer.encode(segment.text)
            elif isinstance(segment, InputSegment):
                var = next(v for v in call.inputs if v.id == segment.var)
                context += var.token_ids if var.token_ids is not None else tokenizer.encode(var.value or "")
            elif isinstance(segment, OutputSegment):
                handle, ids = await self._output(call, handle, context, segment)
                context += ids

    async def _output(self, call: Call, handle: EngineHandle | None, context: list[int],
                      segment: OutputSegment) -> tuple[EngineHandle, list[int]]:
        """Generate one output after ``context`` and set its variable; return the engine that
        finished it and the ids that spell it. The call is placed at its first output."""
        var = next(v for v in call.outputs if v.id == segment.var)
        if handle is None:
            handle = await self._place(call, context)
        text, ids, handle = await self._fill(call, handle, context, var, segment.sampling)
        var.set(text, ids)
        self.variable_settled(var)
        return handle, ids

    async def _place(self, call: Call, context: list[int]) -> EngineHandle:
        handle = self.scheduler.place(await self._engines(), context, objective_of(call.criterion),
                                      call.group)
        call.engine_id = handle.id
        await self.pins.placed(handle, context)
        return handle

    async def _fill(self, call: Call, handle: EngineHandle, context: list[int], var: Variable,
                    sampling: SamplingConfig) -> tuple[str, list[int], EngineHandle]:
        """Generate one output from ``context``; return its text, the ids that spell it, and the
        engine that finished it (another one if the first died on the way)."""
        out = _Progress()
        while True:
            try:
                await self._generate_on(call, handle, context, var, sampling, out)
                return out.text, self._ids_spelling(handle.engine, out.ids, out.text), handle
            except EngineUnavailableError as exc:
                logger.warning("call %s lost engine %s (%s); resuming elsewhere", call.id, handle.id, exc)
                await self.registry.remove(handle.id, str(exc))
                handle = await self._place(call, context + out.ids)

    async def _generate_on(self, call: Call, handle: EngineHandle, context: list[int], var: Variable,
                           sampling: SamplingConfig, progress: _Progress) -> None:
        """Run one output on ``handle``, or resume it from what ``progress`` got elsewhere."""
        engine = handle.engine
        if progress.ids:  # text held back for a possible stop string is complete now
            tail = engine.decode(progress.ids)[len(progress.text):]
            progress.text += tail
            var.push(tail)
        left = sampling.max_tokens - len(progress.ids)
        if left <= 0:
            call.finish_reason = "length"
            return
        objective = objective_of(call.criterion)
        request = GenerateRequest(
            request_id=f"call-{call.id}-{next(self._ids)}",
            prompt_token_ids=context + progress.ids,
            sampling=sampling_params(sampling, left, len(progress.ids)),
            objective=objective,  # type: ignore[arg-type]
            priority=call.priority,
            group_id=call.group,
        )
        call.request_id, call.objective = request.request_id, objective
        last = None
        self.scheduler.begin(handle, objective, request.prompt_token_ids)
        try:
            async with contextlib.aclosing(engine.generate(request)) as stream:
                async for out in stream:
                    if out.error:
                        raise CallFailed(out.error)
                    progress.text += out.text
                    progress.ids += out.token_ids
                    call.output_tokens += len(out.token_ids)
                    if out.text:
                        var.push(out.text)
                    last = out
        finally:
            self.scheduler.end(handle, call.objective)  # a fetch may have changed it meanwhile
            call.objective = None
        if last is None or last.finish_reason == "abort":
            raise CallFailed("the generation was aborted")
        if not call.prompt_tokens:
            call.prompt_tokens, call.cached_tokens = last.num_prompt_tokens, last.num_cached_tokens
        call.finish_reason = last.finish_reason  # before the output is set, so readers see it with the value
        self.scheduler.sent(handle, context + progress.ids)  # the output is cached there too

    @staticmethod
    def _ids_spelling(engine: Engine, ids: list[int], text: str) -> list[int]:
        # Reuse the generated ids (their KV is cached) unless a stop token or string cut the text.
        for candidate in (ids, ids[:-1]):
            if candidate and engine.decode(candidate) == text:
                return candidate
        return engine.encode(text)

    def _fail(self, call: Call, error: str) -> None:
        if call.is_terminal:
            return
        call.state, call.error, call.finished = "failed", error, time.time()
        self.pins.resolved(call)
        logger.info("call %s failed: %s", call.id, error)
        for var in call.outputs:
            if not var.ready:
                var.fail(f"call {call.name or call.id!r} failed: {error}")
                self.variable_settled(var)
