"""Submit semantic calls in a Parrot session and wait for what they produce.

Every model invocation of ``ChatParrot`` and ``ParrotLLM`` goes through here: the
model builds its calls (``prepare_chat`` for chat messages, ``prepare_completion``
for plain prompts), ``submit`` queues them in the session's graph (calls queued
together reach the service as one graph submission), and ``wait`` / ``await_all`` /
``stream`` / ``astream`` fetch the replies together with their token counts.

The prompts may hold ``SemanticVariable``s produced by other calls of the same
session, so a caller that compiles a whole chain can submit every call at once and
wait only for the ones whose values it needs.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import parrot as P
from parrot.errors import ParrotError
from parrot.schemas import (
    CallDecl,
    CallInfo,
    Criterion,
    GraphInfo,
    InputSegment,
    OutputSegment,
    SamplingConfig,
    Segment,
    TextSegment,
)
from parrot.sdk import PreparedCall
from parrot.variable import SemanticVariable

Part = str | SemanticVariable
_TERMINAL = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class CallOutcome:
    """One call's reply, with the token counts the service reports for it."""

    text: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    finish_reason: str | None  # "stop" or "length"


def prepare_completion(prompt: str | Sequence[Part], sampling: SamplingConfig, *,
                       name: str = "completion") -> PreparedCall:
    """A template call: the prompt's text (and variables), then one generated output."""
    parts = [prompt] if isinstance(prompt, str) else list(prompt)
    segments: list[Segment] = []
    inputs: list[SemanticVariable] = []
    for part in parts:
        if isinstance(part, SemanticVariable):
            if part not in inputs:
                inputs.append(part)
            segments.append(InputSegment(var=part.id))
        elif part:
            segments.append(TextSegment(text=part))
    reply = SemanticVariable(name=name)
    segments.append(OutputSegment(var=reply.id, sampling=sampling))
    return PreparedCall(CallDecl(id=uuid.uuid4().hex, name=name, segments=segments), inputs, [reply])


def submit(vm: P.Parrot, calls: Sequence[PreparedCall], *, fetch: Criterion | None = None) -> None:
    """Queue ``calls`` in ``vm``'s graph; calls queued together are posted as one graph.
    ``fetch``: their replies will be got with this criterion, so the post brings them back."""
    for call in calls:
        vm.submit(call.decl, call.inputs, call.outputs)
    if fetch is not None:
        announce(calls, fetch)


def announce(calls: Sequence[PreparedCall], perf: Criterion) -> None:
    """Say that the calls' replies will be got with ``perf``, all before the first get: the post
    that sends the calls then brings every reply back."""
    for call in calls:
        call.outputs[-1].will_get(perf)


class CallInfos:
    """The service's info on a session's calls: what came with their values, else fetched as
    one graph and refreshed only when a call that has its value is not complete in the last
    copy (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._infos: dict[str, CallInfo] = {}

    def get(self, vm: P.Parrot, call_id: str) -> CallInfo:
        info = self._known(vm, call_id)
        return info if info is not None else self._update(vm.graph(), call_id)

    async def aget(self, vm: P.Parrot, call_id: str) -> CallInfo:
        info = self._known(vm, call_id)
        return info if info is not None else self._update(await vm.agraph(), call_id)

    def _known(self, vm: P.Parrot, call_id: str) -> CallInfo | None:
        with self._lock:
            info = self._infos.get(call_id)
        # The service sets a call's counts before its output, so a complete info never changes.
        for candidate in (info, vm.delivered_call(call_id)):
            if candidate is not None and (candidate.finish_reason is not None
                                          or candidate.state in _TERMINAL):
                return candidate
        return None

    def _update(self, graph: GraphInfo, call_id: str) -> CallInfo:
        with self._lock:
            self._infos.update({c.id: c for c in graph.calls})
            info = self._infos.get(call_id)
        if info is None:
            raise ParrotError(f"the service does not know call {call_id} of session {graph.session_id}")
        return info


def outcome(text: str, info: CallInfo) -> CallOutcome:
    return CallOutcome(text=text, prompt_tokens=info.prompt_tokens, output_tokens=info.output_tokens,
                       cached_tokens=info.cached_tokens, finish_reason=info.finish_reason)


def wait(vm: P.Parrot, calls: Sequence[PreparedCall], *, perf: Criterion, timeout: float | None = None,
         infos: CallInfos | None = None) -> list[CallOutcome | ParrotError]:
    """Each call's outcome (its last output's value), or the ``ParrotError`` it failed with.

    ``timeout`` bounds the whole wait; a call still running then gets a ``ParrotTimeoutError``.
    """
    infos = infos or CallInfos()
    deadline = None if timeout is None else time.monotonic() + timeout
    announce(calls, perf)
    results: list[CallOutcome | ParrotError] = []
    for call in calls:
        try:
            text = call.outputs[-1].get(perf=perf, timeout=_left(deadline))
            results.append(outcome(text, infos.get(vm, call.decl.id)))
        except ParrotError as exc:
            results.append(exc)
    return results


async def await_all(vm: P.Parrot, calls: Sequence[PreparedCall], *, perf: Criterion,
                    timeout: float | None = None,
                    infos: CallInfos | None = None) -> list[CallOutcome | ParrotError]:
    """``wait`` for async code: the calls are awaited together."""
    infos = infos or CallInfos()
    announce(calls, perf)

    async def one(call: PreparedCall) -> CallOutcome | ParrotError:
        try:
            text = await call.outputs[-1].aget(perf=perf, timeout=timeout)
            return outcome(text, await infos.aget(vm, call.decl.id))
        except ParrotError as exc:
            return exc

    return list(await asyncio.gather(*(one(c) for c in calls)))


def stream(vm: P.Parrot, call: PreparedCall, *, perf: Criterion = P.TTFT,
           infos: CallInfos | None = None) -> Iterator[str | CallOutcome]:
    """The reply's text deltas as they are generated, then its ``CallOutcome``."""
    parts = []
    for delta in call.outputs[-1].stream(perf=perf):
        parts.append(delta)
        yield delta
    yield outcome("".join(parts), (infos or CallInfos()).get(vm, call.decl.id))


async def astream(vm: P.Parrot, call: PreparedCall, *, perf: Criterion = P.TTFT,
                  infos: CallInfos | None = None) -> AsyncIterator[str | CallOutcome]:
    """``stream`` for async code."""
    parts = []
    async for delta in call.outputs[-1].astream(perf=perf):
        parts.append(delta)
        yield delta
    yield outcome("".join(parts), await (infos or CallInfos()).aget(vm, call.decl.id))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
