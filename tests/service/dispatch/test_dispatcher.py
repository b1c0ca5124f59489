"""The one dispatcher serves every face: OpenAI requests get the placement native calls get."""

from __future__ import annotations

import threading

import httpx

from parrot.service.app import create_app

SYSTEM = "You are the support assistant of a hardware store. Answer briefly and politely. " * 3


def chat(question: str, **extra) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "max_tokens": 3, "temperature": 0, **extra}


def test_openai_requests_go_to_the_engine_that_holds_their_prefix(tiny_engine_factory, serve_app):
    first, second = tiny_engine_factory()[0], tiny_engine_factory()[0]
    with serve_app(create_app([first, second])) as url, httpx.Client(base_url=url, timeout=60) as http:
        # A long streamed chat keeps the first engine busy with latency work ...
        streaming = threading.Event()

        def long_chat() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=url, timeout=60) as other, \
                    other.stream("POST", "/v1/completions", json=body) as resp:
                for _ in resp.iter_lines():
                    streaming.set()

        busy = threading.Thread(target=long_chat)
        busy.start()
        assert streaming.wait(30)
        assert first.load().num_running == 1
        # ... so a request with the shared system prompt goes to the second one.
        r = http.post("/v1/chat/completions", json=chat("Do you sell nails?"))
        assert r.status_code == 200, r.text
        assert second.num_steps > 0
        busy.join(60)
        # Both idle now: the same system prompt goes where it is cached, not to the first engine.
        steps = first.num_steps
        r = http.post("/v1/chat/completions", json=chat("Do you sell screws?"))
        assert r.status_code == 200, r.text
        cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= len(second.tokenizer.encode(SYSTEM)) and first.num_steps == steps
