"""The SDK without a service: templates, signatures, argument binding, variables, errors."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import httpx
import pytest
from pydantic import ValidationError

import parrot as P
from parrot.batcher import GraphBatcher
from parrot.client import _error_from
from parrot.loop_thread import LoopThread
from parrot.schemas import (
    CallDecl,
    Criterion,
    InputSegment,
    OutputSegment,
    SamplingConfig,
    TextSegment,
    VariableDecl,
)


@P.semantic_function()
def write_code(task: P.Input, code: P.Output):
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code: {{output:code}}"""


@P.semantic_function(name="qa")
def write_test(task: P.Input, code: P.Input, test: P.Output(max_tokens=128, stop="\n\n")):
    """You are an experienced QA engineer. You write test code for {{input:task}}.
    Code: {{input:code}}.
    Your test code: {{output:test}}"""


def test_public_names():
    assert P.LATENCY is Criterion.LATENCY and P.THROUGHPUT is Criterion.THROUGHPUT
    assert P.TTFT is Criterion.TTFT
    assert P.SamplingConfig is SamplingConfig
    assert issubclass(P.ParrotTimeoutError, P.ParrotError) and issubclass(P.ParrotTimeoutError, TimeoutError)
    assert issubclass(P.TemplateError, ValueError)


def test_import_pulls_in_neither_torch_nor_the_service():
    code = ("import sys, parrot as P; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('parrot.service', 'fastapi'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- templates and signatures -------------------------------------------------------------------

def test_docstring_template_is_dedented_and_split():
    call = write_code.prepare(P.SemanticVariable("a snake game"))
    segs = call.decl.segments
    assert [type(s) for s in segs] == [TextSegment, InputSegment, TextSegment, OutputSegment]
    assert segs[0].text == "You are an expert software engineer.\nWrite python code of "
    assert segs[2].text == ".\nCode: "
    assert call.decl.kind == "llm" and call.decl.name == "write_code"
    assert write_code.input_names == ["task"] and write_code.output_names == ["code"]


def test_output_sampling_comes_from_the_annotation():
    call = write_test.prepare("a game", "print(1)")
    out = call.decl.segments[-1]
    assert isinstance(out, OutputSegment)
    assert out.sampling.max_tokens == 128 and out.sampling.stop == ["\n\n"]
    assert call.decl.name == "qa"  # name= overrides the function name
    assert write_code.prepare("x").decl.segments[-1].sampling == SamplingConfig()


def test_plain_placeholders_take_their_kind_from_annotations():
    @P.semantic_function
    def summarize(doc: P.Input, summary: P.Output(P.SamplingConfig(max_tokens=7))):
        """Summarize {{doc}} as {{summary}}"""

    call = summarize.prepare(doc=P.SemanticVariable("text"))
    assert [s.type for s in call.decl.segments] == ["text", "input", "text", "output"]
    assert call.decl.segments[-1].sampling.max_tokens == 7


def test_several_outputs_in_template_order():
    @P.semantic_function()
    def plan(goal: P.Input, steps: P.Output, risks: P.Output):
        """Goal: {{input:goal}}. Risks: {{output:risks}} Steps: {{output:steps}}"""

    call = plan.prepare("ship it")
    assert [v.name for v in call.outputs] == ["risks", "steps"]  # template order, not signature order
    outs = [s for s in call.decl.segments if isinstance(s, OutputSegment)]
    assert [s.var for s in outs] == [v.id for v in call.outputs]
    assert plan.output_names == ["risks", "steps"]


@pytest.mark.parametrize("template, message", [
    ("Write {{input:task}}.", "output 'code' does not appear"),
    ("Code: {{output:code}}", "input 'task' does not appear"),
    ("{{input:task}} {{input:nope}} {{output:code}}", "nope"),
    ("{{output:task}} {{output:code}}", "parameter is an input"),
    ("{{input:task}} {{output:code}} {{output:code}}", "appears 2 times"),
    ("{{input:task}} {{out:code}}", "kind must be 'input' or 'output'"),
    ("{{input:task}} {{output:code}", "unbalanced"),
])
def test_bad_templates_fail_at_decoration(template, message):
    def fn(task: P.Input, code: P.Output):
        pass

    fn.__doc__ = template
    with pytest.raises(P.TemplateError, match=message):
        P.semantic_function(fn)


def test_bad_signatures_fail_at_decoration():
    with pytest.raises(P.TemplateError, match="no docstring"):
        @P.semantic_function()
        def no_doc(task: P.Input, code: P.Output):
            pass

    with pytest.raises(P.TemplateError, match="'task' must be annotated"):
        @P.semantic_function()
        def unannotated(task, code: P.Output):
            """{{task}} {{code}}"""

    with pytest.raises(P.TemplateError, match="no {{output"):
        @P.semantic_function()
        def no_output(task: P.Input):
            """{{task}}"""

    with pytest.raises(P.TemplateError, match=r"\*args"):
        @P.semantic_function()
        def star(*args: P.Input):
            """{{args}}"""


def test_output_annotation_options():
    assert P.Output(top_k=5, seed=3, ignore_eos=True).sampling.model_dump(include={"top_k", "seed"}) == {
        "top_k": 5, "seed": 3}
    with pytest.raises(TypeError, match="not both"):
        P.Output(P.SamplingConfig(), max_tokens=3)
    with pytest.raises(TypeError):
        P.Output(max_token=3)  # a typo is an error, not ignored
    with pytest.raises(ValidationError):
        P.Output(max_tokens=0)


def test_functions_from_templates_built_at_run_time():
    names = [f"part_{i}" for i in range(3)]
    template = "Combine:\n" + "".join(f"- {{{{input:{n}}}}}\n" for n in names) + "Verdict:{{output:verdict}}"
    reduce = P.SemanticFunction.from_template(template, name="reduce", inputs=names,
                                              outputs={"verdict": P.Output(max_tokens=9)})
    parts = [P.SemanticVariable(f"s{i}") for i in range(3)]
    call = reduce.prepare(*parts)
    assert call.inputs == parts and call.decl.name == "reduce"
    assert call.decl.segments[0].text == "Combine:\n- "  # used as given, not dedented
    assert call.decl.segments[-1].sampling.max_tokens == 9
    plain = P.SemanticFunction.from_template("{{a}} {{b}}", name="f", inputs=["a"], outputs=["b"])
    assert plain.output_names == ["b"] and plain.sampling["b"] == P.SamplingConfig()
    with pytest.raises(P.TemplateError, match="input 'c' does not appear"):
        P.SemanticFunction.from_template("{{a}} {{b}}", name="f", inputs=["a", "c"], outputs=["b"])
    with pytest.raises(P.TemplateError, match="not a valid parameter name"):
        P.SemanticFunction.from_template("{{b}}", name="f", inputs=["not valid"], outputs=["b"])


# -- binding arguments --------------------------------------------------------------------------

def test_python_values_become_constant_text():
    code = P.SemanticVariable("print('hi')")
    call = write_test.prepare(42, code=code)
    segs = call.decl.segments
    assert isinstance(segs[0], TextSegment)
    assert segs[0].text.endswith("test code for 42.\nCode: ")  # merged with the static text around it
    assert isinstance(segs[1], InputSegment) and segs[1].var == code.id
    assert call.inputs == [code]


def test_a_variable_used_twice_is_one_input():
    @P.semantic_function()
    def echo(x: P.Input, y: P.Output):
        """{{x}} and again {{x}}: {{y}}"""

    x = P.SemanticVariable("hello")
    call = echo.prepare(x)
    assert call.inputs == [x]
    assert [s.var for s in call.decl.segments if isinstance(s, InputSegment)] == [x.id, x.id]


def test_arguments_bind_like_python():
    with pytest.raises(TypeError):
        write_test.prepare("only one")
    with pytest.raises(TypeError, match="returned, not passed"):
        write_test.prepare("a", "b", test="c")

    @P.semantic_function()
    def greet(code: P.Output, who: P.Input = "world"):
        """Hello {{who}}! {{code}}"""

    assert greet.prepare().decl.segments[0].text == "Hello world! "
    assert list(inspect.signature(greet).parameters) == ["who"]


def test_every_call_gets_fresh_ids():
    a, b = write_code.prepare("x"), write_code.prepare("x")
    assert a.decl.id != b.decl.id and a.outputs[0].id != b.outputs[0].id


def test_calls_outside_a_vm_raise():
    @P.native_function
    def shout(text: str) -> str:
        return text.upper()

    with pytest.raises(RuntimeError, match=r"with P\.Parrot"):
        write_code("a snake game")
    with pytest.raises(RuntimeError, match=r"with P\.Parrot"):
        shout("hi")
    assert shout.fn("hi") == "HI"  # the plain function stays reachable


# -- variables ---------------------------------------------------------------------------------

def test_standalone_variables():
    const = P.SemanticVariable(3, name="n")
    assert const.value == "3" and const.is_constant and const.get() == "3"
    hole = P.SemanticVariable()
    with pytest.raises(P.ParrotError, match="no Parrot VM has seen it"):
        hole.get()
    hole.set("later")  # before any VM uses it: it simply becomes a constant
    assert hole.get() == "later" and hole.is_constant
    with pytest.raises(P.ParrotError, match="already has a value"):
        hole.set("again")
    with pytest.raises(ValueError, match="exactly one"):
        P.SemanticVariable().set()


def test_outputs_of_calls_cannot_be_set():
    out = write_code.prepare("x").outputs[0]
    out.producer = "call-1"
    with pytest.raises(P.ParrotError, match="produced by call"):
        out.set("no")


def test_a_vm_must_be_entered():
    vm = P.Parrot("http://127.0.0.1:9")
    with pytest.raises(P.ParrotError, match="not open"):
        vm.variable("x")


def test_unreachable_service_fails_the_first_request_clearly():
    # Entering sends nothing (the first graph posted opens the session), so nothing fails there.
    with P.Parrot("http://127.0.0.1:9", timeout=2) as vm:
        x = vm.variable("x")
        with pytest.raises(P.ParrotError, match="cannot reach the Parrot service at http://127.0.0.1:9"):
            x.get()
        with pytest.raises(P.ParrotError, match="cannot reach"):
            vm.graph()


# -- the HTTP client's error translation ----------------------------------------------------------

def test_service_errors_carry_the_service_message():
    body = {"error": {"message": "variable 'x' not found", "type": "invalid_request_error",
                      "param": "var", "code": "not_found"}}
    err = _error_from(httpx.Response(404, json=body))
    assert str(err) == "variable 'x' not found" and err.status_code == 404 and err.code == "not_found"
    err = _error_from(httpx.Response(502, text="bad gateway"))
    assert str(err) == "bad gateway" and err.status_code == 502


# -- batching ----------------------------------------------------------------------------------

def test_batches_are_posted_in_order_and_refusals_reach_their_variables():
    posted: list[list[str]] = []

    async def post(variables, calls, fetches):
        await asyncio.sleep(0.05)  # while this batch is in flight, later calls queue up
        if any(v.id == "bad" for v in variables):
            raise P.ParrotError("refused: bad")
        posted.append([v.id for v in variables] + [c.id for c in calls] + [f.var for f in fetches])

    def call(i: int) -> CallDecl:
        return CallDecl(id=f"c{i}", segments=[{"type": "output", "var": f"v{i}"}])

    loop = LoopThread("test-batcher")
    try:
        batcher = GraphBatcher(window_s=0.01, call_soon=loop.call_soon)
        loop.submit(batcher.run(post))
        batcher.add([VariableDecl(id="v0")], [call(0)])
        batcher.add([VariableDecl(id="v1")], [call(1)])  # within the window: same batch
        loop.run_sync(batcher.wait_posted("v1", timeout=5))
        batcher.add([VariableDecl(id="v2")], [call(2)])
        batcher.add([VariableDecl(id="bad")], [])
        with pytest.raises(P.ParrotError, match="refused: bad"):
            loop.run_sync(batcher.wait_posted("v2", timeout=5))
        batcher.add([VariableDecl(id="v3")], [call(3)])
        loop.run_sync(batcher.flush())
        assert batcher.is_declared("v3") and not batcher.is_declared("nope")
        batcher.add([VariableDecl(id="v4")], [call(4)])
        batcher.announce("v4", P.LATENCY)  # rides along with its batch
        loop.run_sync(batcher.wait_posted("v4", timeout=5))
        batcher.announce("v4", P.LATENCY)  # posted already: not again
    finally:
        loop.stop()
    assert posted == [["v0", "v1", "c0", "c1"], ["v3", "c3"], ["v4", "c4", "v4"]]
