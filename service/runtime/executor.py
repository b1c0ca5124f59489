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
before the group fans out (unless the engine computes a shared prefix once by itself).
A failed call fails its dependents with the cause; nothing is left hanging.

Prefill ahead: a call still waiting for inputs already knows how its prompt starts (the
static text before its first input, then any inputs set since, up to the first one not
set). On the engine the call will be placed on (the same placement rule, with that start
as the prompt), that start is prefilled as throughput work while the producers still run,
and pinned there until the call has run; once the inputs arrive only they and the rest
of the prompt are prefilled (a prefill still under way then is stopped, keeping what it
computed). Skipped for a start shorter than ``prefill_ahead_min_tokens``
(a separate request costs more than it saves), on an engine without prefix control or
running latency work (the prefill would slow it), and for a start prefilled already.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import Coroutine
from typing import Any

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

PREFILL_AHEAD_MIN_TOKENS = 16
# Outputs of one engine step reach the executor one by one: waiting this long before looking
# lets sibling producers that finished in the same step settle, so a call about to start is
# not sent a prefill that its own request would have to wait behind.
PREFILL_AHEAD_SETTLE_S = 0.01


class CallFailed(Exception):
    pass


class Executor:
    def __init__(self, dispatcher: Dispatcher, *,
                 prefill_ahead_min_tokens: int | None = PREFILL_AHEAD_MIN_TOKENS) -> None:
        """``prefill_ahead_min_tokens``: the shortest known prompt start of a waiting call that
        is prefilled ahead (None or 0: never)."""
        self.dispatcher = dispatcher
        self.pins = PrefixPins()
        self.prefill_ahead_min_tokens = prefill_ahead_min_tokens or None
        self._ids = itertools.count()
        self._background: set[asyncio.Task] = set()
        self._dispatches: dict[int, Dispatch] = {}  # id(call) -> its generation in flight
        # Per waiting call: its static prompt start (from ``prepare``), the tokens prefilled
        # ahead for it so far, and whether a prefill ahead for it is under way.
        self._static_starts: weakref.WeakKeyDictionary[Call, list[int]] = weakref.WeakKeyDictionary()
        self._ahead: weakref.WeakKeyDictionary[Call, int] = weakref.WeakKeyDictionary()
        self._ahead_running: weakref.WeakSet[Call] = weakref.WeakSet()
        self._ahead_again: weakref.WeakSet[Call] = weakref.WeakSet()  # an input came meanwhile
        # The prefill ahead under way for a call: stopped when the call starts, so its own
        # request does not share steps with it (what it computed so far stays cached).
        self._ahead_sent: weakref.WeakKeyDictionary[Call, tuple[EngineHandle, list[int]]] = (
            weakref.WeakKeyDictionary())

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
                self._static_starts[call] = static_prefixes[call.id]
        for call in calls:
            self.maybe_launch(call)
        for call in calls:
            self.prefill_ahead_soon(call)

    def variable_settled(self, var: Variable) -> None:
        """A value or an error arrived: wake or fail the consumers."""
        for consumer in var.consumers:
            self.maybe_launch(consumer)
            self.prefill_ahead_soon(consumer)  # still waiting: its known start may have grown
        producer = var.producer
        if producer is not None and producer.kind == "native" and not producer.is_terminal:
            if var.error is not None:
                self._fail(producer, var.error)
            elif all(v.ready for v in producer.outputs):
                producer.state, producer.finished = "done", time.time()
                self._observe_end(producer)

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
        sent = self._ahead_sent.pop(call, None)
        if sent is not None:
            self.dispatcher.cancel_prefill(*sent)
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
        self._observe_end(call)
        self.dispatcher.scheduler.group_done(call.id)  # a consumer that never ran: forget its group
        for var in call.outputs:
            var.fail(reason)

    async def reprioritize(self, call: Call) -> None:
        dispatch = self._dispatches.get(id(call))
        if dispatch is not None:
            await dispatch.set_priority(call.priority, objective_of(call.criterion))  # type: ignore[arg-type]

    def reprioritize_soon(self, call: Call) -> None:
        self._in_background(self.reprioritize(call))

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # held until done, so it is not collected mid-flight
        task.add_done_callback(self._background.discard)

    # ---- prefill ahead (see the module doc) -----------------------------------------
    def prefill_ahead_soon(self, call: Call) -> None:
        """Prefill the known start of ``call``'s prompt if it still waits for inputs."""
        if self.prefill_ahead_min_tokens is None or call.kind != "llm" or call.state != "pending":
            return
        if call in self._ahead_running:
            self._ahead_again.add(call)  # look again once the one under way is done
            return
        self._ahead_running.add(call)
        self._in_background(self._prefill_ahead(call))

    async def _prefill_ahead(self, call: Call) -> None:
        try:
            while True:
                await self._prefill_known_start(call)
                if call not in self._ahead_again:
                    break
                self._ahead_again.discard(call)
        except Exception:  # noqa: BLE001 -- a hint: the call computes its prompt itself anyway
            logger.warning("prefill ahead for call %s failed", call.id, exc_info=True)
        finally:
            self._ahead_running.discard(call)
            self._ahead_again.discard(call)

    async def _prefill_known_start(self, call: Call) -> None:
        await asyncio.sleep(PREFILL_AHEAD_SETTLE_S)
        min_tokens = self.prefill_ahead_min_tokens
        tokenizer = self.dispatcher.tokenizer_now()
        if min_tokens is None or tokenizer is None or call.state != "pending":
            return
        start = await self._known_start(call, tokenizer)
        if len(start) < self._ahead.get(call, 0) + min_tokens or call.state != "pending":
            return  # too short, or too little beyond what was prefilled already
        handle = self.dispatcher.engine_for(start, objective_of(call.criterion), call.group)  # type: ignore[arg-type]
        if handle is None or not handle.engine.supports_prefix_control:
            return
        if handle.engine.load().num_latency:
            return  # it would take steps from latency work there; a later input tries again
        self._ahead[call] = len(start)
        await asyncio.shield(self.pins.pin(handle, start, [call]))  # until the call has run
        if call.state != "pending":
            return
        self._ahead_sent[call] = (handle, start)
        try:
            await self.dispatcher.prefill(handle, start)
        finally:
            if self._ahead_sent.get(call) == (handle, start):
                del self._ahead_sent[call]

    async def _known_start(self, call: Call, tokenizer: ModelTokenizer) -> list[int]:
        """The start of ``call``'s prompt known now: built as ``_generate`` builds it, up to the
        first input not set yet (a chat call: the static start of its rendering)."""
        if call.messages is not None:
            return self._static_starts.get(call, [])
        start = list(tokenizer.prompt_prefix_ids)
        for segment in call.segments:
            if isinstance(segment, TextSegment):
                start += await off_loop(len(segment.text), tokenizer.encode, segment.text)
            elif isinstance(segment, InputSegment) and _input(call, segment).ready:
                start += await _input_ids(tokenizer, call, segment)
            else:
                break
        return start

    def _observe_end(self, call: Call) -> None:
        if self.dispatcher.observer is not None:
            self.dispatcher.observer.call_ended(call)

    # ---- running a call ------------------------------------------------------------
    async def _run(self, call: Call) -> None:
        if self.dispatcher.observer is not None:  # its ids and trace span, for this task's lines
            self.dispatcher.observer.call_started(call)
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
            self._observe_end(call)
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
                context += await _input_ids(tokenizer, call, segment)
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
            self.pins.placed(where, prompt)
            if call.group is not None and not where.engine.computes_shared_prefix_once:
                # The group's shared start, computed once before it fans out (the members wait).
                await self.dispatcher.prefill(where, self.pins.shared_start(call, prompt),
                                              priority=call.priority)

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
                if call.first_token is None and out.token_ids:
                    call.first_token = time.time()
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
        self._observe_end(call)
        for var in call.outputs:
            if not var.ready:
                var.fail(f"call {call.name or call.id!r} failed: {error}")
                self.variable_settled(var)


def _input(call: Call, segment: InputSegment) -> Variable:
    return next(v for v in call.inputs if v.id == segment.var)


async def _input_ids(tokenizer: ModelTokenizer, call: Call, segment: InputSegment) -> list[int]:
    """The prompt tokens of an input's value: the ids its producer generated (their KV is
    cached) unless the value was reshaped, else the value encoded."""
    var = _input(call, segment)
    if var.token_ids is not None and segment.strip is None:
        return var.token_ids
    value = segment.apply(var.value or "")
    return await off_loop(len(value), tokenizer.encode, value)
