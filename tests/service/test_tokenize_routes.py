"""``POST /tokenize`` and ``POST /detokenize`` on a live server (vLLM's request and response shapes)."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tokenize_a_prompt_and_detokenize_it_back(live_server):
    tokenizer = live_server.engine.tokenizer
    with live_server.http() as http:
        r = http.post("/tokenize", json={"model": live_server.model, "prompt": "Hello, world!"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == list(tokenizer.hf.encode("Hello, world!", add_special_tokens=True))
        assert body["count"] == len(body["tokens"])
        assert body["max_model_len"] == live_server.engine.max_context_len
        plain = http.post("/tokenize", json={"prompt": "Hello, world!", "add_special_tokens": False}).json()
        assert plain["tokens"] == tokenizer.encode("Hello, world!")
        back = http.post("/detokenize", json={"model": live_server.model, "tokens": plain["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": "Hello, world!"}


def test_tokenize_messages_counts_what_a_chat_request_costs(live_server):
    client = live_server.client()
    with live_server.http() as http:
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        no_prompt = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
        tools = http.post("/tokenize", json={"messages": MESSAGES, "tools": [WEATHER]}).json()
    assert chat["tokens"] == live_server.engine.tokenizer.apply_chat_template(MESSAGES)
    assert no_prompt["count"] < chat["count"]
    reply = client.chat.completions.create(model=live_server.model, messages=MESSAGES, max_tokens=1)
    assert reply.usage.prompt_tokens == chat["count"]
    with_tools = client.chat.completions.create(model=live_server.model, messages=MESSAGES, tools=[WEATHER],
                                                max_tokens=1)
    assert with_tools.usage.prompt_tokens == tools["count"] > chat["count"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/tokenize", {}, "prompt or messages"),
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, "prompt or messages"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
    ("/tokenize", {"prompt": "x", "bogus": 1}, "bogus"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_bad_tokenize_requests_are_4xx_naming_the_field(live_server, path, body, field):
    with live_server.http() as http:
        r = http.post(path, json=body)
    assert r.status_code in (400, 404, 422), r.text
    error = r.json()["error"]
    assert field in error["message"] + str(error.get("param"))
