"""``P.chat``: chat calls whose messages hold semantic variables, built and run through the SDK."""

from __future__ import annotations

import openai
import pytest
from pydantic import ValidationError

import parrot as P
from parrot.chat_call import prepare_chat
from parrot.client import ServiceClient
from parrot.schemas import CallDecl, InputSegment, OutputSegment, TextSegment


def test_prepare_chat_builds_messages_inputs_and_one_reply():
    doc = P.SemanticVariable("a long text")
    call = prepare_chat([
        ("developer", "Be brief."),
        {"role": "user", "content": ["Summarize ", 3, " points of ", doc, "."], "name": "ann"},
        ("assistant", None),
    ], name="summarize", max_tokens=32, stop="\n")
    decl = call.decl
    assert decl.kind == "llm" and decl.name == "summarize" and decl.segments == []
    assert decl.messages is not None
    system, user, assistant = decl.messages
    assert system.role == "developer" and system.content == [TextSegment(text="Be brief.")]
    assert user.name == "ann" and user.content == [
        TextSegment(text="Summarize 3 points of "), InputSegment(var=doc.id), TextSegment(text=".")]
    assert assistant.content == []
    assert call.inputs == [doc]
    [reply] = call.outputs
    assert reply.name == "summarize"
    assert decl.output == OutputSegment(var=reply.id, sampling=P.SamplingConfig(max_tokens=32, stop=["\n"]))
    # What the client sends round-trips through the wire schema.
    assert CallDecl.model_validate(decl.model_dump(mode="json", exclude_none=True)) == decl


def test_prepare_chat_rejects_bad_messages():
    with pytest.raises(ValidationError, match="role"):
        prepare_chat([("tool", "x")])
    with pytest.raises(TypeError, match="unsupported message keys"):
        prepare_chat([{"role": "user", "content": "x", "tool_calls": []}])
    with pytest.raises(TypeError, match=r"\(role, content\)"):
        prepare_chat([("user", "x", "extra")])
    with pytest.raises(TypeError, match="either a SamplingConfig or sampling keywords"):
        prepare_chat([("user", "x")], sampling=P.SamplingConfig(), max_tokens=3)
    with pytest.raises(ValidationError, match="at least one message"):
        prepare_chat([])
    with pytest.raises(RuntimeError, match="inside a VM"):
        P.chat([("user", "x")])


def test_chat_replies_feed_other_calls_and_match_the_openai_route(service_url):
    with P.Parrot(service_url) as vm:
        topic = vm.variable("parrots")
        answer = P.chat([("system", "You are terse."), ("user", ["Tell me about ", topic])],
                        name="ask", max_tokens=8, ignore_eos=True)
        followup = P.chat([("user", ["Tell me about ", topic]), ("assistant", answer), ("user", "More.")],
                          name="more", max_tokens=6, ignore_eos=True)
        followup_value, answer_value = followup.get(perf=P.LATENCY), answer.get()
        graph = vm.graph()
    assert {(e.source, e.target) for e in graph.edges} == {(answer.producer, followup.producer)}
    assert {c.name: c.state for c in graph.calls} == {"ask": "done", "more": "done"}

    client = openai.OpenAI(base_url=f"{service_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    def reply(messages, max_tokens):
        return client.chat.completions.create(model=model, messages=messages, temperature=0,
                                              max_tokens=max_tokens, extra_body={"ignore_eos": True})

    first = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Tell me about parrots"}]
    assert reply(first, 8).choices[0].message.content == answer_value
    second = [{"role": "user", "content": "Tell me about parrots"},
              {"role": "assistant", "content": answer_value}, {"role": "user", "content": "More."}]
    assert reply(second, 6).choices[0].message.content == followup_value


async def test_the_low_level_client_submits_and_reads_a_chat_call(service_url):
    client = ServiceClient(service_url)
    try:
        session = await client.create_session()
        call = prepare_chat([("user", "Say hi.")], max_tokens=4)
        [reply] = call.outputs
        info = await client.submit_call(session.id, call.decl)
        assert info.id == call.decl.id and info.outputs == [reply.id]
        value = await client.wait_variable(session.id, reply.id, criterion=P.LATENCY, timeout=30)
        done = await client.get_call(session.id, call.decl.id)
        await client.delete_session(session.id)
    finally:
        await client.aclose()
    assert isinstance(value, str) and done.state == "done" and done.prompt_tokens > 0
