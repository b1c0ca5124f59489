"""``SemanticVariable``: a named hole in the app's graph, filled by a call or by the client.

A variable is a future. Its id is chosen here (a uuid4), so calls that produce and
consume it can be issued before the service has seen it. It is declared in a VM's
graph the first time it is used there (or at once, by ``vm.variable``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from parrot.errors import ParrotError
from parrot.schemas import Criterion

if TYPE_CHECKING:
    from parrot.vm import Parrot


class SemanticVariable:
    """A value the app's graph computes, or a constant, or a value the client sets later.

    - ``SemanticVariable("text")``: a constant; usable in any VM.
    - ``SemanticVariable()``: set later with ``var.set(...)``; calls that read it wait.
    - the variables a semantic or native function returns: produced by that call.
    """

    def __init__(self, value: object = None, *, name: str | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.name = name
        self.producer: str | None = None  # the id of the call that produces it
        self._value: str | None = None if value is None else str(value)
        self._is_constant = value is not None
        self._vm: Parrot | None = None  # its home VM: where it was first declared

    @property
    def value(self) -> str | None:
        """The value when this client already knows it (a constant, a set or fetched value)."""
        return self._value

    @property
    def is_constant(self) -> bool:
        return self._is_constant

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        state = f"={self._value!r}" if self._value is not None else ""
        return f"<SemanticVariable{label} {self.id}{state}>"

    # -- reading ---------------------------------------------------------------------------

    def get(self, perf: Criterion | str | None = Criterion.LATENCY, timeout: float | None = None) -> str:
        """Wait for the value and return it.

        ``perf`` is what you wait for (``P.LATENCY``, ``P.THROUGHPUT``, ``P.TTFT``); the
        service schedules every call this value depends on accordingly. Raises
        ``ParrotError`` when a call it depends on failed or the service refused the
        graph, ``ParrotTimeoutError`` when ``timeout`` (seconds) passes first.
        """
        vm = self._home("get")
        if vm is None:
            return self._value  # type: ignore[return-value]  # _home checked it is known
        vm.announce_fetch(self, _criterion(perf), wait=True)
        self._value = vm.run_sync(vm.fetch(self, _criterion(perf), timeout))
        return self._value

    async def aget(self, perf: Criterion | str | None = Criterion.LATENCY,
                   timeout: float | None = None) -> str:
        """``get`` for async code; works from any event loop."""
        vm = self._home("aget")
        if vm is None:
            return self._value  # type: ignore[return-value]
        vm.announce_fetch(self, _criterion(perf), wait=True)
        self._value = await vm.run_async(vm.fetch(self, _criterion(perf), timeout))
        return self._value

    def will_get(self, perf: Criterion | str | None = Criterion.LATENCY) -> None:
        """Say that ``get(perf)`` will follow, before it does: the graph post that sends this
        value's call then brings the value back, so an app that gets several values one after
        another makes no request per value. Does nothing once that post has gone."""
        if self._vm is not None and perf is not None:
            self._vm.announce_fetch(self, _criterion(perf), wait=True)

    def stream(self, perf: Criterion | str | None = Criterion.TTFT) -> Iterator[str]:
        """Yield the value's text as it is generated; the deltas join to ``get()``'s value."""
        vm = self._home("stream")
        if vm is None:
            yield self._value  # type: ignore[misc]
            return
        vm.announce_fetch(self, _criterion(perf))
        yield from vm.iterate_sync(vm.stream_deltas(self, _criterion(perf)))

    async def astream(self, perf: Criterion | str | None = Criterion.TTFT) -> AsyncIterator[str]:
        """``stream`` for async code: ``async for delta in var.astream(): ...``."""
        vm = self._home("astream")
        if vm is None:
            yield self._value  # type: ignore[misc]
            return
        vm.announce_fetch(self, _criterion(perf))
        async for delta in vm.iterate_async(vm.stream_deltas(self, _criterion(perf))):
            yield delta

    # -- writing ---------------------------------------------------------------------------

    def set(self, value: object = None, *, error: str | None = None) -> None:
        """Give a client-owned variable its value (or an ``error`` that fails its consumers).

        Before the variable is used anywhere this only stores the value, which makes it a
        constant. Variables produced by calls, and constants, cannot be set.
        """
        self._check_settable(value, error)
        if self._vm is None:
            if error is not None:
                raise ParrotError("an error can only be set on a variable a VM already uses")
            self._value, self._is_constant = str(value), True
            return
        self._vm.run_sync(self._vm.set_value(self, None if value is None else str(value), error))
        if value is not None:
            self._value = str(value)

    async def aset(self, value: object = None, *, error: str | None = None) -> None:
        """``set`` for async code."""
        self._check_settable(value, error)
        if self._vm is None:
            self.set(value, error=error)
            return
        await self._vm.run_async(self._vm.set_value(self, None if value is None else str(value), error))
        if value is not None:
            self._value = str(value)

    # -- helpers ---------------------------------------------------------------------------

    def _check_settable(self, value: object, error: str | None) -> None:
        if (value is None) == (error is None):
            raise ValueError("set exactly one of value and error")
        if self.producer is not None:
            raise ParrotError(f"variable {self.name or self.id} is produced by call {self.producer}; "
                              "only variables without a producer can be set")
        if self._is_constant or self._value is not None:
            raise ParrotError(f"variable {self.name or self.id} already has a value")

    def _home(self, what: str) -> Parrot | None:
        """The VM to ask, or None when the value is known and no VM has seen the variable."""
        if self._vm is not None:
            return self._vm
        if self._value is not None:
            return None
        raise ParrotError(f"cannot {what} variable {self.name or self.id}: it has no value and no "
                          "Parrot VM has seen it yet (pass it to a call inside `with P.Parrot(...)`)")


def _criterion(perf: Criterion | str | None) -> Criterion | None:
    return None if perf is None else Criterion(perf)
