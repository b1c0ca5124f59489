"""Runs a session's LLM calls on the engine as soon as their inputs are set.

A call's prompt is built segment by segment: static text, then input values as
the token ids their producer generated (so a dependent call's prompt extends its
parent's KV in the radix cache), then for each output one generation whose tokens
become part of the context for the rest of the template: fill → generate → fill →
generate in one KV sequence. Outputs flow into dependents with no client round trip.
A failed call fails its dependents with the cause; nothing is left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

from parrot.schemas import InputSegment, OutputSegment, SamplingConfig, TextSegment
from parrot.service.engine.base import Engine, GenerateRequest, SamplingParams
from parrot.service.native.graph import Call, Variable
from parrot.service.native.objectives import objective_of

logger = logging.getLogger(__name__)


def sampling_params(config: SamplingConfig) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, seed=config.seed, stop=tuple(config.stop), ignore_eos=config.ignore_eos,
    )


class CallFailed(Exception):
    pass


class Executor:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids = itertools.count()

    # ---- graph events -----------------------------------------------------------
    def calls_added(self, calls: list[Call]) -> None:
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
        if call.kind == "llm":  # native calls run in the client, which sets their outputs
            call.task = asyncio.get_running_loop().create_task(self._run(call))

    def cancel(self, call: Call, reason: str) -> None:
        if call.is_terminal:
            return
        if call.task is not None:
            call.task.cancel()
        call.state, call.error, call.finished = "cancelled", reason, time.time()
        for var in call.outputs:
            var.fail(reason)

    async def reprioritize(self, call: Call) -> None:
        if call.request_id is not None:
            await self.engine.set_priority(call.request_id, call.priority, objective_of(call.criterion))

    # ---- running a call ------------------------------------------------------------
    async def _run(self, call: Call) -> None:
        try:
            await self._generate(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure becomes the call's error
            message = str(exc) if isinstance(exc, CallFailed | ValueError) else f"{type(exc).__name__}: {exc}"
            self._fail(call, message)
        else:
            call.state, call.finished = "done", time.time()
        finally:
            call.request_id = None

    async def _generate(self, call: Call) -> None:
        engine = self.engine
        context = list(engine.prompt_prefix_ids)
        first = True
        for segment in call.segments:
            if isinstance(segment, TextSegment):
                context += engine.encode(segment.text)
            elif isinstance(segment, InputSegment):
                var = next(v for v in call.inputs if v.id == segment.var)
                context += var.token_ids if var.token_ids is not None else engine.encode(var.value or "")
            elif isinstance(segment, OutputSegment):
                var = next(v for v in call.outputs if v.id == segment.var)
                text, ids = await self._fill(call, context, var, segment.sampling, first)
                first = False
                var.set(text, ids)
                self.variable_settled(var)
                context += ids

    async def _fill(self, call: Call, context: list[int], var: Variable, sampling: SamplingConfig,
                    first: bool) -> tuple[str, list[int]]:
        """Generate one output from ``context``; return its text and the ids that spell it."""
        request = GenerateRequest(
            request_id=f"call-{call.id}-{next(self._ids)}",
            prompt_token_ids=list(context),
            sampling=sampling_params(sampling),
            objective=objective_of(call.criterion),  # type: ignore[arg-type]
            priority=call.priority,
            group_id=call.group,
        )
        call.request_id = request.request_id
        text, ids, last = "", [], None
        async with contextlib.aclosing(self.engine.generate(request)) as stream:
            async for out in stream:
                if out.error:
                    raise CallFailed(out.error)
                text += out.text
                ids += out.token_ids
                if out.text:
                    var.push(out.text)
                last = out
        if last is None or last.finish_reason == "abort":
            raise CallFailed("the generation was aborted")
        if first:
            call.prompt_tokens, call.cached_tokens = last.num_prompt_tokens, last.num_cached_tokens
        return text, self._ids_spelling(ids, text)

    def _ids_spelling(self, ids: list[int], text: str) -> list[int]:
        # Reuse the generated ids (their KV is cached) unless a stop token or string cut the text.
        for candidate in (ids, ids[:-1]):
            if candidate and self.engine.decode(candidate) == text:
                return candidate
        return self.engine.encode(text)

    def _fail(self, call: Call, error: str) -> None:
        if call.is_terminal:
            return
        call.state, call.error, call.finished = "failed", error, time.time()
        logger.info("call %s failed: %s", call.id, error)
        for var in call.outputs:
            if not var.ready:
                var.fail(f"call {call.name or call.id!r} failed: {error}")
                self.variable_settled(var)
