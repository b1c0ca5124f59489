"""Compiled LCEL chains: every shape's LLM calls reach the service as one graph with the right
segments and edges, and the results equal the chain run without compiling."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import JsonOutputParser, StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder, PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

from parrot.integrations.langchain import ChatParrot, compile
from tests.integrations.langchain.graphs import ask, inputs, output, posted_calls, posted_graphs


@pytest.fixture
def llm(service) -> ChatParrot:
    return ChatParrot(base_url=service.url, temperature=0, max_tokens=6)


def run_both(service, chain, value):
    """(plain result, compiled result, graphs the compiled run posted)."""
    plain = chain.invoke(value)
    service.start_recording()
    compiled = compile(chain).invoke(value)
    return plain, compiled, posted_graphs(service)


def test_sequence_of_two_calls_is_one_graph_with_an_edge(service, llm):
    chain = (ask("Name a {animal}.") | llm | StrOutputParser()
             | ask("Describe: {name}") | llm | StrOutputParser())
    plain, compiled, graphs = run_both(service, chain, {"animal": "cat"})
    assert compiled == plain
    [[first, second]] = graphs  # both calls in one submission, before any reply came back
    assert inputs(first) == [] and inputs(second) == [output(first)]
    texts = [s.get("text", "") for m in second["messages"] for s in m["content"]]
    assert any("Describe: " in t for t in texts)  # the static text around the variable


def test_parallel_branches_feed_one_call(service, llm):
    branch = {"a": ask("One word about {x}.") | llm | StrOutputParser(),
              "b": ask("Another word about {x}.") | llm | StrOutputParser()}
    chain = branch | ask("Combine {a} and {b}.") | llm | StrOutputParser()
    plain, compiled, graphs = run_both(service, chain, {"x": "rain"})
    assert compiled == plain
    calls = [c for g in graphs for c in g]
    assert len(calls) == 3
    combine = next(c for c in calls if inputs(c))
    assert sorted(inputs(combine)) == sorted(output(c) for c in calls if c is not combine)


def test_assign_and_pick_carry_placeholders(service, llm):
    chain = (RunnablePassthrough.assign(fact=ask("A fact about {topic}.") | llm | StrOutputParser())
             | PromptTemplate.from_template("{topic}: {fact} Why?", template_format="f-string")
             | llm | StrOutputParser())
    plain, compiled, graphs = run_both(service, chain, {"topic": "tides"})
    assert compiled == plain
    fact, why = [c for g in graphs for c in g]
    assert inputs(why) == [output(fact)]


def test_map_submits_every_item_together_and_a_lambda_sees_real_text(service, llm):
    summarize = ask("Summarize: {chunk}") | llm | StrOutputParser()
    join = RunnableLambda(lambda parts: {"parts": "\n".join(parts)})
    chain = summarize.map() | join | ask("Merge:\n{parts}") | llm | StrOutputParser()
    chunks = [{"chunk": f"part {i} of a story"} for i in range(4)]
    plain, compiled, graphs = run_both(service, chain, chunks)
    assert compiled == plain
    assert [len(g) for g in graphs] == [4, 1]  # the maps together; the merge once they were read
    assert all("⟦" not in s.get("text", "") for m in graphs[1][0]["messages"] for s in m["content"])


def test_bind_and_jinja2_templates(service, llm):
    first = ask("Say {word}.") | llm.bind(max_tokens=4) | StrOutputParser()
    second = PromptTemplate.from_template("Echo {{ said }} now.", template_format="jinja2")
    chain = {"said": first} | second | llm | StrOutputParser()
    plain, compiled, graphs = run_both(service, chain, {"word": "hello"})
    assert compiled == plain
    say, echo = [c for g in graphs for c in g]
    assert say["output"]["sampling"]["max_tokens"] == 4
    assert inputs(echo) == [output(say)]


def test_mustache_escapes_so_its_values_are_resolved_first(service, llm):
    first = ask("Say {word}.") | llm | StrOutputParser()
    second = PromptTemplate.from_template("Echo {{said}} now.", template_format="mustache")
    chain = {"said": first} | second | llm | StrOutputParser()
    plain, compiled, graphs = run_both(service, chain, {"word": "a < b & c"})
    assert compiled == plain
    assert [inputs(c) for g in graphs for c in g] == [[], []]


def test_messages_placeholder_and_a_deferred_question(service, llm):
    history = [HumanMessage("Hi"), AIMessage("Hello.")]
    question = ask("Ask about {topic}.") | llm | StrOutputParser()
    chat = ChatPromptTemplate.from_messages([("system", "Answer briefly."), MessagesPlaceholder("history"),
                                             ("user", "{question}")])
    chain = RunnableParallel(history=lambda x: x["history"], question=question) | chat | llm
    value = {"topic": "owls", "history": history}
    plain, compiled, graphs = run_both(service, chain, value)
    assert compiled.content == plain.content
    ask_call, answer = [c for g in graphs for c in g]  # the lambda branch needed no reply
    assert inputs(answer) == [output(ask_call)]


def test_other_parsers_and_the_output_get_real_values(service, llm):
    chain = ask("Reply with JSON about {x}.") | llm.bind(json_schema={"type": "object"}) | JsonOutputParser()
    plain, compiled, _ = run_both(service, chain, {"x": "cats"})
    assert compiled == plain and isinstance(compiled, dict)
    upper = ask("Name a {x}.") | llm | StrOutputParser() | RunnableLambda(str.upper)
    plain, compiled, _ = run_both(service, upper, {"x": "fruit"})
    assert compiled == plain and "⟦" not in compiled


def test_batch_and_async_equal_the_plain_chain(service, llm):
    chain = ask("Name a {x}.") | llm | StrOutputParser() | ask("Spell {name}.") | llm | StrOutputParser()
    values = [{"x": "tree"}, {"x": "bird"}, {"x": "river"}]
    compiled = compile(chain)
    assert compiled.batch(values) == chain.batch(values)
    plain = chain.invoke(values[0])
    service.start_recording()
    assert asyncio.run(compiled.ainvoke(values[0])) == plain
    first, second = posted_calls(service)
    assert inputs(second) == [output(first)]
    assert asyncio.run(compiled.abatch(values)) == chain.batch(values)


def test_compile_without_parrot_models_or_across_services(service, llm):
    plain = ask("Hi {x}") | RunnableLambda(lambda p: p.to_string())
    assert compile(plain) is plain
    other = ChatParrot(base_url="http://127.0.0.1:1", temperature=0)
    with pytest.raises(ValueError, match="one service"):
        compile({"a": ask("{x}") | llm, "b": ask("{x}") | other})
