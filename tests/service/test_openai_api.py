"""The OpenAI-compatible API on a real server, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio

import pytest
import torch

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


def complete(client, model, prompt, *, ignore_eos=False, **kw):
    extra = {"extra_body": {"ignore_eos": True}} if ignore_eos else {}
    return client.completions.create(model=model, prompt=prompt, temperature=0, **extra, **kw)


def chat(client, model, messages=CHAT, **kw):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def test_models_lists_and_retrieves_the_served_model(live_server):
    client = live_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [live_server.model]
    assert models.data[0].max_model_len == live_server.engine.max_context_len
    assert client.models.retrieve(live_server.model).id == live_server.model


def test_completion_returns_text_usage_and_finish_reason(live_server):
    client = live_server.client()
    resp = complete(client, live_server.model, "The quick brown fox", max_tokens=6, ignore_eos=True)
    prompt_len = len(live_server.engine.tokenizer.encode("The quick brown fox"))
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.model == live_server.model
    [choice] = resp.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.usage.completion_tokens == 6
    assert resp.usage.total_tokens == prompt_len + 6
    assert resp.usage.prompt_tokens_details.cached_tokens == 0  # a fresh server: nothing cached


def test_completion_is_deterministic_and_accepts_token_ids(live_server):
    client = live_server.client()
    text = complete(client, live_server.model, "Once upon a time", max_tokens=8).choices[0].text
    again = complete(client, live_server.model, "Once upon a time", max_tokens=8).choices[0].text
    ids = live_server.engine.tokenizer.encode("Once upon a time")
    by_ids = complete(client, live_server.model, ids, max_tokens=8).choices[0].text
    assert text == again == by_ids


def test_second_identical_request_reports_cached_tokens(live_server):
    client = live_server.client()
    first = chat(client, live_server.model, max_tokens=4)
    second = chat(client, live_server.model, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= second.usage.prompt_tokens
    assert second.choices[0].message.content == first.choices[0].message.content


def test_chat_completion(live_server):
    resp = chat(live_server.client(), live_server.model, max_tokens=5,
                extra_body={"ignore_eos": True})
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    [choice] = resp.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    ids = live_server.engine.tokenizer.apply_chat_template(CHAT)
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 5


def test_chat_accepts_text_parts_and_max_completion_tokens(live_server):
    client = live_server.client()
    plain = chat(client, live_server.model, messages=[{"role": "user", "content": "Hi there"}],
                 max_tokens=5)
    parts = chat(client, live_server.model, max_completion_tokens=5, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.completion_tokens == plain.usage.completion_tokens


def test_list_prompt_gives_one_choice_per_prompt(live_server):
    client = live_server.client()
    prompts = ["The capital of France", "def fib(n):", "Roses are red"]
    singles = [complete(client, live_server.model, p, max_tokens=6) for p in prompts]
    multi = complete(client, live_server.model, prompts, max_tokens=6)
    assert [c.index for c in multi.choices] == [0, 1, 2]
    assert [c.text for c in multi.choices] == [s.choices[0].text for s in singles]
    assert multi.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert multi.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_list_of_token_id_prompts(live_server):
    client = live_server.client()
    ids = [live_server.engine.tokenizer.encode(p) for p in ("Hello world", "Good morning")]
    by_text = complete(client, live_server.model, ["Hello world", "Good morning"], max_tokens=4)
    by_ids = complete(client, live_server.model, ids, max_tokens=4)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]


def test_stop_string_cuts_the_text(live_server):
    client = live_server.client()
    full = complete(client, live_server.model, "Tell me a story", max_tokens=24, ignore_eos=True)
    text = full.choices[0].text
    # A stop string from the middle of the greedy text; the output must end right before it.
    start = len(text) // 2
    stop = text[start:start + 3]
    assert stop.strip() and "\ufffd" not in stop, f"unusable stop string {stop!r} from {text!r}"
    cut = complete(client, live_server.model, "Tell me a story", max_tokens=24, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=live_server.model, prompt="Tell me a story",
                                         max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_streamed_completion_equals_non_streamed(live_server):
    client = live_server.client()
    whole = complete(client, live_server.model, "In a distant galaxy", max_tokens=12)
    chunks = list(client.completions.create(
        model=live_server.model, prompt="In a distant galaxy", max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_chat_equals_non_streamed(live_server):
    client = live_server.client()
    whole = chat(client, live_server.model, max_tokens=10)
    chunks = list(client.chat.completions.create(
        model=live_server.model, messages=CHAT, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_streamed_chat_usage_chunk(live_server):
    chunks = list(live_server.client().chat.completions.create(
        model=live_server.model, messages=CHAT, max_tokens=3, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 3


def test_streamed_list_prompt_streams_every_choice(live_server):
    client = live_server.client()
    prompts = ["First prompt here", "Second one"]
    whole = complete(client, live_server.model, prompts, max_tokens=6)
    texts = ["", ""]
    finish = [None, None]
    for c in client.completions.create(model=live_server.model, prompt=prompts, max_tokens=6,
                                       temperature=0, stream=True):
        texts[c.choices[0].index] += c.choices[0].text
        finish[c.choices[0].index] = finish[c.choices[0].index] or c.choices[0].finish_reason
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]


def test_default_max_tokens_is_the_rest_of_the_context(live_server_factory):
    server = live_server_factory(max_context_len=24)
    resp = server.client().completions.create(model=server.model, prompt="Hi", temperature=0,
                                              extra_body={"ignore_eos": True})
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == 24
    assert resp.choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible(live_server):
    client = live_server.client()
    kw = dict(model=live_server.model, prompt="Pick a word:", max_tokens=8, temperature=1.0,
              top_p=0.9, seed=1234, extra_body={"top_k": 50})
    assert (client.completions.create(**kw).choices[0].text
            == client.completions.create(**kw).choices[0].text)


def test_stop_token_ids_end_generation(live_server):
    ids = live_server.engine.tokenizer.encode("Count: one two")
    with torch.no_grad():
        first = int(live_server.hf_model(torch.tensor([ids])).logits[0, -1].argmax())
    resp = live_server.client().completions.create(
        model=live_server.model, prompt=ids, max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [first]})
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 1


async def test_async_client_concurrent_requests(live_server):
    prompts = [f"Story number {i}:" for i in range(4)]
    async with live_server.async_client() as client:
        sequential = [(await client.completions.create(
            model=live_server.model, prompt=p, max_tokens=6, temperature=0)).choices[0].text
            for p in prompts]
        concurrent = await asyncio.gather(*(client.completions.create(
            model=live_server.model, prompt=p, max_tokens=6, temperature=0) for p in prompts))
    assert [r.choices[0].text for r in concurrent] == sequential


async def test_async_client_streaming_chat(live_server):
    async with live_server.async_client() as client:
        whole = await client.chat.completions.create(model=live_server.model, messages=CHAT,
                                                     max_tokens=8, temperature=0)
        stream = await client.chat.completions.create(model=live_server.model, messages=CHAT,
                                                      max_tokens=8, temperature=0, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == whole.choices[0].message.content


@pytest.mark.parametrize("payload", [
    # What langchain-openai's ChatOpenAI sends by default (older and newer releases).
    {"stream": False, "n": 1, "temperature": 0.7},
    {"stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 4},
    # Semantic Kernel / explicit neutral values.
    {"frequency_penalty": 0.0, "presence_penalty": 0.0, "logit_bias": {}, "top_p": 1.0, "n": 1,
     "logprobs": False, "user": "me", "response_format": {"type": "text"}, "tool_choice": "none",
     "seed": 3},
])
def test_neutral_client_defaults_are_accepted(live_server, payload):
    body = {"model": live_server.model, "messages": CHAT, "max_tokens": 4, **payload}
    with live_server.http() as http:
        resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    if payload.get("stream"):
        assert resp.text.rstrip().endswith("data: [DONE]")
    else:
        assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
