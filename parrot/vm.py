"""``Parrot``: the client VM. It owns a session, sends the app's graph, and runs native calls.

    user thread                              client loop thread (parrot.loop_thread)
    write_code(task) ─► submit(): append to ─► sender (parrot.batcher): wait a short window,
                        the open batch            then POST /v1/graphs with all pending,
                        (returns at once)         one batch at a time, in issue order
    code.get()       ─► run_sync(fetch()) ───► wait until code's batch was posted; its
                                               value comes in that post's streamed answer
                                               (or a long-poll GET .../variables/{id})
    native f(x)      ─► submit() + start ────► wait for x; run f (thread or await);
                                               POST .../variables/{out} {value | error}

Calls issued close together go out as one graph; since batches are posted strictly in
order, a later batch may use the variables of an earlier one. Each HTTP request costs a
network round trip, so the VM spends as few as it can: the session (its id chosen here)
is opened by the first graph posted, and a ``get`` issued before its variable's batch went
out asks that post to stream the value back when it is set, with no poll after it. An app
that submits its calls and gets the result makes one request. The VM is "current"
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
import atexit
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextvars import ContextVar, Token
from typing import Any, TypeVar

from parrot.batcher import GraphBatcher
from parrot.client import ServiceClient, shared_clients, value_of
from parrot.errors import ParrotError, ParrotTimeoutError
from parrot.loop_thread import LoopLease, LoopStoppedError, shared_loop
from parrot.schemas import (
    CallDecl,
    CallInfo,
    Criterion,
    FetchDecl,
    GraphAccepted,
    GraphInfo,
    GraphSubmit,
    SessionCreate,
    VariableDecl,
    VariableInfo,
)
from parrot.variable import SemanticVariable

T = TypeVar("T")
logger = logging.getLogger(__name__)

_current_vm: ContextVar[Parrot | None] = ContextVar("parrot_current_vm", default=None)

# Session deletes still under way for VMs closed in the background: the process waits up to
# EXIT_WAIT_S for them at exit, so the service does not keep those sessions until they expire.
_deleting: set[concurrent.futures.Future[None]] = set()
EXIT_WAIT_S = 5.0


@atexit.register
def _finish_deletes() -> None:
    concurrent.futures.wait(list(_deleting), timeout=EXIT_WAIT_S)


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
    ``timeout`` says). ``max_retries``: tries more for a request whose connection could
    not be made, with backoff (as OpenAI's client does). ``batch_window_s``: how long the
    sender waits for more calls before it posts a graph (a ``get`` posts at once).
    ``close_in_background``: leaving the VM does not wait for the service to delete the
    session (the request still goes, and the process waits for it at exit), for callers
    that have their results and would otherwise pay that round trip each time.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 timeout: float = 60.0, *, max_retries: int = 2, session_idle_timeout_s: float | None = None,
                 batch_window_s: float = 0.005, close_in_background: bool = False) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self._model = model
        self._timeout = timeout
        self._max_retries = max_retries
        self._close_in_background = close_in_background
        self._session_idle_timeout_s = session_idle_timeout_s
        self._batch_window_s = batch_window_s
        self._state = "new"  # -> "opening" -> "open" -> "closed"
        self._lock = threading.Lock()  # makes declaring variables and queueing calls atomic
        self._loop: LoopLease | None = None  # this VM's share of the process's client loop
        self._client: ServiceClient | None = None
        self._batcher: GraphBatcher | None = None
        self._session_id: str | None = None
        self._session_opened = False  # a post that opened it was accepted
        self._session_open_sent = False  # a post that may have opened it went out
        # Per variable fetched through a streamed post: its info once the post's answer
        # carried it, or None if the answer ended without it (then it is polled).
        self._deliveries: dict[str, asyncio.Future[VariableInfo | None]] = {}
        self._delivered_calls: dict[str, CallInfo] = {}  # the producers of delivered values
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
        self._client = await shared_clients().acquire(base_url, api_key=self._api_key, timeout=self._timeout,
                                                      max_retries=self._max_retries)
        try:
            if self._model is not None and self._base_url is not None:
                models = await self._client.list_models()
                if self._model not in models:
                    raise ParrotError(f"the service at {base_url} does not serve model {self._model!r} "
                                      f"(it serves {', '.join(models) or 'none'})")
        except BaseException:
            await shared_clients().release(self._client)
            raise
        self._session_id = uuid.uuid4().hex  # the first post opens it
        assert self._loop is not None
        self._batcher = GraphBatcher(self._batch_window_s, self._loop.call_soon)
        self._spawn(self._batcher.run(self._post))

    async def _post(self, variables: list[VariableDecl], calls: list[CallDecl],
                    fetches: list[FetchDecl]) -> None:
        """Post one batch (opening the session with the first); return once it was accepted.
        A batch with waited fetches is answered as a stream that a task goes on reading."""
        assert self._client is not None
        opening = None if self._session_opened else SessionCreate(idle_timeout_s=self._session_idle_timeout_s)
        graph = GraphSubmit(session_id=self.session_id, variables=variables, calls=calls, fetches=fetches,
                            open_session=opening, stream=any(f.wait for f in fetches))
        self._session_open_sent |= opening is not None
        if graph.stream:
            loop = asyncio.get_running_loop()
            accepted: asyncio.Future[None] = loop.create_future()
            waits = {f.var: self._deliveries.setdefault(f.var, loop.create_future())
                     for f in fetches if f.wait}
            self._spawn(self._read_answer(graph, accepted, waits))
            await accepted
        else:
            await self._client.submit_graph(graph)
        self._session_opened = True

    async def _read_answer(self, graph: GraphSubmit, accepted: asyncio.Future[None],
                           waits: dict[str, asyncio.Future[VariableInfo | None]]) -> None:
        """Read a streamed post's answer: accepted, then the waited variables as they settle."""
        assert self._client is not None
        try:
            async for item in self._client.stream_graph(graph):
                if isinstance(item, GraphAccepted):
                    if not accepted.done():
                        accepted.set_result(None)
                elif isinstance(item, CallInfo):
                    self._delivered_calls[item.id] = item  # it comes before its value
                elif item.id in waits and not waits[item.id].done():
                    waits[item.id].set_result(item)
        except ParrotError as exc:
            if not accepted.done():
                accepted.set_exception(exc)
            elif exc.status_code is None:  # the rest is polled; a lost connection shows there too
                logger.info("the answer to a graph post of session %s broke off: %s", self._session_id, exc)
        finally:
            if not accepted.done():
                accepted.set_exception(ParrotError("the service ended its answer to the graph post early"))
            for fut in waits.values():
                if not fut.done():
                    fut.set_result(None)

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
        if self._close_in_background:
            deleting = shared_loop().submit(self._delete_session())  # not this VM's: it outlives the lease
            _deleting.add(deleting)
            deleting.add_done_callback(_deleting.discard)
        else:
            await self._delete_session()

    async def _delete_session(self) -> None:
        assert self._client is not None
        try:
            if self._session_open_sent:
                await self._client.delete_session(self.session_id)  # cancels what still runs there
        except ParrotError as exc:
            if self._session_opened or exc.status_code != 404:  # else: the opening post was refused
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
        if not self._session_opened:
            self._batcher.add([], [])  # nothing posted yet: an empty graph opens the session
        await self._batcher.flush()
        return await self._client.get_graph(self.session_id)

    def delivered_call(self, call_id: str) -> CallInfo | None:
        """The service's info on call ``call_id`` as it was when a value it produced came with
        a streamed post's answer (token counts and finish reason included); None if none did."""
        return self._delivered_calls.get(call_id)

    def _check_open(self) -> None:
        if self._state != "open":
            raise ParrotError("this Parrot VM is closed" if self._state == "closed"
                              else "this Parrot VM is not open: use `with P.Parrot(...) as vm:`")

    async def _wait_posted(self, var: SemanticVariable, timeout: float | None) -> None:
        assert self._batcher is not None
        await self._batcher.wait_posted(var.id, timeout)

    def announce_fetch(self, var: SemanticVariable, criterion: Criterion | None, *,
                       wait: bool = False) -> None:
        """Called in the app's thread as a fetch begins, before the sender may take the batch;
        ``wait``: the fetch waits for the whole value (``fetch``), which the post can bring."""
        if criterion is not None and self._batcher is not None:
            self._batcher.announce(var.id, criterion, wait=wait)

    # -- for SemanticVariable: coroutines that run on the VM loop -----------------------------

    async def fetch(self, var: SemanticVariable, criterion: Criterion | None,
                    timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._wait_posted(var, timeout)
        delivery = self._deliveries.get(var.id)
        if delivery is not None:  # its post's answer brings it (never cancelled here: shared)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({delivery}, timeout=left)
            if not done:
                raise ParrotTimeoutError(f"variable {var.id} was not ready within {timeout} s")
            info = delivery.result()
            if info is not None:
                return value_of(info)
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

