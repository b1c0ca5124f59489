"""ParrotLLM against a live service on a tiny random-weight model."""

from __future__ import annotations

import json

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from openai import OpenAI

from parrot.integrations.langchain import ParrotLLM

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three colors:"]


def llm(service, **fields) -> ParrotLLM:
    return ParrotLLM(base_url=service.url, **{"max_tokens": 10, **fields})


class Ends(BaseCallbackHandler):
    def __init__(self) -> None:
        self.texts: list[str] = []

    def on_llm_end(self, response, **kwargs) -> None:
        self.texts += [g[0].text for g in response.generations]


def test_batch_is_one_graph_of_template_calls_equal_to_the_completions_route(service):
    handler = Ends()
    texts = llm(service).batch(PROMPTS, {"callbacks": [handler]})
    [graph] = [r.body for r in service.requests("POST", "/v1/graphs")]
    assert [c["segments"][0] for c in graph["calls"]] == [{"type": "text", "text": p} for p in PROMPTS]
    assert all(c["segments"][1]["type"] == "output" for c in graph["calls"])
    assert service.sessions_opened() == 1
    client = OpenAI(base_url=f"{service.url}/v1", api_key="none", max_retries=0)
    reference = client.completions.create(model=service.model, prompt=PROMPTS, max_tokens=10, temperature=0)
    assert texts == [c.text for c in sorted(reference.choices, key=lambda c: c.index)]
    assert sorted(handler.texts) == sorted(texts)  # one run per prompt


def test_generate_reports_usage_and_finish_reasons(service):
    result = llm(service, max_tokens=7).generate(PROMPTS[:2])
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == 14 and usage["total_tokens"] == usage["prompt_tokens"] + 14
    assert usage["prompt_tokens"] == sum(len(service.engine.tokenizer.encode(p)) for p in PROMPTS[:2])
    assert result.llm_output["model_name"] == service.model
    assert [g[0].generation_info["finish_reason"] for g in result.generations] == ["length", "length"]


async def test_stream_astream_and_agenerate_agree_with_invoke(service):
    model = llm(service, max_tokens=24)
    text = model.invoke(PROMPTS[0])
    assert "".join(model.stream(PROMPTS[0])) == text
    assert "".join([c async for c in model.astream(PROMPTS[0])]) == text
    result = await model.agenerate([PROMPTS[0], PROMPTS[1]])
    assert result.generations[0][0].text == text


def test_per_call_options_and_constrained_output(service):
    model = llm(service, max_tokens=40)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    assert isinstance(json.loads(model.invoke("JSON:", json_schema=schema))["ok"], bool)
    sampling = [r.body["calls"][0]["segments"][1]["sampling"] for r in service.requests("POST", "/v1/graphs")]
    assert sampling[0]["json_schema"] == schema
    model.invoke("Hi", stop=["x"], max_tokens=3, seed=1)
    sampling = [r.body["calls"][0]["segments"][1]["sampling"] for r in service.requests("POST", "/v1/graphs")]
    assert (sampling[1]["stop"], sampling[1]["max_tokens"], sampling[1]["seed"]) == (["x"], 3, 1)
    with pytest.raises(ValueError, match="unsupported parameters for ParrotLLM: logprobs"):
        model.invoke("Hi", logprobs=True)
