"""A session's graph: semantic variables and the calls that produce and consume them.

Submissions are validated whole before anything is added, so a rejected graph
leaves the session as it was. Every check here maps to a 4xx for the client.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

from parrot import limits
from parrot.schemas import (
    CallDecl,
    Criterion,
    GraphSubmit,
    InputSegment,
    MessageDecl,
    OutputSegment,
    Segment,
)
from parrot.service.errors import BadRequestError, ConflictError, NotFoundError
from parrot.service.tenancy import Tenant

CallState = Literal["pending", "running", "done", "failed", "cancelled"]


@dataclass(eq=False)
class Variable:
    id: str
    name: str | None = None
    value: str | None = None
    token_ids: list[int] | None = None  # as generated, so consumers' prompts reuse the KV
    error: str | None = None
    producer: Call | None = None
    consumers: list[Call] = field(default_factory=list)
    partial: str = ""  # text generated so far, for stream subscribers that join late
    subscribers: list[asyncio.Queue] = field(default_factory=list)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # a value or an error

    @property
    def ready(self) -> bool:
        return self.value is not None

    def push(self, delta: str) -> None:
        self.partial += delta
        for queue in self.subscribers:
            queue.put_nowait(("delta", delta))

    def set(self, value: str, token_ids: list[int] | None = None) -> None:
        self.value, self.token_ids = value, token_ids
        self._settle(("done", value))

    def fail(self, error: str) -> None:
        if not self.settled.is_set():
            self.error = error
            self._settle(("error", error))

    def _settle(self, event: tuple[str, str]) -> None:
        self.settled.set()
        for queue in self.subscribers:
            queue.put_nowait(event)


@dataclass(eq=False)
class Call:
    id: str
    name: str | None
    kind: Literal["llm", "native"]
    segments: list[Segment]
    inputs: list[Variable]
    outputs: list[Variable]
    state: CallState = "pending"
    criterion: Criterion | None = None
    priority: int = 0
    group: str | None = None  # the consumer this call feeds together with its siblings
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    first_token: float | None = None  # when its first output token arrived
    finished: float | None = None
    task: asyncio.Task | None = None
    request_id: str | None = None  # the engine request in flight, if any
    engine_id: str | None = None  # the engine the call runs (or ran) on
    objective: str | None = None  # what its engine request in flight runs as
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0  # generated over all its outputs, stop tokens included (as OpenAI counts)
    finish_reason: Literal["stop", "length"] | None = None  # of its last output
    messages: list[MessageDecl] | None = None  # a chat call's prompt, instead of segments
    reply: OutputSegment | None = None  # a chat call's one output
    tenant: Tenant | None = None  # its session's owner: limits and token accounting

    @property
    def generations(self) -> list[OutputSegment]:
        """The outputs this call generates, in order, with their sampling."""
        if self.reply is not None:
            return [self.reply]
        return [s for s in self.segments if isinstance(s, OutputSegment)]

    @property
    def producers(self) -> list[Call]:
        return [v.producer for v in self.inputs if v.producer is not None]

    @property
    def consumers(self) -> list[Call]:
        return [c for v in self.outputs for c in v.consumers]

    @property
    def is_terminal(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


def call_variable_ids(decl: CallDecl) -> tuple[list[str], list[str]]:
    """(input ids, output ids) of a declared call, in template order."""
    if decl.kind == "native":
        return list(decl.inputs), list(decl.outputs)
    if decl.messages is not None and decl.output is not None:
        inputs = [s.var for m in decl.messages for s in m.content if isinstance(s, InputSegment)]
        return inputs, [decl.output.var]
    inputs = [s.var for s in decl.segments if isinstance(s, InputSegment)]
    outputs = [s.var for s in decl.segments if isinstance(s, OutputSegment)]
    return inputs, outputs


class SessionGraph:
    def __init__(self) -> None:
        self.variables: dict[str, Variable] = {}
        self.calls: dict[str, Call] = {}

    def variable(self, var_id: str) -> Variable:
        var = self.variables.get(var_id)
        if var is None:
            raise NotFoundError(f"variable {var_id!r} not found in this session", param="var")
        return var

    def add_variable(self, var_id: str, name: str | None, value: str | None) -> Variable:
        if var_id in self.variables:
            raise ConflictError(f"variable {var_id!r} already exists in this session")
        self._check_size(0, 1)
        var = Variable(var_id, name)
        if value is not None:
            var.set(value)
        self.variables[var_id] = var
        return var

    def _check_size(self, new_calls: int, new_variables: int) -> None:
        # Per submission the schemas cap a graph; this caps what submissions add up to.
        if len(self.calls) + new_calls > limits.MAX_CALLS_PER_SESSION:
            raise BadRequestError(f"a session holds at most {limits.MAX_CALLS_PER_SESSION} calls",
                                  param="calls")
        if len(self.variables) + new_variables > limits.MAX_VARIABLES_PER_SESSION:
            raise BadRequestError(f"a session holds at most {limits.MAX_VARIABLES_PER_SESSION} "
                                  "variables", param="variables")

    def add(self, graph: GraphSubmit) -> list[Call]:
        """Validate and add a submitted graph; return its new calls in submission order."""
        self._check_size(len(graph.calls), len(graph.variables))
        new_vars = {d.id: d for d in graph.variables}
        if len(new_vars) != len(graph.variables):
            raise BadRequestError("a variable id appears twice in the graph")
        for var_id in new_vars:
            if var_id in self.variables:
                raise ConflictError(f"variable {var_id!r} already exists in this session")
        call_ids = [c.id for c in graph.calls]
        if len(set(call_ids)) != len(call_ids) or any(c in self.calls for c in call_ids):
            raise ConflictError("call ids must be new and unique within the session")

        known = set(self.variables) | set(new_vars)
        producer_of: dict[str, str] = {}  # var id -> call id, for this graph's calls
        wiring: dict[str, tuple[list[str], list[str]]] = {}
        for decl in graph.calls:
            inputs, outputs = call_variable_ids(decl)
            if not outputs:
                raise BadRequestError(f"call {decl.id!r} produces no output variable")
            if decl.kind == "native" and decl.segments:
                raise BadRequestError(f"native call {decl.id!r} cannot have template segments")
            for var_id in inputs + outputs:
                if var_id not in known:
                    raise NotFoundError(f"variable {var_id!r} not found in this session", param="var")
            for var_id in outputs:
                existing = self.variables.get(var_id)
                decl_var = new_vars.get(var_id)
                if var_id in producer_of or (existing is not None and existing.producer is not None):
                    raise ConflictError(f"variable {var_id!r} already has a producer")
                if (existing is not None and existing.value is not None) or (
                    decl_var is not None and decl_var.value is not None
                ):
                    raise ConflictError(f"variable {var_id!r} has a value; a call cannot produce it")
                if var_id in inputs:
                    raise BadRequestError(f"call {decl.id!r} uses its own output {var_id!r} as input")
                producer_of[var_id] = decl.id
            wiring[decl.id] = (inputs, outputs)
        self._check_acyclic(wiring, producer_of)

        for var_decl in graph.variables:
            self.add_variable(var_decl.id, var_decl.name, var_decl.value)
        calls = []
        for decl in graph.calls:
            inputs, outputs = wiring[decl.id]
            call = Call(decl.id, decl.name, decl.kind, list(decl.segments),
                        [self.variables[v] for v in inputs], [self.variables[v] for v in outputs],
                        messages=decl.messages, reply=decl.output)
            for var in call.outputs:
                var.producer = call
            for var in dict.fromkeys(call.inputs):
                var.consumers.append(call)
            self.calls[call.id] = call
            calls.append(call)
        return calls

    def _check_acyclic(self, wiring: dict[str, tuple[list[str], list[str]]],
                       producer_of: dict[str, str]) -> None:
        """New calls only depend on existing ones or each other: a cycle can only close among them."""
        state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = finished

        def visit(call_id: str) -> None:
            state[call_id] = 1
            for var_id in wiring[call_id][0]:
                dep = producer_of.get(var_id)
                if dep is None:
                    continue
                if state.get(dep) == 1:
                    raise BadRequestError(f"the graph has a cycle through variable {var_id!r}")
                if state.get(dep) is None:
                    visit(dep)
            state[call_id] = 2

        for call_id in wiring:
            if call_id not in state:
                visit(call_id)

    def edges(self) -> list[tuple[Call, Call, Variable]]:
        return [(var.producer, consumer, var) for var in self.variables.values()
                if var.producer is not None for consumer in var.consumers]
