"""The SDK against a live service (real uvicorn, real native routes, a tiny random-weight llama).

The tiny model writes gibberish, so these tests check structure and consistency:
values are strings, the service's graph has the calls and edges the program made,
failures surface as ParrotError with their cause, and nothing blocks that should not.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import parrot as P


@P.semantic_function()
def write_code(task: P.Input, code: P.Output(max_tokens=12)):
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code: {{output:code}}"""


@P.semantic_function()
def write_test(task: P.Input, code: P.Input, test: P.Output(max_tokens=12)):
    """You are an experienced QA engineer. You write test code for {{input:task}}.
    Code: {{input:code}}.
    Your test code: {{output:test}}"""


@P.semantic_function()
def review(code: P.Input, stats: P.Input, verdict: P.Output(max_tokens=8)):
    """Review this code ({{input:stats}}): {{input:code}} Verdict: {{output:verdict}}"""


@P.semantic_function()
def endless(topic: P.Input, essay: P.Output(max_tokens=1800, ignore_eos=True)):
    """Write a very long essay about {{input:topic}}: {{output:essay}}"""


@P.native_function
def line_stats(code: str) -> str:
    return f"{len(code.splitlines())} lines, {len(code)} chars"


def _calls_by_name(graph) -> dict:
    return {c.name: c for c in graph.calls}


def test_code_and_test_snippet(service_url):
    with P.Parrot(service_url) as vm:
        task = vm.variable("a snake game")
        code = write_code(task)
        test = write_test(task, code)
        code_value, test_value = code.get(perf=P.LATENCY), test.get(perf=P.LATENCY)
        graph = vm.graph()
    assert isinstance(code_value, str) and isinstance(test_value, str)
    assert code.value == code_value
    calls = _calls_by_name(graph)
    assert calls["write_code"].state == calls["write_test"].state == "done"
    assert calls["write_test"].inputs == [task.id, code.id]
    assert (calls["write_code"].id, calls["write_test"].id, code.id) in {
        (e.source, e.target, e.var) for e in graph.edges}
    names = {v.id: v.name for v in graph.variables}
    assert names[code.id] == "code" and names[test.id] == "test"
    assert calls["write_test"].criterion == P.LATENCY


def test_get_on_constants(service_url):
    with P.Parrot(service_url) as vm:
        declared = vm.variable("a snake game", name="task")
        assert declared.get() == "a snake game"  # answered by the service
        standalone = P.SemanticVariable("a chess engine")
        write_code(standalone)  # declared in the graph on first use
        assert standalone.get() == "a chess engine"
        info = {v.id: v for v in vm.graph().variables}
    assert info[declared.id].value == "a snake game" and info[declared.id].name == "task"
    assert info[standalone.id].value == "a chess engine" and info[standalone.id].producer is None


def test_calls_return_at_once(service_url):
    with P.Parrot(service_url) as vm:
        started = time.perf_counter()
        essay = endless("parrots")
        issued_s = time.perf_counter() - started
        state = _calls_by_name(vm.graph())["endless"].state
        assert essay.value is None
    assert issued_s < 0.5, issued_s  # 1800 forced tokens take far longer than this
    assert state in ("pending", "running")  # the call was still generating when it was issued


def test_several_outputs_in_one_template(service_url):
    @P.semantic_function()
    def plan(goal: P.Input, steps: P.Output(max_tokens=6), risks: P.Output(max_tokens=6)):
        """Goal: {{input:goal}}. Steps: {{output:steps}} Risks: {{output:risks}}"""

    with P.Parrot(service_url) as vm:
        steps, risks = plan("ship a parser")
        values = steps.get(), risks.get()
        calls = vm.graph().calls
    assert all(isinstance(v, str) for v in values)
    assert len(calls) == 1 and calls[0].outputs == [steps.id, risks.id] and calls[0].inputs == []


def test_python_constants_as_inputs(service_url):
    with P.Parrot(service_url) as vm:
        code = vm.variable("def add(a, b): return a + b")
        test = write_test(task=42, code=code)
        assert isinstance(test.get(), str)
        call = vm.graph().calls[0]
    assert call.inputs == [code.id]  # 42 went in as prompt text, not as a variable


def test_native_function_between_llm_calls(service_url):
    with P.Parrot(service_url) as vm:
        code = write_code("a snake game")
        stats = line_stats(code)
        verdict = review(code, stats)
        verdict_value = verdict.get(perf=P.LATENCY)
        graph = vm.graph()
    assert isinstance(verdict_value, str)
    assert stats.value == line_stats.fn(code.value)  # the client ran it on the real code
    calls = _calls_by_name(graph)
    native = calls["line_stats"]
    assert native.kind == "native" and native.state == "done"
    assert native.inputs == [code.id] and native.outputs == [stats.id]
    edges = {(e.source, e.target) for e in graph.edges}
    assert (calls["write_code"].id, native.id) in edges and (native.id, calls["review"].id) in edges
    assert native.criterion == P.LATENCY  # the fetch criterion flowed through the native call


def test_a_raising_native_function_fails_its_dependents(service_url):
    @P.native_function()
    def parse(code: str) -> str:
        raise ValueError(f"cannot parse {len(code)} chars")

    with P.Parrot(service_url) as vm:
        code = write_code("a snake game")
        parsed = parse(code)
        verdict = review(code, parsed)
        with pytest.raises(P.ParrotError, match="ValueError: cannot parse") as failed:
            verdict.get()
        with pytest.raises(P.ParrotError, match="ValueError"):
            parsed.get()
        assert isinstance(code.get(), str)  # the upstream call is unaffected
        calls = _calls_by_name(vm.graph())
    assert failed.value.status_code == 424
    assert calls["parse"].state == "failed" and calls["review"].state == "failed"


def test_client_owned_variables(service_url):
    with P.Parrot(service_url) as vm:
        task = vm.variable(name="task")
        code = write_code(task)
        assert _calls_by_name(vm.graph())["write_code"].state == "pending"  # waits for its input
        task.set("a tic-tac-toe game")
        assert isinstance(code.get(), str)
        assert task.get() == "a tic-tac-toe game"
        missing = vm.variable(name="missing")
        dependent = write_code(missing)
        missing.set(error="the user went away")
        with pytest.raises(P.ParrotError, match="the user went away"):
            dependent.get()


def test_failed_call_and_timeout_raise(service_url):
    with P.Parrot(service_url):
        too_long = write_code("snake " * 5000)  # far past the tiny model's context
        with pytest.raises(P.ParrotError) as failed:
            too_long.get()
        assert failed.value.status_code == 424 and "write_code" in str(failed.value)
        essay = endless("parrots")
        with pytest.raises(TimeoutError):
            essay.get(timeout=0.2)


async def test_async_with_and_aget(service_url):
    @P.native_function
    async def shout(text: str) -> str:
        await asyncio.sleep(0)
        return text.upper()

    async with P.Parrot(service_url) as vm:
        assert P.current_vm() is vm
        tasks = [vm.variable(t) for t in ("a snake game", "a todo app", "a chess clock")]
        codes = [write_code(t) for t in tasks]
        loud = shout(codes[0])
        values = await asyncio.gather(*(c.aget(perf=P.THROUGHPUT) for c in codes))
        assert await loud.aget() == values[0].upper()
    assert all(isinstance(v, str) for v in values)
    with pytest.raises(RuntimeError):
        P.current_vm()


def test_stream_joins_to_the_value(service_url):
    with P.Parrot(service_url):
        code = write_code("a snake game")
        deltas = list(code.stream())
        assert "".join(deltas) == code.get()
        assert "".join(code.stream()) == code.get()  # a finished value streams whole


async def test_astream_joins_to_the_value(service_url):
    async with P.Parrot(service_url):
        code = write_code("a snake game")
        deltas = [d async for d in code.astream()]
        assert "".join(deltas) == await code.aget()


def test_using_the_vm_after_exit_raises(service_url):
    with P.Parrot(service_url) as vm:
        code = write_code("a snake game")
        essay = endless("parrots")
        code.get()
    with pytest.raises(RuntimeError, match="inside a VM"):
        write_code("again")
    with pytest.raises(P.ParrotError, match="closed"):
        vm.variable("x")
    with pytest.raises(P.ParrotError, match="closed"):
        essay.get()
    with pytest.raises(P.ParrotError, match="closed"):
        code.get()
    with pytest.raises(P.ParrotError, match="only once"):
        vm.__enter__()


def test_variables_stay_in_their_session(service_url):
    with P.Parrot(service_url) as first, P.Parrot(service_url) as second:
        assert P.current_vm() is second and first.session_id != second.session_id
        shared = P.SemanticVariable("a snake game")  # constants may be used in any VM
        assert isinstance(write_code(shared).get(), str)
        hole = first.variable(name="hole")
        with pytest.raises(P.ParrotError, match="another Parrot VM"):
            write_code(hole)  # the current VM is `second`


def test_unknown_model_is_refused(service_url):
    with pytest.raises(P.ParrotError, match="does not serve model 'nope'"):
        with P.Parrot(service_url, model="nope"):
            pass
