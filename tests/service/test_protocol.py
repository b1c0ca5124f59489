"""The OpenAI wire schemas as plain pydantic: what they accept, what they reject, how they dump."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from parrot.service.api.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionStreamChoice,
    CompletionRequest,
    DeltaMessage,
)
from parrot.service.errors import validation_error_info

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_shapes(prompt):
    assert CompletionRequest(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [True, 2], [[1], "a"], {"a": 1}, None])
def test_bad_prompt_shapes_get_one_clear_error(prompt):
    with pytest.raises(ValidationError) as info:
        CompletionRequest(prompt=prompt)
    [error] = info.value.errors()
    assert "prompt must be" in error["msg"]


def test_defaults_and_aliases():
    req = ChatCompletionRequest(messages=[USER], max_tokens=9)
    assert req.temperature is None and req.n == 1 and not req.stream and req.model is None
    assert req.max_output_tokens == 9
    assert ChatCompletionRequest(messages=[USER], max_tokens=9,
                                 max_completion_tokens=4).max_output_tokens == 4
    assert CompletionRequest(prompt="x", stop="###").stop_list == ["###"]
    assert CompletionRequest(prompt="x").stop_list == []


def test_message_content_parts_and_roles():
    msg = ChatCompletionRequest(messages=[{"role": "developer", "name": "ops", "content": [
        {"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]}]).messages[0]
    assert msg.to_template_dict() == {"role": "system", "content": "line one\nline two",
                                      "name": "ops"}
    assistant = ChatCompletionRequest(messages=[USER, {"role": "assistant", "content": None}])
    assert assistant.messages[1].to_template_dict() == {"role": "assistant", "content": ""}


def test_unknown_fields_are_named():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(messages=[USER], reasoning_effort="high")
    error = validation_error_info([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])
    assert error.param == "reasoning_effort" and error.code == "unsupported_parameter"


@pytest.mark.parametrize("extra", [
    {"n": 0}, {"presence_penalty": 2.5}, {"frequency_penalty": -2.1}, {"logit_bias": {"one": 1}},
    {"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 3}, {"tools": [{"type": "function"}]},
    {"functions": [{"name": "f"}]}, {"tool_choice": "required"}, {"function_call": "auto"},
    {"response_format": {"type": "json_schema"}}, {"stop": ""}, {"temperature": 2.5},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
    {"stream": True, "stream_options": {"continuous_usage_stats": True}},
])
def test_unsupported_values_are_rejected(extra):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**{"messages": [USER], **extra})


def test_neutral_values_are_accepted():
    ChatCompletionRequest(messages=[USER], n=1, presence_penalty=0, frequency_penalty=0.0,
                          logit_bias={}, logprobs=False, top_logprobs=0, tools=[],
                          tool_choice="none", response_format={"type": "text"},
                          parallel_tool_calls=True, user="u", seed=1, top_k=-1, stop_token_ids=[2],
                          ignore_eos=None)
    CompletionRequest(prompt="x", best_of=1, echo=False, suffix=None, logprobs=None)


def test_stream_delta_carries_only_what_changed():
    first = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))
    last = ChatCompletionStreamChoice(index=0, delta=DeltaMessage(), finish_reason="stop")
    assert json.loads(first.model_dump_json())["delta"] == {"role": "assistant", "content": ""}
    dumped = json.loads(last.model_dump_json())
    assert dumped["delta"] == {} and dumped["finish_reason"] == "stop"
