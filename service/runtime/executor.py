"""Runs a session's LLM calls on the engines as soon as their inputs are set.

A template call's prompt is built segment by segment: static text, then input
values as the token ids their producer generated (so a dependent call's prompt
extends its parent's KV in the radix cache), then for each output one generation
whose tokens become part of the context for the rest of the template: fill →
generate → fill → generate in one KV sequence. A chat call's prompt is its messages
rendered with the model's chat template (see ``chat``), then one generation.
Outputs flow into dependents with no client round trip.

Each generation goes through the service's one dispatcher, which places it once the
prompt is known (objective, task group, prefix affinity, load) and, if that engine
dies mid-generation, resumes it on another engine from the tokens already generated,
so nothing is lost. A task group's shared prompt start is prefilled once on its engine
before the group fans out. A failed call fails its dependents with the cause; nothing
is left hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from parrot.schemas import CallDecl, InputSegment, OutputSegment, TextSegment
from parrot.service.dispatch.dispatcher import Dispatch, Dispatcher, DispatchRequest
from parrot.service.dispatch.registry import EngineHandle
from parrot.service.dispatch.sampling import from_config
from parrot.service.engine.tokenizer import ModelTokenizer, off_loop
from parrot.service.errors import ParrotAPIError
from parrot.service.runtime import prompts
from parrot.service.runtime.graph import Call, Variable
from parrot.service.runtime.objectives import objective_of
from parrot.service.runtime.pins import PrefixPins

logger = logging.getLogger(__name__)


class CallFailed(Exception):
    pass


class Executor:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.pins = PrefixPins()
        self._ids = itertools.count()
        self._background: set[asyncio.Task] = set()
        self._dispatches: dict[int, Dispatch] = {}  # id(call) -> its generation in flight

    # ---- graph events -----------------------------------------------------------
    def prepare(self, decls: list[CallDecl]) -> dict[str, list[int]]:
        """Each new LLM call's static prompt start, by call id; a chat call whose messages the
        model's chat template refuses is a 400 here, before the graph changes."""
        tokenizer = self.dispatcher.tokenizer_now()
        if tokenizer is None:
            return {}  # no engine to ask yet: such a call fails when it runs
        return {d.id: prompts.static_prefix(tokenizer, d) for d in decls if d.kind == "llm"}

    def calls_added(self, calls: list[Call], static_prefixes: dict[str, list[int]]) -> None:
        for call in calls:
            if call.id in static_prefixes:
                self.pins.add_pending(call, static_prefixes[call.id])
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
        self.dispatcher.scheduler.group_done(call.id)  # every member of the group it consumes is done
        if call.kind == "llm":  # native calls run in the client, which sets their outputs
            call.task = asyncio.get_running_loop().create_task(self._run(call))

    def cancel(self, call: Call, reason: str) -> None:
        if call.is_terminal:
            return
        if call.task is not None:
            call.task.cancel()
        call.state, call.error, call.finished = "cancelled", reason, time.time()
        self.pins.resolved(call)
        self.dispatcher.scheduler.group_done(call.id)  # a consumer that never ran: forget its group
        for var in call.outputs:
            var.fail(reason)

    async def reprioritize(self, call: Call) -> None:
        dispatch = self._dispatches.get(id(call))
        if dispatch is not None:
            await dispatch.set_priority(call.priority, objective_of(call.criterion))  # type: ignore[arg-type]

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
            self.pins.resolved(call)
            if call.tenant is not None:  # tokens_per_minute: charged once the call ends
                call.tenant.charge(call.prompt_tokens + call.output_tokens)

    async def _generate(self, call: Call) -> None:
        tokenizer = await self.dispatcher.tokenizer()
        if call.messages is not None and call.reply is not None:
            values = {v.id: v.value or "" for v in call.inputs}
            messages = prompts.chat_messages(call.messages, values)
            chars = sum(len(m["content"]) for m in messages)  # a big input: off the event loop
            ids = await off_loop(chars, prompts.encode_chat, tokenizer, messages)
            await self._output(call, None, ids, call.reply, messages)
            return
        context = list(tokenizer.prompt_prefix_ids)
        handle: EngineHandle | None = None
        for segment in call.segments:
            if isinstance(segment, TextSegment):
                context += await off_loop(len(segment.text), tokenizer.encode, segment.text)
            elif isinstance(segment, InputSegment):
                var = next(v for v in call.inputs if v.id == segment.var)
                if var.token_ids is not None and segment.strip is None:
                    context += var.token_ids  # as generated: their KV is cached
                else:
                    value = segment.apply(var.value or "")
                    context += await off_loop(len(value), tokenizer.encode, value)
            elif isinstance(segment, OutputSegment):
                handle, ids = await self._output(call, handle, context, segment)
                context += ids

    async def _output(self, call: Call, handle: EngineHandle | None, context: list[int],
                      segment: OutputSegment, messages: list[dict[str, str]] | None = None,
                      ) -> tuple[EngineHandle, list[int]]:
        """Generate one output after ``context`` and set its variable; return the engine that
        finished it and the ids that spell it. The call is placed at its first output; its
        later outputs follow it to the same engine (their context is cached there)."""
        var = next(v for v in call.outputs if v.id == segment.var)
        objective = objective_of(call.criterion)
        if call.tenant is not None:  # the whole prompt is known only now
            call.tenant.check_prompt(len(context))

        async def placed(where: EngineHandle, prompt: list[int]) -> None:
            call.engine_id = where.id
            await self.pins.placed(where, prompt)
            if call.group is not None:  # the group's shared start, computed once before it fans out
                await self.dispatcher.prefill(where, self.pins.shared_start(call, prompt))

        dispatch = await self.dispatcher.open(DispatchRequest(
            context, from_config(segment.sampling), objective=objective,  # type: ignore[arg-type]
            priority=call.priority, group_id=call.group, messages=messages, engine=handle,
            on_placed=placed, request_id=f"call-{call.id}-{next(self._ids)}",
        ))
        self._dispatches[id(call)] = dispatch
        text, ids, last = "", [], None
        try:
            async for out in dispatch:
                if out.error:
                    raise CallFailed(out.error)
                text += out.text
                ids += out.token_ids
                if out.text:
                    var.push(out.text)
                last = out
        finally:
            self._dispatches.pop(id(call), None)
            await dispatch.aclose()
        if last is None or last.finish_reason == "abort":
            raise CallFailed("the generation was aborted")
        call.output_tokens += last.num_output_tokens
        if not call.prompt_tokens:
            call.prompt_tokens, call.cached_tokens = last.num_prompt_tokens, last.num_cached_tokens
        call.finish_reason = last.finish_reason  # type: ignore[assignment]  # before the value is set
        assert dispatch.handle is not None
        ids = self._ids_spelling(dispatch.tokenizer, ids, text)
        var.set(text, ids)
        self.variable_settled(var)
        return dispatch.handle, ids

    @staticmethod
    def _ids_spelling(tokenizer: ModelTokenizer, ids: list[int], text: str) -> list[int]:
        # Reuse the generated ids (their KV is cached) unless a stop token or string cut the text.
        for candidate in (ids, ids[:-1]):
            if candidate and tokenizer.decode(candidate) == text:
                return candidate
        return tokenizer.encode(text)

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
