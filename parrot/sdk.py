"""The native SDK: semantic functions (prompt templates) and native functions (Python).

    @P.semantic_function()
    def write_code(task: P.Input, code: P.Output(max_tokens=128)):
        \"\"\"Write python code of {{input:task}}. Code: {{output:code}}\"\"\"

    with P.Parrot(url) as vm:
        code = write_code("a snake game")   # returns at once: a SemanticVariable
        print(code.get(perf=P.LATENCY))

A call never runs here: it becomes a ``CallDecl`` (template segments bound to
variable ids) that the current VM sends to the service as part of the app's graph.
Native functions run in the client, but the service sees them as calls too, so
dependencies and fetch criteria flow through them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from parrot.errors import ParrotError, ParrotTimeoutError
from parrot.schemas import (
    CallDecl,
    Criterion,
    InputSegment,
    OutputSegment,
    SamplingConfig,
    Segment,
    TextSegment,
)
from parrot.template import Kind, Piece, Placeholder, TemplateError, parse_template, resolve_kinds
from parrot.variable import SemanticVariable
from parrot.vm import Parrot, current_vm

LATENCY = Criterion.LATENCY
THROUGHPUT = Criterion.THROUGHPUT
TTFT = Criterion.TTFT

__all__ = [
    "LATENCY", "THROUGHPUT", "TTFT", "Criterion", "Input", "NativeFunction", "Output", "Parrot",
    "ParrotError", "ParrotTimeoutError", "PreparedCall", "SamplingConfig", "SemanticFunction",
    "SemanticVariable", "TemplateError", "native_function", "semantic_function",
]


class Input:
    """Annotation of a semantic function parameter the template reads: ``task: P.Input``."""


class Output:
    """Annotation of a parameter the template generates: ``code: P.Output`` or, with sampling,
    ``P.Output(max_tokens=128, temperature=0.7)`` or ``P.Output(P.SamplingConfig(...))``."""

    def __init__(self, sampling: SamplingConfig | None = None, /, *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: str | list[str] | None = None,
                 ignore_eos: bool | None = None, json_schema: dict[str, Any] | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 repetition_penalty: float | None = None, logit_bias: dict[int, float] | None = None,
                 min_tokens: int | None = None) -> None:
        fields = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                  "seed": seed, "stop": [stop] if isinstance(stop, str) else stop,
                  "ignore_eos": ignore_eos, "json_schema": json_schema,
                  "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                  "repetition_penalty": repetition_penalty, "logit_bias": logit_bias,
                  "min_tokens": min_tokens}
        given = {k: v for k, v in fields.items() if v is not None}
        if sampling is not None:
            if not isinstance(sampling, SamplingConfig):
                raise TypeError(f"P.Output takes a P.SamplingConfig, not {type(sampling).__name__}")
            if given:
                raise TypeError("pass either a SamplingConfig or sampling keywords to P.Output, not both")
        self.sampling = sampling if sampling is not None else SamplingConfig.model_validate(given)

    def __repr__(self) -> str:
        return f"P.Output({self.sampling!r})"


OutputSpec = Output | type[Output] | SamplingConfig  # how from_template takes an output's sampling


def _annotation_kind(annotation: object) -> tuple[Kind, SamplingConfig | None] | None:
    if annotation is Input or isinstance(annotation, Input):
        return "input", None
    if annotation is Output:
        return "output", SamplingConfig()
    if isinstance(annotation, Output):
        return "output", annotation.sampling
    return None


@dataclass
class PreparedCall:
    """A semantic call ready to submit: its declaration and the variables it reads and makes."""

    decl: CallDecl
    inputs: list[SemanticVariable]  # the variable arguments, in template order
    outputs: list[SemanticVariable]  # the new variables, in template order


class SemanticFunction:
    """A prompt template with typed holes; calling it issues one LLM call (see module docs).

    Built by ``@P.semantic_function()``. The template is the docstring (cleaned by
    ``inspect.cleandoc``); every placeholder must name a parameter, and every
    ``P.Input``/``P.Output`` parameter must appear in it (outputs exactly once).
    Errors are ``TemplateError`` at decoration time.
    """

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None,
                 template: str | None = None) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name or fn.__name__
        where = f"semantic function {fn.__qualname__}"
        if template is None:
            doc = inspect.getdoc(fn)
            if not doc:
                raise TemplateError(f"{where} has no docstring: its docstring is the prompt template")
            template = inspect.cleandoc(doc)
        self.template_text = template
        try:
            signature = inspect.signature(fn, eval_str=True)
        except NameError as exc:
            raise TemplateError(f"{where}: cannot resolve an annotation: {exc}") from exc
        kinds, self.sampling = _parameter_kinds(signature, where)
        self.pieces = _checked_pieces(self.template_text, kinds, where)
        self.output_names = [p.name for p in self.pieces
                             if isinstance(p, Placeholder) and p.kind == "output"]
        self.input_names = [n for n, k in kinds.items() if k == "input"]
        self._call_signature = signature.replace(
            parameters=[p for p in signature.parameters.values() if kinds[p.name] == "input"],
            return_annotation=inspect.Signature.empty,
        )
        self.__signature__ = self._call_signature

    @classmethod
    def from_template(cls, template: str, *, name: str, inputs: Sequence[str] = (),
                      outputs: Sequence[str] | Mapping[str, OutputSpec]) -> SemanticFunction:
        """A semantic function made at run time, e.g. one input per chunk of a document.

        ``template`` is used as given (no dedenting); ``inputs`` become its parameters in
        this order; ``outputs`` names its outputs, optionally with their sampling.
        """
        if not isinstance(outputs, Mapping):
            outputs = {out: Output() for out in outputs}
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        try:
            params = [inspect.Parameter(n, kind, annotation=Input) for n in inputs] + [
                inspect.Parameter(n, kind, annotation=_as_output(o)) for n, o in outputs.items()
            ]
            signature = inspect.Signature(params)
        except ValueError as exc:
            raise TemplateError(f"semantic function {name}: {exc}") from exc

        def stub(*args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("a template's function has no body")

        stub.__name__ = stub.__qualname__ = name
        stub.__signature__ = signature  # type: ignore[attr-defined]
        return cls(stub, name=name, template=template)

    def __repr__(self) -> str:
        return f"<SemanticFunction {self.name}{self._call_signature}>"

    def prepare(self, *args: Any, **kwargs: Any) -> PreparedCall:
        """Bind arguments and build the call without submitting it (what ``__call__`` sends).

        A ``SemanticVariable`` argument becomes an input segment; any other value becomes
        constant text (``str(value)``).
        """
        for key in kwargs:
            if key in self.output_names:
                raise TypeError(f"{self.name}() output {key!r} is returned, not passed")
        bound = self._call_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        segments: list[Segment] = []
        inputs: list[SemanticVariable] = []
        outputs: list[SemanticVariable] = []
        for piece in self.pieces:
            if isinstance(piece, str):
                _append_text(segments, piece)
            elif piece.kind == "output":
                var = SemanticVariable(name=piece.name)
                outputs.append(var)
                segments.append(OutputSegment(var=var.id, sampling=self.sampling[piece.name]))
            else:
                arg = bound.arguments[piece.name]
                if isinstance(arg, SemanticVariable):
                    if arg not in inputs:
                        inputs.append(arg)
                    segments.append(InputSegment(var=arg.id))
                else:
                    _append_text(segments, str(arg))
        decl = CallDecl(id=uuid.uuid4().hex, name=self.name, kind="llm", segments=segments)
        return PreparedCall(decl, inputs, outputs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Issue the call in the current VM and return its output variable(s) at once:
        the variable itself for one output, a tuple in template order for several."""
        vm = current_vm()
        call = self.prepare(*args, **kwargs)
        vm.submit(call.decl, call.inputs, call.outputs)
        return call.outputs[0] if len(call.outputs) == 1 else tuple(call.outputs)


def _parameter_kinds(signature: inspect.Signature,
                     where: str) -> tuple[dict[str, Kind], dict[str, SamplingConfig]]:
    """Each parameter's kind from its annotation, and each output's sampling."""
    kinds: dict[str, Kind] = {}
    sampling: dict[str, SamplingConfig] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TemplateError(f"{where}: *{param.name} parameters are not supported")
        found = _annotation_kind(param.annotation)
        if found is None:
            raise TemplateError(f"{where}: parameter {param.name!r} must be annotated P.Input or P.Output")
        kinds[param.name], config = found
        if config is not None:
            sampling[param.name] = config
    return kinds, sampling


def _checked_pieces(template: str, kinds: dict[str, Kind], where: str) -> list[Piece]:
    """Parse ``template``: every placeholder names a parameter, every parameter appears,
    each output exactly once, and there is at least one output."""
    try:
        pieces = resolve_kinds(parse_template(template), kinds)
    except TemplateError as exc:
        raise TemplateError(f"{where}: {exc}") from exc
    used = [p.name for p in pieces if isinstance(p, Placeholder)]
    for name, kind in kinds.items():
        count = used.count(name)
        if count == 0:
            raise TemplateError(f"{where}: {kind} {name!r} does not appear in the template")
        if kind == "output" and count > 1:
            raise TemplateError(f"{where}: output {name!r} appears {count} times; "
                                "an output is generated once")
    if "output" not in kinds.values():
        raise TemplateError(f"{where}: the template has no {{{{output:...}}}} placeholder")
    return pieces


def _as_output(spec: OutputSpec) -> Output:
    if isinstance(spec, Output):
        return spec
    return Output() if spec is Output else Output(spec)  # type: ignore[arg-type]


def _append_text(segments: list[Segment], text: str) -> None:
    if not text:
        return
    last = segments[-1] if segments else None
    if isinstance(last, TextSegment):
        segments[-1] = TextSegment(text=last.text + text)
    else:
        segments.append(TextSegment(text=text))


class NativeFunction:
    """A Python function in the app's graph: ``f(a, b)`` returns a variable at once.

    Built by ``@P.native_function``. The service records it as a ``native`` call (its
    variable arguments are its inputs), and the client runs it as soon as those
    inputs are ready: sync functions in a worker thread, ``async def`` ones on the VM's
    loop. The output is ``str(result)``; an exception fails the output and, through
    it, every call that depends on it.
    """

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name or fn.__name__
        self.is_async = inspect.iscoroutinefunction(fn)
        self._signature = inspect.signature(fn)

    def __repr__(self) -> str:
        return f"<NativeFunction {self.name}{self._signature}>"

    def __call__(self, *args: Any, **kwargs: Any) -> SemanticVariable:
        vm = current_vm()
        bound = self._signature.bind(*args, **kwargs)
        call_args, call_kwargs = list(bound.args), dict(bound.kwargs)
        inputs: list[SemanticVariable] = []
        for value in (*call_args, *call_kwargs.values()):
            if isinstance(value, SemanticVariable) and value not in inputs:
                inputs.append(value)
        output = SemanticVariable(name=self.name)
        decl = CallDecl(id=uuid.uuid4().hex, name=self.name, kind="native",
                        inputs=[v.id for v in inputs], outputs=[output.id])
        vm.submit(decl, inputs, [output])
        vm.start_native(self.name, self._run, call_args, call_kwargs, output)
        return output

    def _run(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """An awaitable of the result; sync functions run in a worker thread."""
        if self.is_async:
            return self.fn(*args, **kwargs)
        return asyncio.to_thread(self.fn, *args, **kwargs)


@overload
def semantic_function(fn: Callable[..., Any], /) -> SemanticFunction: ...
@overload
def semantic_function(*, name: str | None = None) -> Callable[[Callable[..., Any]], SemanticFunction]: ...
def semantic_function(fn: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
    """Make a semantic function of ``fn``, whose docstring is the prompt template.

    Use as ``@P.semantic_function()`` or ``@P.semantic_function``; ``name`` names its
    calls in the service's graph (default: the function's name).
    """
    def wrap(f: Callable[..., Any]) -> SemanticFunction:
        return SemanticFunction(f, name=name)

    return wrap if fn is None else wrap(fn)


@overload
def native_function(fn: Callable[..., Any], /) -> NativeFunction: ...
@overload
def native_function(*, name: str | None = None) -> Callable[[Callable[..., Any]], NativeFunction]: ...
def native_function(fn: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
    """Make a native function of ``fn`` (see ``NativeFunction``); with or without parentheses."""
    def wrap(f: Callable[..., Any]) -> NativeFunction:
        return NativeFunction(f, name=name)

    return wrap if fn is None else wrap(fn)
