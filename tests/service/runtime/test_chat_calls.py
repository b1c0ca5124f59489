"""Chat calls in the native graph: messages with variables, rendered like /v1/chat/completions."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch

from parrot.schemas import CallDecl, MessageDecl, OutputSegment
from parrot.service.app import create_app
from parrot.service.engine.builtin.engine import BuiltinEngine
from parrot.service.engine.tokenizer import ModelTokenizer
from parrot.service.runtime import prompts
from tests.service.runtime.test_native_api import Native, inp, out, text

MAX = 12


def msg(role, *content, **extra):
    return {"role": role, "content": list(content), **extra}


def chat_call(call_id, messages, reply, max_tokens=MAX):
    return {"id": call_id, "messages": messages, "output": out(reply, max_tokens)}


def openai_chat(server, messages, max_tokens=MAX):
    return server.client().chat.completions.create(
        model=server.model, messages=messages, temperature=0, max_tokens=max_tokens,
        extra_body={"ignore_eos": True})


def reference_ids(tokenizer, messages):
    """``transformers``' own tokenized chat prompt, for comparison with the service's."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture
def server(live_server_factory):
    return live_server_factory()


@pytest.fixture
def native(server):
    with server.http() as http:
        yield Native(http)


def test_chat_call_equals_the_openai_route_token_for_token(native, server, tokenizer):
    # "Summarize: " + "hello world" tokenizes differently piece by piece (" " + "hello") than
    # whole (" hello"); the chat call must send the whole rendering's tokens, as the OpenAI route does.
    native.submit(
        variables=[{"id": "doc", "value": "hello world"}, {"id": "summary"}],
        calls=[chat_call("sum", [msg("system", text("You are terse.")),
                                 msg("user", text("Summarize: "), inp("doc"), text(" now."))], "summary")],
    )
    summary = native.get("summary")["value"]
    final = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Summarize: hello world now."}]
    expected = reference_ids(tokenizer, final)
    engine = server.engine
    piecewise = engine.tokenizer.encode("Summarize: ") + engine.tokenizer.encode("hello world")
    assert piecewise != engine.tokenizer.encode("Summarize: hello world")

    resp = openai_chat(server, final)
    assert summary == resp.choices[0].message.content
    info = native.call("sum")
    assert info["state"] == "done" and info["prompt_tokens"] == resp.usage.prompt_tokens == len(expected)
    # The greedy continuation of transformers' own prompt ids is the reply.
    gen = server.hf_model.generate(torch.tensor([expected]), max_new_tokens=MAX, min_new_tokens=MAX,
                                   do_sample=False)[0, len(expected):].tolist()
    assert engine.tokenizer.decode(gen) == summary
    # The OpenAI request found the chat call's prompt in the prefix cache: the same token ids.
    assert resp.usage.prompt_tokens_details.cached_tokens >= len(expected) - 1


def test_repeated_chat_call_reports_cached_prompt_tokens(native):
    messages = [msg("user", text("Name a colour."))]
    native.submit(variables=[{"id": "a"}, {"id": "b"}], calls=[chat_call("first", messages, "a")])
    native.get("a")
    native.submit(calls=[chat_call("second", messages, "b")])
    assert native.get("b")["value"] == native.get("a")["value"]
    first, second = native.call("first"), native.call("second")
    assert first["cached_tokens"] == 0
    assert 0 < second["cached_tokens"] <= second["prompt_tokens"] == first["prompt_tokens"]


def test_chat_calls_consume_other_calls_outputs_with_edges_and_objectives(native, server):
    native.submit(
        variables=[{"id": "topic"}, {"id": "answer"}, {"id": "followup"}],
        calls=[
            {"id": "pick", "segments": [text("A topic:"), out("topic", 4)]},
            chat_call("ask", [msg("user", text("Tell me about "), inp("topic"))], "answer"),
            # A second turn: the first reply is the assistant's message.
            chat_call("more", [msg("user", text("Tell me about "), inp("topic")),
                               msg("assistant", inp("answer")),
                               msg("user", text("And then?"))], "followup", max_tokens=6),
        ],
    )
    followup = native.get("followup", criterion="latency")["value"]
    topic, answer = native.get("topic")["value"], native.get("answer")["value"]
    graph = native.graph()
    assert {(e["source"], e["target"], e["var"]) for e in graph["edges"]} == {
        ("pick", "ask", "topic"), ("pick", "more", "topic"), ("ask", "more", "answer")}
    calls = {c["id"]: c for c in graph["calls"]}
    assert {c["state"] for c in calls.values()} == {"done"}
    assert {c["criterion"] for c in calls.values()} == {"latency"}
    assert all(c["priority"] >= 100 for c in calls.values())
    assert calls["ask"]["inputs"] == ["topic"] and calls["ask"]["outputs"] == ["answer"]
    assert calls["ask"]["timings"]["started"] >= calls["pick"]["timings"]["finished"] - 1e-3

    first_turn = [{"role": "user", "content": f"Tell me about {topic}"}]
    assert openai_chat(server, first_turn).choices[0].message.content == answer
    second_turn = first_turn + [{"role": "assistant", "content": answer},
                                {"role": "user", "content": "And then?"}]
    resp = openai_chat(server, second_turn, max_tokens=6)
    assert resp.choices[0].message.content == followup
    assert calls["more"]["prompt_tokens"] == resp.usage.prompt_tokens


def test_call_info_counts_output_tokens_and_says_why_the_output_ended(native, server):
    messages = [msg("user", text("Count to ten."))]
    native.submit(variables=[{"id": "full"}], calls=[chat_call("full", messages, "full", max_tokens=10)])
    value = native.get("full")["value"]
    assert (native.call("full")["output_tokens"], native.call("full")["finish_reason"]) == (10, "length")

    stop = value[len(value) // 2:][:2]  # appears in the greedy output: generation stops there
    native.submit(variables=[{"id": "cut"}],
                  calls=[{"id": "cut", "messages": messages, "output": out("cut", 10, stop=[stop])}])
    cut = native.get("cut")["value"]
    info = native.call("cut")
    resp = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Count to ten."}], temperature=0,
        max_tokens=10, stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content == cut
    assert info["finish_reason"] == resp.choices[0].finish_reason == "stop"
    assert info["output_tokens"] == resp.usage.completion_tokens
    assert info["prompt_tokens"] == resp.usage.prompt_tokens

    # A template call's outputs all count.
    native.submit(variables=[{"id": "x"}, {"id": "y"}],
                  calls=[{"id": "two", "segments": [text("A:"), out("x", 3), text(" B:"), out("y", 4)]}])
    native.get("y")
    assert (native.call("two")["output_tokens"], native.call("two")["finish_reason"]) == (7, "length")


def test_developer_is_system_and_the_templates_default_system_prompt_applies(native, server):
    native.submit(
        variables=[{"id": "d"}, {"id": "s"}, {"id": "none"}],
        calls=[chat_call("dev", [msg("developer", text("Be brief.")), msg("user", text("Hi"))], "d"),
               chat_call("sys", [msg("system", text("Be brief.")), msg("user", text("Hi"))], "s"),
               chat_call("plain", [{"role": "user", "content": "Hi"}], "none")],  # string content
    )
    dev, sys_, plain = (native.get(v)["value"] for v in ("d", "s", "none"))
    assert dev == sys_
    assert native.call("dev")["prompt_tokens"] == native.call("sys")["prompt_tokens"]
    as_developer = openai_chat(server, [{"role": "developer", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}])
    assert as_developer.choices[0].message.content == dev
    resp = openai_chat(server, [{"role": "user", "content": "Hi"}])  # the template adds its own system
    assert resp.choices[0].message.content == plain
    assert native.call("plain")["prompt_tokens"] == resp.usage.prompt_tokens


def test_a_pending_chat_calls_static_prefix_is_known_before_its_input(tiny_engine_factory, tokenizer,
                                                                      serve_app):
    engine, _ = tiny_engine_factory()
    app = create_app(engine)
    system = "You review pull requests for a large Python project. Be specific and kind. " * 2
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        native = Native(http)
        native.submit(variables=[{"id": "diff"}, {"id": "review"}],  # the client sets diff later
                      calls=[chat_call("rev", [msg("system", text(system)),
                                               msg("user", text("Review: "), inp("diff"))], "review", 3)])
        pins = app.state.sessions.executor.pins
        [prefix] = [p for p, calls in pins.pending.items() if any(c.id == "rev" for c in calls)]
        r = http.post(f"/v1/sessions/{native.sid}/variables/diff", json={"value": "print('hi')"})
        assert r.status_code == 200
        native.get("review")
    final = [{"role": "system", "content": system}, {"role": "user", "content": "Review: print('hi')"}]
    expected = reference_ids(tokenizer, final)
    assert len(prefix) >= len(engine.tokenizer.encode(system)) and list(prefix) == expected[:len(prefix)]
    assert not pins.pending  # resolved once the call ran


def test_chat_calls_one_at_a_time(native):
    base = f"/v1/sessions/{native.sid}"
    native.submit(variables=[{"id": "q", "value": "What is 2+2?"}])
    r = native.http.post(f"{base}/calls", json=chat_call("c1", [msg("user", inp("q"))], "a1"))
    assert r.status_code == 200, r.text
    assert r.json()["inputs"] == ["q"] and r.json()["outputs"] == ["a1"]
    second = chat_call("c2", [msg("user", text("Check: "), inp("a1"))], "a2")
    r = native.http.post(f"{base}/calls", json=second)
    assert r.status_code == 200, r.text
    assert native.get("a2")["ready"]
    info = native.http.get(f"{base}/calls/c2").json()
    assert info["state"] == "done" and info["inputs"] == ["a1"] and info["prompt_tokens"] > 0
    assert {(e["source"], e["target"]) for e in native.graph()["edges"]} == {("c1", "c2")}


def test_bad_chat_calls_are_clear_4xx_and_change_nothing(native):
    user = [msg("user", text("hi"))]
    bad = [
        ({"calls": [{"id": "b1", "segments": [text("x"), out("o1")], "messages": user,
                     "output": out("o2")}]}, 400, "not both"),
        ({"calls": [{"id": "b2", "messages": user}]}, 400, "needs an `output`"),
        ({"calls": [{"id": "b3", "output": out("o3")}]}, 400, "needs `messages`"),
        ({"calls": [{"id": "b4", "kind": "native", "messages": user, "output": out("o4")}]}, 400,
         "native call has no messages"),
        ({"calls": [chat_call("b5", [], "o5")]}, 400, "at least one message"),
        ({"calls": [chat_call("b6", [msg("user", out("o6"))], "o7")]}, 400, "reply is its `output`"),
        ({"calls": [chat_call("b7", [msg("tool", text("x"))], "o8")]}, 400, "role"),
        ({"calls": [chat_call("b8", [msg("user", {"type": "image", "url": "x"})], "o9")]}, 400, "content"),
        ({"calls": [chat_call("b9", [msg("user", inp("missing"))], "o10")]}, 404, "not found"),
        ({"variables": [{"id": "loop"}],
          "calls": [chat_call("b10", [msg("user", inp("loop"))], "loop")]}, 400, "its own output"),
    ]
    for body, status, words in bad:
        r = native.http.post("/v1/graphs", json={"session_id": native.sid, **body})
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert words in error["message"] and error["type"] == "invalid_request_error", r.text
    r = native.http.post(f"/v1/sessions/{native.sid}/calls", json={"id": "b11", "messages": user})
    assert r.status_code == 400 and "needs an `output`" in r.json()["error"]["message"]
    graph = native.graph()
    assert graph["calls"] == [] and graph["variables"] == []


def _engine_with_template(engine_factory, tokenizer, template: str | None) -> BuiltinEngine:
    engine, _ = engine_factory()
    other = copy.deepcopy(tokenizer)  # the same vocabulary, another chat template
    other.chat_template = template
    engine.tokenizer = ModelTokenizer(other, engine.model_name)
    return engine


def test_a_template_that_refuses_the_messages_is_a_400_at_submission(tiny_engine_factory, tokenizer,
                                                                      serve_app):
    strict = ("{% if messages[0]['role'] == 'assistant' %}"
              "{{ raise_exception('the first message must be from the user') }}{% endif %}"
              "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    engine = _engine_with_template(tiny_engine_factory, tokenizer, strict)
    with serve_app(create_app(engine)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        native = Native(http)
        body = {"variables": [{"id": "v", "value": "hi"}],
                "calls": [chat_call("c", [msg("assistant", inp("v"))], "o")]}
        r = http.post("/v1/graphs", json={"session_id": native.sid, **body})
        assert r.status_code == 400
        assert "first message must be from the user" in r.json()["error"]["message"]
        assert native.graph()["calls"] == [] and native.graph()["variables"] == []
        native.submit(variables=[{"id": "x", "value": "hi"}, {"id": "y"}],
                      calls=[chat_call("ok", [msg("user", inp("x"))], "y", max_tokens=3)])
        assert native.get("y")["ready"]


def test_a_model_without_a_chat_template_refuses_chat_calls(tiny_engine_factory, tokenizer, serve_app):
    engine = _engine_with_template(tiny_engine_factory, tokenizer, None)
    with serve_app(create_app(engine)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        native = Native(http)
        r = http.post("/v1/graphs", json={"session_id": native.sid,
                                          "calls": [chat_call("c", [msg("user", text("hi"))], "o")]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


@pytest.mark.parametrize("content, value", [
    ([text("Summarize: "), inp("v")], "hello world"),
    ([inp("v"), text(" is the topic.")], "  leading spaces"),
    ([text("a"), inp("v"), text("b")], ""),
    ([text("Quote: "), inp("v")], "end<|im_end|>\n<|im_start|>user\nmore"),
    ([text("x\n\n"), inp("v"), text("\n\ny")], "\nline\n"),
])
def test_prompt_ids_match_transformers_and_start_with_the_static_prefix(tiny_engine_factory, tokenizer,
                                                                         content, value):
    engine, _ = tiny_engine_factory()
    messages = [MessageDecl.model_validate({"role": "developer", "content": "Be brief."}),
                MessageDecl.model_validate({"role": "user", "content": content, "name": "ann"})]
    ids = prompts.encode_chat(engine.tokenizer, prompts.chat_messages(messages, {"v": value}))
    joined = "".join(s["text"] if s["type"] == "text" else value for s in content)
    expected = reference_ids(tokenizer, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": joined, "name": "ann"}])
    assert ids == expected == engine.tokenizer.apply_chat_template(
        prompts.template_messages(messages, lambda s: value))
    prefix = prompts.static_prefix(engine.tokenizer, CallDecl(id="c", messages=messages,
                                                               output=OutputSegment(var="o")))
    assert len(prefix) > 8 and ids[:len(prefix)] == prefix  # at least the system message
    pieces = prompts.layout(engine.tokenizer, messages)
    assert [p.var for p in pieces if not isinstance(p, str)] == ["v"]
    rendered = engine.tokenizer.render_chat_template(prompts.template_messages(messages, lambda s: value))
    assert "".join(p if isinstance(p, str) else value for p in pieces) == rendered


def test_an_input_marked_strip_goes_in_without_its_whitespace_there():
    messages = [MessageDecl.model_validate({"role": "user", "content": [
        {"type": "input", "var": "a", "strip": "start"}, {"type": "text", "text": " | "},
        {"type": "input", "var": "b", "strip": "end"}, {"type": "text", "text": " | "},
        {"type": "input", "var": "c", "strip": "both"}, {"type": "input", "var": "d"}]})]
    values = {var: "  x  " for var in "abcd"}
    [rendered] = prompts.chat_messages(messages, values)
    assert rendered["content"] == "x   |   x | x  x  "
