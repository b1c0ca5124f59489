"""``Parrot``: the client VM. It owns a session, sends the app's graph, and runs native calls.

    user thread                              client loop thread (parrot.loop_thread)
    write_code(task) ─► submit(): append to ─► sender (parrot.batcher): wait a short window,
                        the open batch            then POST /v1/graphs with all pending,
                        (returns at once)         one batch at a time, in issue order
    code.get()       ─► run_sync(fetch()) ───► wait until code's batch was posted, then
                                               long-poll GET .../variables/{id}?criterion=
    native f(x)      ─► submit() + start ────► wait for x; run f (thread or await);
                                               POST .../variables/{out} {value | error}

Calls issued close together go out as one graph; since batches are posted strictly in
order, a later batch may use the variables of an earlier one. The VM is "current"
inside ``with`` / ``async with`` (a context variable), which is how semantic
functions find it.

All VMs of a process share one loop thread and one connection pool per service
(``shared_loop``, ``shared_clients``): a session costs its own HTTP requests and nothing
more, which matters to integrations that open one per framework invocation. Closing a
VM cancels only its own work there. So an async native function must not block: it
runs on the loop every VM of the process uses.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextvars import ContextVar, Token
from typing import Any, TypeVar

from parrot.batcher import GraphBatcher
from parrot.client import ServiceClient, shared_clients
from parrot.errors import ParrotError
from parrot.loop_thread import LoopLease, LoopStoppedError, shared_loop
from parrot.schemas import CallDecl, Criterion, FetchDecl, GraphInfo, GraphSubmit, VariableDecl
from parrot.variable import SemanticVariable

T = TypeVar("T")
logger = logging.getLogger(__name__)

_current_vm: ContextVar[Parrot | None] = ContextVar("parrot_current_vm", default=None)


def current_vm() -> Parrot:
    """The VM of the innermost ``with P.Parrot(...)`` / ``async with`` block."""
    vm = _current_vm.get()
    if vm is None:
        raise RuntimeError("Parrot functions must be called inside a VM: "
                           "`with P.Parrot(...) as vm:` (or `async with`)")
    return vm


class Parrot:
    """A session with a Parrot service, in which semantic and native functions run.

    ``base_url``: the service (``http://host:port``); ``None`` starts the service inside
    this process (embedded mode, one server per process, reused by every VM).
    ``model``: in embedded mode, the model the embedded service loads (``None``: the
    default model); against a URL, the service must serve it (checked on enter).
    ``timeout``: seconds for each HTTP request (a ``get`` waits as long as its own
    ``timeout`` says). ``batch_window_s``: how long the sender waits for more calls
    before it posts a graph (a ``get`` posts at once).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 timeout: float = 60.0, *, session_idle_timeout_s: float | None = None,
                 batch_window_s: float = 0.005) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self._model = model
        self._timeout = timeout
        self._session_idle_timeout_s = session_idle_timeout_s
        self._batch_window_s = batch_window_s
        self._state = "new"  # -> "opening" -> "open" -> "closed"
        self._lock = threading.Lock()  # makes declaring variables and queueing calls atomic
        self._loop: LoopLease | None = None  # this VM's share of the process's client loop
        self._client: ServiceClient | None = None
        self._batcher: GraphBatcher | None = None
        self._session_id: str | None = None
        self._tasks: set[asyncio.Task] = set()  # sender and native calls, on the loop
        self._tokens: list[Token] = []

    @property
    def base_url(self) -> str | None:
        return self._client.base_url if self._client is not None else self._base_url

    @property
    def session_id(self) -> str:
        if self._session_id is None:
            raise ParrotError("the Parrot VM has no session: use it in `with P.Parrot(...) as vm:`")
        return self._session_id

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def __repr__(self) -> str:
        return f"<Parrot {self.base_url or 'embedded'} session={self._session_id} {self._state}>"

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Parrot:
        self._open()
        self._tokens.append(_current_vm.set(self))
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._close()
        finally:
            _current_vm.reset(self._tokens.pop())

    async def __aenter__(self) -> Parrot:
        await asyncio.to_thread(self._open)
        self._tokens.append(_current_vm.set(self))  # in the caller's task, not in to_thread's copy
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await asyncio.to_thread(self._close)
        finally:
            _current_vm.reset(self._tokens.pop())

    def _open(self) -> None:
        with self._lock:
            if self._state != "new":
                raise ParrotError("a Parrot VM can be entered only once; create a new one")
            self._state = "opening"
        try:
            base_url = self._base_url
            if base_url is None:
                from parrot.embedded import embedded_url  # the one door into the service

                base_url = embedded_url(self._model)
            self._loop = shared_loop().lease()
            self._loop.run_sync(self._aopen(base_url))
        except BaseException:
            if self._loop is not None:
                self._loop.stop()
            self._state = "closed"
            raise
        self._state = "open"

    async def _aopen(self, base_url: str) -> None:
        self._client = await shared_clients().acquire(base_url, api_key=self._api_key, timeout=self._timeout)
        try:
            if self._model is not None and self._base_url is not None:
                models = await self._client.list_models()
                if self._model not in models:
                    raise ParrotError(f"the service at {base_url} does not serve model {self._model!r} "
                                      f"(it serves {', '.join(models) or 'none'})")
            session = await self._client.create_session(self._session_idle_timeout_s)
        except BaseException:
            await shared_clients().release(self._client)
            raise
        self._session_id = session.id
        assert self._loop is not None
        self._batcher = GraphBatcher(self._batch_window_s, self._loop.call_soon)
        self._spawn(self._batcher.run(self._post))

    async def _post(self, variables: list[VariableDecl], calls: list[CallDecl],
                    fetches: list[FetchDecl]) -> None:
        assert self._client is not None
        await self._client.submit_graph(GraphSubmit(session_id=self.session_id, variables=variables,
                                                    calls=calls, fetches=fetches))

    def _close(self) -> None:
        with self._lock:
            if self._state != "open":
                return
            self._state = "closed"
        assert self._loop is not None and self._batcher is not None
        self._batcher.fail_pending(ParrotError("the VM closed before these calls were sent"))
        try:
            self._loop.run_sync(self._aclose())
        finally:
            self._loop.stop()

    async def _aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert self._client is not None
        try:
            await self._client.delete_session(self.session_id)  # cancels what still runs there
        except ParrotError as exc:
            logger.warning("could not delete Parrot session %s: %s", self._session_id, exc)
        finally:
            await shared_clients().release(self._client)

    # -- the graph -------------------------------------------------------------------------

    def variable(self, value: object = None, name: str | None = None) -> SemanticVariable:
        """A new variable of this VM, declared in its graph at once.

        With a ``value`` it is a constant; without one, set it later with ``var.set(...)``.
        """
        var = SemanticVariable(value, name=name)
        self.submit(None, [var], [])
        return var

    def submit(self, call: CallDecl | None, inputs: list[SemanticVariable],
               outputs: list[SemanticVariable]) -> None:
        """Queue ``call`` for the next posted graph, with the first use of each input.

        ``outputs`` become this VM's variables, produced by ``call``; they are declared
        (with their names) next to it.
        """
        with self._lock:
            self._check_open()
            assert self._batcher is not None
            for var in inputs:
                if var._vm is not None and var._vm is not self and not var.is_constant:
                    raise ParrotError(f"variable {var.name or var.id} belongs to another Parrot VM "
                                      "(session); only constants can be shared between VMs")
            for var in outputs:
                if var.producer is not None or var._vm is not None or var.is_constant:
                    raise ParrotError(f"variable {var.name or var.id} cannot be the output of a new call")
            decls = [VariableDecl(id=v.id, name=v.name, value=v.value) for v in inputs
                     if not self._batcher.is_declared(v.id)]
            decls += [VariableDecl(id=v.id, name=v.name) for v in outputs]
            for var in inputs:
                if var._vm is None:
                    var._vm = self
            for var in outputs:
                var.producer, var._vm = call.id if call else None, self
            self._batcher.add(decls, [call] if call else [])

    def graph(self) -> GraphInfo:
        """The service's view of this session's graph: calls, variables, edges, states."""
        return self.run_sync(self.agraph())

    async def agraph(self) -> GraphInfo:
        """``graph`` for async code (posts everything issued so far first)."""
        return await self.run_async(self._graph())

    async def _graph(self) -> GraphInfo:
        assert self._batcher is not None and self._client is not None
        await self._batcher.flush()
        return await self._client.get_graph(self.session_id)

    def _check_open(self) -> None:
        if self._state != "open":
            raise ParrotError("this Parrot VM is closed" if self._state == "closed"
                              else "this Parrot VM is not open: use `with P.Parrot(...) as vm:`")

    async def _wait_posted(self, var: SemanticVariable, timeout: float | None) -> None:
        assert self._batcher is not None
        await self._batcher.wait_posted(var.id, timeout)

    def announce_fetch(self, var: SemanticVariable, criterion: Criterion | None) -> None:
        """Called in the app's thread as a fetch begins, before the sender may take the batch."""
        if criterion is not None and self._batcher is not None:
            self._batcher.announce(var.id, criterion)

    # -- for SemanticVariable: coroutines that run on the VM loop -----------------------------

    async def fetch(self, var: SemanticVariable, criterion: Criterion | None,
                    timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._wait_posted(var, timeout)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        assert self._client is not None
        return await self._client.wait_variable(self.session_id, var.id, criterion=criterion, timeout=left)

    async def stream_deltas(self, var: SemanticVariable,
                            criterion: Criterion | None) -> AsyncIterator[str]:
        await self._wait_posted(var, None)
        assert self._client is not None
        async for delta in self._client.stream_variable(self.session_id, var.id, criterion=criterion):
            yield delta

    async def set_value(self, var: SemanticVariable, value: str | None, error: str | None) -> None:
        await self._wait_posted(var, None)
        assert self._client is not None
        await self._client.set_variable(self.session_id, var.id, value=value, error=error)

    # -- native calls ------------------------------------------------------------------------

    def start_native(self, name: str, run: Callable[[list[Any], dict[str, Any]], Any],
                     args: list[Any], kwargs: dict[str, Any], output: SemanticVariable) -> None:
        """Run a native call here once its variable arguments are ready; set ``output``.

        ``run(args, kwargs)`` gets the arguments with each variable replaced by its value,
        and returns the result or an awaitable of it.
        """
        assert self._loop is not None
        self._loop.call_soon(self._spawn, self._run_native(name, run, args, kwargs, output))

    async def _run_native(self, name: str, run: Callable[[list[Any], dict[str, Any]], Any],
                          args: list[Any], kwargs: dict[str, Any], output: SemanticVariable) -> None:
        assert self._client is not None
        try:
            await self._wait_posted(output, None)
            values = await self._resolve([*args, *kwargs.values()])
        except ParrotError as exc:
            await self._set_quietly(output, error=f"an input of native function {name} failed: {exc}")
            return
        args = [values.get(id(a), a) for a in args]
        kwargs = {k: values.get(id(v), v) for k, v in kwargs.items()}
        try:
            result = run(args, kwargs)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as exc:
            await self._set_quietly(output, error=f"native function {name} raised "
                                                  f"{type(exc).__name__}: {exc}")
        else:
            await self._set_quietly(output, value=str(result))

    async def _resolve(self, items: list[Any]) -> dict[int, str]:
        """The values of the variables among ``items``, keyed by ``id(variable)``."""
        assert self._client is not None
        variables = {id(v): v for v in items if isinstance(v, SemanticVariable)}
        values = await asyncio.gather(*(
            self._client.wait_variable(self.session_id, v.id, criterion=None, timeout=None)
            for v in variables.values()
        ))
        for var, value in zip(variables.values(), values, strict=True):
            var._value = value
        return dict(zip(variables, values, strict=True))

    async def _set_quietly(self, var: SemanticVariable, *, value: str | None = None,
                           error: str | None = None) -> None:
        """Set a native call's output; a refusal (e.g. the session already failed it) is logged."""
        assert self._client is not None
        try:
            await self._client.set_variable(self.session_id, var.id, value=value, error=error)
        except ParrotError as exc:
            logger.info("could not set the output %s of a native call: %s", var.id, exc)
        else:
            if value is not None:
                var._value = value

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Start a background task on the VM loop; closing the VM cancels it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- bridges for the SDK's sync and async APIs -------------------------------------------

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        self._check_running(coro)
        assert self._loop is not None
        try:
            return self._loop.run_sync(coro)
        except LoopStoppedError:
            raise ParrotError("this Parrot VM is closed") from None

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        self._check_running(coro)
        assert self._loop is not None
        try:
            return await self._loop.run_async(coro)
        except LoopStoppedError:
            raise ParrotError("this Parrot VM is closed") from None

    def iterate_sync(self, items: AsyncIterator[T]) -> Iterator[T]:
        self._check_running(None)
        assert self._loop is not None
        try:
            yield from self._loop.iterate_sync(items)
        except LoopStoppedError:
            raise ParrotError("this Parrot VM is closed") from None

    async def iterate_async(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        self._check_running(None)
        assert self._loop is not None
        try:
            async for item in self._loop.iterate_async(items):
                yield item
        except LoopStoppedError:
            raise ParrotError("this Parrot VM is closed") from None

    def _check_running(self, coro: Coroutine | None) -> None:
        if self._state != "open":
            if coro is not None:
                coro.close()
            self._check_open()

