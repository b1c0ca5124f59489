"""Plain LCEL chains that use ChatParrot, with no compile(): replies that only feed other calls are
sent ahead as one graph with edges; replies a step reads are waited for; results equal ChatOpenAI's
on the same service."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_openai import ChatOpenAI

from parrot.integrations.langchain import ChatParrot
from tests.integrations.langchain.graphs import ask, inputs, output, posted_calls, posted_graphs


@pytest.fixture
def models(service):
    parrot = ChatParrot(base_url=service.url, temperature=0, max_tokens=6)
    openai = ChatOpenAI(base_url=f"{service.url}/v1", api_key="unused", model=service.model, temperature=0,
                        max_tokens=6, max_retries=0)
    return parrot, openai


def two_steps(llm):
    return (ask("Name a {animal}.") | llm | StrOutputParser()
            | ask("Describe: {name}") | llm | StrOutputParser())


def sessions_closed(service) -> bool:
    return service.wait_sessions_closed()


def test_a_chain_sends_its_calls_ahead_with_edges(service, models):
    parrot, openai = models
    expected = two_steps(openai).invoke({"animal": "cat"})
    service.start_recording()
    assert two_steps(parrot).invoke({"animal": "cat"}) == expected
    [[first, second]] = posted_graphs(service)  # one submission: the second call before any reply
    assert inputs(second) == [output(first)]
    assert sessions_closed(service)


def test_parallel_branches_and_assign(service, models):
    def chain(llm):
        branches = {"a": ask("One word about {x}.") | llm | StrOutputParser(),
                    "b": ask("Another word about {x}.") | llm | StrOutputParser(), "x": lambda v: v["x"]}
        combine = PromptTemplate.from_template("Combine {a} and {b} about {x}.")
        return (branches | RunnablePassthrough.assign(c=combine | llm | StrOutputParser())
                | PromptTemplate.from_template("{c}!") | llm | StrOutputParser())

    parrot, openai = models
    expected = chain(openai).invoke({"x": "rain"})
    service.start_recording()
    assert chain(parrot).invoke({"x": "rain"}) == expected
    calls = posted_calls(service)
    assert len(calls) == 4
    by_output = {output(c): c for c in calls}
    combine = next(c for c in calls if len(inputs(c)) == 2)
    last = next(c for c in calls if inputs(c) == [output(combine)])
    sources = {by_output[v]["id"] for v in inputs(combine)}
    assert sources | {combine["id"], last["id"]} == {c["id"] for c in calls}


def test_a_reply_a_lambda_reads_is_waited_for(service, models):
    def chain(llm):
        return (ask("Name a {x}.") | llm | StrOutputParser() | RunnableLambda(lambda s: {"name": s.upper()})
                | ask("Spell {name}.") | llm | StrOutputParser())

    parrot, openai = models
    expected = chain(openai).invoke({"x": "fruit"})
    service.start_recording()
    assert chain(parrot).invoke({"x": "fruit"}) == expected
    assert [inputs(c) for c in posted_calls(service)] == [[], []]  # the second prompt has the real text


def test_the_answer_still_streams_and_async_works(service, models):
    parrot, openai = models
    expected = two_steps(openai).invoke({"animal": "dog"})
    service.start_recording()
    pieces = list(two_steps(parrot).stream({"animal": "dog"}))
    assert "".join(pieces) == expected and len(pieces) > 1
    assert asyncio.run(two_steps(parrot).ainvoke({"animal": "dog"})) == expected
    assert sessions_closed(service)


def test_batch_of_a_chain_equals_chatopenai(service, models):
    parrot, openai = models
    values = [{"animal": a} for a in ("owl", "fox", "eel")]
    assert two_steps(parrot).batch(values) == two_steps(openai).batch(values)


def test_a_reply_for_a_model_of_another_service_is_waited_for(service, models):
    parrot, openai = models
    other = ChatParrot(base_url=service.url.replace("127.0.0.1", "localhost"), temperature=0, max_tokens=6)
    chain = (ask("Name a {animal}.") | parrot | StrOutputParser()
             | ask("Describe: {name}") | other | StrOutputParser())
    expected = two_steps(openai).invoke({"animal": "bee"})
    service.start_recording()
    assert chain.invoke({"animal": "bee"}) == expected
    calls = [c for r in service.requests("POST", "/v1/graphs") for c in r.body["calls"]]
    assert [inputs(c) for c in calls] == [[], []]  # the second prompt carries the real text
