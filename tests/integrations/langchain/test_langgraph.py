"""LangGraph graphs whose nodes call ChatParrot: each superstep's parallel calls reach the service
in one session, as one graph submission, and the results are those of per-call sessions."""

from __future__ import annotations

import operator
import time
from typing import Annotated, TypedDict

import pytest
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

import parrot as P
from parrot.integrations.langchain import ChatParrot
from parrot.integrations.langchain.langgraph import live_steps

TOPICS = ["rain", "tides", "owls", "salt"]


class State(TypedDict):
    topics: list[str]
    notes: Annotated[list[str], operator.add]
    summary: str


def note_prompt(topic: str) -> str:
    return f"One word about {topic}."


def summary_prompt(notes: list[str]) -> str:
    return "Join these notes: " + " | ".join(notes)


def map_reduce(llm: ChatParrot, *, fail_on: str | None = None, slow: ChatParrot | None = None):
    """Send one ``note`` task per topic (the map), then ``summarize`` their notes (the reduce).
    ``fail_on``: that topic's node raises after its call; ``slow``: the model of the last topic."""

    def pick(topic: str) -> ChatParrot:
        return slow if slow is not None and topic == TOPICS[-1] else llm

    def check(topic: str, text: str) -> dict:
        if topic == fail_on:
            raise ValueError(f"no note about {topic}")
        return {"notes": [text]}

    def note(item: dict) -> dict:
        return check(item["topic"], str(pick(item["topic"]).invoke(note_prompt(item["topic"])).content))

    async def anote(item: dict) -> dict:
        reply = await pick(item["topic"]).ainvoke(note_prompt(item["topic"]))
        return check(item["topic"], str(reply.content))

    def summarize(state: State) -> dict:
        return {"summary": llm.invoke(summary_prompt(state["notes"])).content}

    async def asummarize(state: State) -> dict:
        return {"summary": (await llm.ainvoke(summary_prompt(state["notes"]))).content}

    def fan_out(state: State) -> list[Send]:
        return [Send("note", {"topic": t}) for t in state["topics"]]

    builder = StateGraph(State)
    builder.add_node("note", RunnableLambda(note, afunc=anote))
    builder.add_node("summarize", RunnableLambda(summarize, afunc=asummarize))
    builder.add_conditional_edges(START, fan_out, ["note"])
    builder.add_edge("note", "summarize")
    builder.add_edge("summarize", END)
    return builder.compile()


@pytest.fixture
def llm(service) -> ChatParrot:
    return ChatParrot(base_url=service.url, temperature=0, max_tokens=6)


def per_call(llm: ChatParrot) -> tuple[list[str], str]:
    """The map and the reduce run call by call, outside LangGraph: a session per call."""
    notes = [str(llm.invoke(note_prompt(t)).content) for t in TOPICS]
    return notes, str(llm.invoke(summary_prompt(notes)).content)


def posts(service) -> list[tuple[str, int]]:
    """(session, number of calls) of each graph submission that held calls."""
    return [(r.body["session_id"], len(r.body["calls"])) for r in service.requests("POST", "/v1/graphs")
            if r.body["calls"]]


def wait_until_closed(service) -> None:
    """The graph's sessions are all deleted (a node that failed may leave others still running)."""
    assert service.wait_sessions_closed(), "a step session was left open"
    deadline = time.monotonic() + 20
    while live_steps():
        assert time.monotonic() < deadline, "a step was left open"
        time.sleep(0.05)


def check_map_then_reduce(service, result: dict, expected: tuple[list[str], str]) -> None:
    assert (result["notes"], result["summary"]) == expected
    [(map_session, map_calls), (reduce_session, reduce_calls)] = posts(service)
    assert (map_calls, reduce_calls) == (len(TOPICS), 1)  # the fan-out went out as one graph
    assert map_session != reduce_session  # one session per step
    assert service.sessions_opened() == 2
    assert not service.requests("GET", "/v1/sessions/")  # each post brought its step's replies and counts


def test_a_send_fan_out_is_one_graph_in_one_session(service, llm):
    expected = per_call(llm)
    service.start_recording()
    result = map_reduce(llm).invoke({"topics": TOPICS, "notes": []})
    check_map_then_reduce(service, result, expected)
    wait_until_closed(service)


async def test_an_async_send_fan_out_is_one_graph_in_one_session(service, llm):
    expected = per_call(llm)
    service.start_recording()
    result = await map_reduce(llm).ainvoke({"topics": TOPICS, "notes": []})
    check_map_then_reduce(service, result, expected)
    wait_until_closed(service)


def test_steps_of_two_runs_never_share_a_session(service, llm):
    graph = map_reduce(llm)
    service.start_recording()
    results = graph.batch([{"topics": TOPICS[:2], "notes": []}, {"topics": TOPICS[2:], "notes": []}])
    assert [len(r["notes"]) for r in results] == [2, 2]
    sessions = [s for s, _ in posts(service)]
    assert len(sessions) == len(set(sessions)) == 4  # two runs x (map, reduce)


def test_a_plain_invoke_outside_langgraph_is_unchanged(service, llm):
    started = time.monotonic()
    llm.invoke("Hi")
    assert time.monotonic() - started < 5
    assert service.sessions_opened() == 1 and live_steps() == 0


def test_a_node_that_fails_is_reported_and_its_step_session_closed(service, llm):
    service.start_recording()
    with pytest.raises(ValueError, match="no note about tides"):
        map_reduce(llm, fail_on="tides").invoke({"topics": TOPICS, "notes": []})
    wait_until_closed(service)
    [(_, map_calls)] = posts(service)
    assert map_calls == len(TOPICS)


@pytest.mark.parametrize("run", ["invoke", "ainvoke"])
async def test_a_call_that_times_out_is_reported_and_its_step_session_closed(service, llm, run):
    slow = ChatParrot(base_url=service.url, max_tokens=2000, timeout=0.5)
    graph = map_reduce(llm, slow=slow)
    service.start_recording()
    with pytest.raises(P.ParrotTimeoutError):
        if run == "invoke":
            graph.invoke({"topics": TOPICS, "notes": []})
        else:
            await graph.ainvoke({"topics": TOPICS, "notes": []})
    wait_until_closed(service)
    [(_, map_calls)] = posts(service)
    assert map_calls == len(TOPICS)  # the slow model's call went with the others



@pytest.mark.parametrize("run", ["stream", "astream"])
async def test_streamed_messages_of_a_fan_out_are_one_graph_too(service, llm, run):
    expected = per_call(llm)
    service.start_recording()
    graph, state = map_reduce(llm), {"topics": TOPICS, "notes": []}
    if run == "stream":
        items = list(graph.stream(state, stream_mode="messages"))
    else:
        items = [item async for item in graph.astream(state, stream_mode="messages")]
    summary = [chunk.content for chunk, meta in items if meta["langgraph_node"] == "summarize"]
    assert len(summary) > 1 and "".join(summary) == expected[1]  # token by token, through _stream
    assert [calls for _, calls in posts(service)] == [len(TOPICS), 1]
