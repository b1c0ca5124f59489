"""n > 1, logprobs, echo, penalties, logit_bias and min_tokens on the OpenAI routes of a live
server (tiny random-weight llama), driven by the official ``openai`` client."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Name a colour."}]
PROMPT = "The quick brown fox"


def chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=CHAT, temperature=0, **kw)


def complete(client, model, prompt=PROMPT, **kw):
    return client.completions.create(model=model, prompt=prompt, temperature=0, **kw)


def forced_token(server) -> tuple[int, str]:
    token = server.engine.tokenizer.encode(" banana")[0]
    return token, server.engine.tokenizer.decode([token])


# ---- logprobs ------------------------------------------------------------------------------


def check_chat_entries(entries, num_top: int, greedy: bool = True) -> None:
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == num_top and tops == sorted(tops, reverse=True)
        assert entry.logprob <= 0 and entry.bytes
        if greedy and num_top:  # the greedy token is the row's most likely one
            assert entry.top_logprobs[0].token == entry.token
            assert entry.logprob == pytest.approx(tops[0])


def test_chat_logprobs_whole_and_streamed(live_server):
    client, model = live_server.client(), live_server.model
    resp = chat(client, model, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    entries = resp.choices[0].logprobs.content
    assert len(entries) == resp.usage.completion_tokens == 6
    check_chat_entries(entries, 3)
    # The tokens' bytes make up the text (a token may hold part of a character).
    assert b"".join(bytes(e.bytes) for e in entries).decode() == resp.choices[0].message.content

    stream = chat(client, model, max_tokens=6, logprobs=True, top_logprobs=3, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    streamed, text = [], ""
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    # (the second request reads its prompt from the cache: the same up to float rounding)
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    assert text == resp.choices[0].message.content

    # logprobs without alternatives; none at all unless asked
    bare = chat(client, model, max_tokens=3, logprobs=True)
    assert len(bare.choices[0].logprobs.content) >= 1
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert chat(client, model, max_tokens=3).choices[0].logprobs is None


def test_completion_logprobs_and_echo(live_server):
    client, model = live_server.client(), live_server.model
    tokenizer = live_server.engine.tokenizer
    prompt_ids = tokenizer.encode(PROMPT)
    resp = complete(client, model, max_tokens=5, logprobs=2, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and logprob == pytest.approx(max(top.values()))
        assert top[token] == pytest.approx(logprob)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    echoed = complete(client, model, max_tokens=5, logprobs=2, echo=True, extra_body={"ignore_eos": True})
    choice = echoed.choices[0]
    assert choice.text == PROMPT + resp.choices[0].text
    elp = choice.logprobs
    n = len(prompt_ids)
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(x is not None for x in elp.token_logprobs[1:])
    assert elp.tokens[n:] == lp.tokens and elp.token_logprobs[n:] == pytest.approx(lp.token_logprobs)
    assert "".join(elp.tokens) == choice.text
    assert echoed.usage.prompt_tokens == n and echoed.usage.completion_tokens == 5

    # Echo without logprobs, with a token-id prompt: the prompt's text comes back decoded.
    plain = complete(client, model, prompt=prompt_ids, max_tokens=3, echo=True)
    assert plain.choices[0].text.startswith(PROMPT) and plain.choices[0].logprobs is None

    # Streamed: the prompt (and its logprobs) in the first chunk, then the output's.
    text, tokens, logprobs = "", [], []
    for chunk in complete(client, model, max_tokens=5, logprobs=2, echo=True, stream=True,
                          extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
    assert text == choice.text and tokens == elp.tokens
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(elp.token_logprobs[1:])


# ---- n > 1 -----------------------------------------------------------------------------------


def test_n_choices_share_the_prompt_whole_and_streamed(live_server):
    client, model = live_server.client(), live_server.model
    prompt = "You are a helpful assistant. " * 12 + "Tell me about the sea."
    prompt_len = len(live_server.engine.tokenizer.encode(prompt))
    before = live_server.engine.scheduler.num_prefill_tokens
    resp = complete(client, model, prompt=prompt, max_tokens=6, n=4, extra_body={"ignore_eos": True})
    # The prompt is prefilled once; the other choices fork from the cached prompt.
    assert live_server.engine.scheduler.num_prefill_tokens - before < prompt_len + 4 * 2
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert len({c.text for c in resp.choices}) == 1  # greedy: all the same
    assert resp.usage.prompt_tokens == prompt_len  # counted once
    assert resp.usage.completion_tokens == 4 * 6

    chats = chat(client, model, max_tokens=5, n=2)
    assert [c.index for c in chats.choices] == [0, 1]
    assert chats.choices[0].message.content == chats.choices[1].message.content
    assert chats.usage.prompt_tokens == len(live_server.engine.tokenizer.apply_chat_template(CHAT))

    texts: dict[int, str] = {}
    chunks = list(chat(client, model, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {0: chats.choices[0].message.content, 1: chats.choices[1].message.content}
    assert chunks[-1].usage.prompt_tokens == chats.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == chats.usage.completion_tokens

    # Two prompts, two choices each: choice i * n + j answers prompt i.
    two = complete(client, model, prompt=["Hello", "Goodbye"], max_tokens=3, n=2)
    singles = [complete(client, model, prompt=p, max_tokens=3).choices[0].text for p in ("Hello", "Goodbye")]
    assert [c.text for c in two.choices] == [singles[0], singles[0], singles[1], singles[1]]


def test_seeded_choices_each_take_their_own_seed(live_server):
    client, model = live_server.client(), live_server.model
    kw = dict(max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    resp = client.completions.create(model=model, prompt=PROMPT, n=3, seed=41, **kw)
    alone = [client.completions.create(model=model, prompt=PROMPT, seed=s, **kw).choices[0].text
             for s in (41, 42, 43)]
    assert [c.text for c in resp.choices] == alone
    assert len(set(alone)) > 1

    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=model, prompt=PROMPT, n=3, seed=41, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == alone


# ---- penalties, bias, min_tokens ---------------------------------------------------------------


def test_logit_bias_forces_a_token_whole_and_streamed(live_server):
    client, model = live_server.client(), live_server.model
    token, text = forced_token(live_server)
    bias = {str(token): 100}
    resp = complete(client, model, max_tokens=4, logit_bias=bias, extra_body={"ignore_eos": True})
    assert resp.choices[0].text == text * 4
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(
        client, model, max_tokens=4, logit_bias=bias, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert streamed == text * 4
    # With logprobs: the forced token is certain.
    lp = chat(client, model, max_tokens=2, logit_bias=bias, logprobs=True).choices[0].logprobs.content
    assert all(e.token == text and math.isclose(e.logprob, 0.0, abs_tol=1e-4) for e in lp)


def test_frequency_penalty_stops_repeats(live_server):
    client, model = live_server.client(), live_server.model
    token, _ = forced_token(live_server)
    engine_ids = live_server.engine.tokenizer.encode
    kw = dict(max_tokens=24, logit_bias={str(token): 20}, extra_body={"ignore_eos": True})
    repeated = complete(client, model, **kw).choices[0].text
    penalized = complete(client, model, frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text
    assert engine_ids(repeated).count(token) >= 20
    assert 1 <= engine_ids(penalized).count(token) <= 8
    streamed = "".join(c.choices[0].text for c in complete(
        client, model, frequency_penalty=2.0, presence_penalty=2.0, stream=True, **kw) if c.choices)
    assert streamed == penalized
    # vLLM's repetition penalty (over prompt and output) also breaks the loop.
    rep = complete(client, model, max_tokens=24, logit_bias={str(token): 20},
                   extra_body={"ignore_eos": True, "repetition_penalty": 50.0}).choices[0].text
    assert engine_ids(rep).count(token) < 20


def test_min_tokens_holds_back_eos(live_server):
    client, model = live_server.client(), live_server.model
    eos = sorted(live_server.engine.eos_token_ids)[0]
    bias = {str(eos): 100}
    short = complete(client, model, max_tokens=10, logit_bias=bias)
    assert short.choices[0].text == "" and short.choices[0].finish_reason == "stop"
    held = complete(client, model, max_tokens=10, logit_bias=bias, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6
    streamed = [c for c in complete(client, model, max_tokens=10, logit_bias=bias, stream=True,
                                    stream_options={"include_usage": True}, extra_body={"min_tokens": 5})]
    assert streamed[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in streamed if c.choices) == held.choices[0].text


# ---- rejections ------------------------------------------------------------------------------


@pytest.mark.parametrize("route,body,field", [
    ("chat", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit, but not a token id
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"999999999": 1}}, "logit_bias"),  # past the vocabulary: the engine says so
    ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 1000}, "n"),
    ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -3}, "frequency_penalty"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty"),
    ("chat", {"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ("completions", {"prompt": ["a", "b", "c"], "n": 100}, "n"),  # 300 generations in one request
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
])
def test_bad_sampling_fields_are_a_400_naming_them(live_server, route, body, field):
    base = {"model": live_server.model, "max_tokens": 4}
    base |= {"messages": CHAT} if route == "chat" else {"prompt": PROMPT}
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    with httpx.Client(base_url=live_server.base_url, timeout=30) as http:
        r = http.post(path, json=base | body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"] or r.json()["error"]["param"] == field, r.text


def test_the_client_raises_a_bad_request_error(live_server):
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        chat(live_server.client(), live_server.model, max_tokens=2, logit_bias={"-4": 1})


def test_tool_replies_carry_logprobs_unless_streamed(live_server):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]
    body = {"model": live_server.model, "messages": CHAT, "max_tokens": 48, "temperature": 0,
            "tools": tools, "tool_choice": "required", "logprobs": True, "top_logprobs": 2}
    with httpx.Client(base_url=live_server.base_url, timeout=30) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        assert len(choice["logprobs"]["content"]) == r.json()["usage"]["completion_tokens"]
        r = http.post("/v1/chat/completions", json=body | {"stream": True})
        assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"], r.text
