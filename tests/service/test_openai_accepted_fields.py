"""Fields the official clients send on /v1/chat/completions and /v1/completions: accepted when
this server honours them (or they change nothing here), a 400 naming the field otherwise."""

from __future__ import annotations

import pytest

CHAT = [{"role": "user", "content": "Hi"}]


def test_include_usage_ends_the_stream_with_a_usage_chunk(live_server):
    client = live_server.client()
    chunks = list(client.chat.completions.create(model=live_server.model, messages=CHAT, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    pieces = list(client.completions.create(model=live_server.model, prompt="Hi", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert pieces[-1].choices == [] and pieces[-1].usage.total_tokens > 0


def test_seed_user_metadata_and_store_false_are_accepted(live_server):
    client = live_server.client()
    kwargs = dict(model=live_server.model, max_tokens=6, temperature=1.0, seed=7, user="u-1",
                  metadata={"team": "a"}, store=False)
    first = client.chat.completions.create(messages=CHAT, **kwargs)
    again = client.chat.completions.create(messages=CHAT, **kwargs)
    assert first.choices[0].message.content == again.choices[0].message.content  # seeded
    with live_server.http() as http:
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "seed": 1, "user": "u",
                                               "metadata": {"k": "v"}, "store": False})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("route", "extra", "field"), [
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"metadata": {"k": 1}}, "metadata"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"modalities": ["audio"]}, "modalities"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"web_search_options": {}}, "web_search_options"),
])
def test_unsupported_fields_are_400_naming_them(live_server, route, extra, field):
    body = {"model": live_server.model, "max_tokens": 2, **extra}
    body.update({"messages": CHAT} if "chat" in route else {"prompt": "Hi"})
    with live_server.http() as http:
        r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"] + str(error.get("param"))
