"""``batch`` / ``abatch`` of a Parrot chat model as one graph submission in one session.

LangChain runs a chat model's batch as one ``invoke`` per input, each with its own
config and callbacks (start, end, error, caching). ``ChatParrot.batch`` keeps that
and adds one step in front: it builds every input's call, submits them all in one
session (one ``POST /v1/graphs``), and then lets LangChain run the invokes. Each
invoke claims the call already submitted for exactly its request (same messages,
same sampling) and only waits for its reply. An invoke whose request was not
submitted up front (an input that failed to convert, a cache hit that never asks)
simply runs in its own session as usual, and calls nobody claims are cancelled when
the batch's session closes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import parrot as P
from parrot.integrations.common.calls import CallInfos
from parrot.sdk import PreparedCall

_active: ContextVar[SharedBatch | None] = ContextVar("parrot_langchain_batch", default=None)


def request_key(*parts: Any) -> str:
    """A request's identity: equal keys mean identical calls (messages, sampling, model)."""
    return json.dumps(parts, sort_keys=True, default=str)


@dataclass
class SharedBatch:
    owner: object  # the model whose batch submitted the calls
    vm: P.Parrot
    model_name: str
    infos: CallInfos = field(default_factory=CallInfos)
    _calls: dict[str, list[PreparedCall]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, call: PreparedCall) -> None:
        with self._lock:
            self._calls.setdefault(key, []).append(call)

    def take(self, key: str) -> PreparedCall | None:
        with self._lock:
            calls = self._calls.get(key)
            return calls.pop(0) if calls else None


@contextmanager
def sharing(owner: object, vm: P.Parrot, model_name: str,
            calls: Sequence[tuple[str, PreparedCall]]) -> Iterator[SharedBatch]:
    """Within this block (and the threads and tasks started in it), ``owner``'s invocations
    claim ``calls`` by request key."""
    batch = SharedBatch(owner, vm, model_name)
    for key, call in calls:
        batch.add(key, call)
    token = _active.set(batch)
    try:
        yield batch
    finally:
        _active.reset(token)


def claim(owner: object, key: str) -> tuple[SharedBatch, PreparedCall] | None:
    """The submitted call for this request of ``owner``'s, if a running batch has one left."""
    batch = _active.get()
    if batch is None or batch.owner is not owner:
        return None
    call = batch.take(key)
    return None if call is None else (batch, call)


def claiming(owner: object) -> bool:
    """Whether a batch of ``owner``'s is running here (its invocations claim their calls)."""
    batch = _active.get()
    return batch is not None and batch.owner is owner
