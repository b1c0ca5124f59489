"""Every bad request gets a 4xx OpenAI-shaped JSON error, and the server keeps serving."""

from __future__ import annotations

import json
import time

import openai
import pytest

MSG = [{"role": "user", "content": "hi"}]


def wait_until_idle(engine, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.load().num_running or engine.load().num_waiting:
        assert time.monotonic() < deadline, f"still running: {engine.load()}"
        time.sleep(0.02)


def assert_error(resp, status: int, *, code: str | None = None, param: str | None = None,
                 says: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    if says is not None:
        assert says in error["message"], error["message"]
    return error


# (endpoint, body, param the error must name, words the message must contain)
BAD_BODIES = [
    ("/v1/completions", {}, "prompt", "Field required"),
    ("/v1/completions", {"prompt": 3}, "prompt", "prompt must be"),
    ("/v1/completions", {"prompt": []}, "prompt", "prompt must be"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, "max_tokens", "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", "greater than"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "greater than"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "n": 129}, "n", "less than or equal to 128"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "best_of=1"),
    ("/v1/completions", {"prompt": "x", "echo": "loud"}, "echo", "valid boolean"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty",
     "less than or equal to 2"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, "frequency_penalty",
     "greater than or equal to -2"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias", "token ids"),
    ("/v1/completions", {"prompt": "x", "min_tokens": -1}, "min_tokens", "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", ""]}, "stop", "non-empty"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, None,
     "only allowed when stream is true"),
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]},
     "messages[0].role", "Input should be"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0]", "needs content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content", "only text content parts"),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function", "function": {
        "name": "f g"}}]}, "tools[0].function.name", "should match pattern"),
    ("/v1/chat/completions", {"messages": MSG, "tool_choice": "required"}, "tool_choice",
     "only allowed when tools are specified"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "grammar"}},
     "response_format", "does not match any of the expected tags"),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 2}, None,
     "top_logprobs is only allowed when logprobs is true"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "less than or equal to 20"),
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": -1},
     "max_completion_tokens", "greater than or equal"),
]


def test_invalid_parameters_are_400(live_server):
    # One server for all cases: each case is independent, and a server per case costs ~0.5 s.
    with live_server.http() as http:
        for endpoint, body, param, says in BAD_BODIES:
            case = f"{endpoint} {body}"
            try:
                assert_error(http.post(endpoint, json=body), 400, param=param, says=says)
                # The same request as a stream fails the same way, before any event is sent.
                if "stream_options" not in body:
                    assert_error(http.post(endpoint, json={**body, "stream": True}), 400,
                                 param=param)
            except AssertionError as exc:
                raise AssertionError(f"{case}: {exc}") from exc


def test_unknown_parameter_is_named(live_server):
    with live_server.http() as http:
        resp = http.post("/v1/chat/completions", json={"messages": MSG, "frobnicate": 1})
    error = assert_error(resp, 400, code="unsupported_parameter", param="frobnicate")
    assert "'frobnicate'" in error["message"]


@pytest.mark.parametrize("content,says", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"", "must be a JSON object"),
])
def test_malformed_bodies_are_400(live_server, content, says):
    with live_server.http() as http:
        resp = http.post("/v1/completions", content=content,
                         headers={"content-type": "application/json"})
    assert_error(resp, 400, says=says)


def test_unknown_model_is_404_model_not_found(live_server):
    client = live_server.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=MSG, max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_context_length_errors(live_server_factory):
    server = live_server_factory(max_context_len=32)
    client = server.client()
    long_prompt = "one two three four five six seven eight nine ten " * 10
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt=long_prompt, max_tokens=2)
    assert info.value.code == "context_length_exceeded" and "context length" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="hello", max_tokens=100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:  # one of several prompts too long
        client.completions.create(model=server.model, prompt=["hi", long_prompt], max_tokens=2,
                                  stream=True)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, max_tokens=2,
                                       messages=[{"role": "user", "content": long_prompt}])
    assert server.engine.load().num_running == 0


def test_engine_rejections_are_400(live_server):
    """Requests only the engine can judge: an empty prompt, token ids outside the vocabulary."""
    client = live_server.client()
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model=live_server.model, prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model=live_server.model, prompt=[1, 10**9], max_tokens=2)
    # Streaming: still a 400, and the valid sibling prompt, already submitted, is aborted.
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model=live_server.model, prompt=[[1, 2], [-1]], max_tokens=1500,
                                  stream=True, extra_body={"ignore_eos": True})
    wait_until_idle(live_server.engine)
    assert live_server.engine.num_steps < 500


def test_engine_failure_is_a_500_json_error(live_server, monkeypatch, metric):
    """A failing model step (injected into the real engine) fails its requests, not the server."""
    client = live_server.client()
    runner = live_server.engine.runner
    forward = runner.forward
    calls = {"left": 0}

    def flaky_forward(*args, **kwargs):  # fails after ``calls["left"]`` good steps
        calls["left"] -= 1
        if calls["left"] < 0:
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner, "forward", flaky_forward)
    # Failing at once: a 500 before any byte of the response, streaming or not.
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=live_server.model, prompt="hello", max_tokens=3)
    assert info.value.code == "engine_error" and "injected fault" in info.value.message
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=live_server.model, messages=MSG, stream=True)
    # Failing mid-stream: the stream ends with an error event, then [DONE].
    calls["left"] = 3
    with live_server.http() as http:
        resp = http.post("/v1/chat/completions", json={"messages": MSG, "stream": True,
                                                         "max_tokens": 20, "ignore_eos": True})
        assert resp.status_code == 200
        events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line]
        assert events[-1] == "[DONE]" and "injected fault" in events[-2]
        assert json.loads(events[-2])["error"]["type"] == "server_error"
        assert json.loads(events[1])["choices"][0]["delta"]["content"]  # tokens came first
        assert metric(http.get("/metrics").text, "parrot_requests_total",
                      endpoint="chat.completions", finish_reason="error") == 2
    monkeypatch.undo()
    resp = client.completions.create(model=live_server.model, prompt="hello", max_tokens=3)
    assert resp.choices[0].text


def test_unknown_routes_and_methods_are_json(live_server):
    with live_server.http() as http:
        missing = http.get("/v1/nothing-here")
        wrong_method = http.get("/v1/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_server_keeps_serving_after_errors(live_server):
    with live_server.http() as http:
        for body in ({"prompt": 3}, {"prompt": "x", "n": 0}, {"model": "nope", "prompt": "x"}):
            assert 400 <= http.post("/v1/completions", json=body).status_code < 500
        http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    resp = live_server.client().completions.create(model=live_server.model, prompt="Still there?",
                                                   max_tokens=3)
    assert resp.choices[0].text and resp.usage.completion_tokens <= 3
    assert live_server.engine.load().num_running == 0
