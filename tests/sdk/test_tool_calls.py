"""``parrot.tool_calls``: the reply schemas of tool use, and reading replies whole or streamed."""

from __future__ import annotations

import json

import pytest

from parrot.tool_calls import (
    ArgumentsDelta,
    CallStarted,
    ContentDelta,
    FunctionCall,
    FunctionTool,
    ToolReplyStream,
    ToolUse,
    object_parameters,
)

WEATHER = FunctionTool("get_weather", "Weather",
                       {"type": "object", "properties": {"city": {"type": "string"}}})
TIME = FunctionTool("get_time")


def test_schemas_per_tool_choice():
    required = ToolUse((WEATHER, TIME), "required", parallel=False).json_schema()
    calls = required["properties"]["tool_calls"]
    assert calls["minItems"] == 1 and calls["maxItems"] == 1
    assert [o["properties"]["name"]["const"] for o in calls["items"]["anyOf"]] == ["get_weather", "get_time"]
    named = ToolUse((WEATHER, TIME), "get_time").json_schema()["properties"]["tool_calls"]
    assert named["items"]["properties"]["name"] == {"const": "get_time"} and "maxItems" not in named
    auto = ToolUse((WEATHER,), "auto").json_schema()
    assert auto["anyOf"][1]["properties"] == {"content": {"type": "string"}}
    assert auto["anyOf"][0]["properties"]["tool_calls"]["items"]["properties"]["arguments"][
        "additionalProperties"] is False


def test_bad_tool_use_is_a_value_error():
    with pytest.raises(ValueError, match="unique"):
        ToolUse((WEATHER, WEATHER))
    with pytest.raises(ValueError, match="nope"):
        ToolUse((WEATHER,), "nope")
    with pytest.raises(ValueError, match="recursively"):
        object_parameters({"$ref": "#/$defs/a", "$defs": {"a": {"properties": {"x": {"$ref": "#/$defs/a"}}}}})


def test_tools_in_openai_function_format():
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                "parameters": dict(WEATHER.parameters or {})}}
    use = ToolUse.from_openai([weather, {"name": "get_time"}], "required", parallel=False)
    assert use.tools == (WEATHER, TIME)
    assert use == ToolUse((WEATHER, TIME), "required", parallel=False)
    text = use.instructions()
    assert text.startswith("You can call these tools:\n- get_weather: Weather Arguments (JSON schema): ")
    assert text.endswith("(one call).\nYou must call a tool.")
    assert use.instructions(list_tools=False).startswith('To call tools, reply with only {"tool_calls"')
    with pytest.raises(ValueError, match="not a function tool"):
        FunctionTool.from_openai({"type": "file_search"})
    with pytest.raises(ValueError, match="has no name"):
        FunctionTool.from_openai({"type": "function", "function": {"description": "?"}})
    with pytest.raises(ValueError, match="must be a JSON schema object"):
        FunctionTool.from_openai({"name": "f", "parameters": "x"})


def test_refs_are_inlined_and_only_root_definitions_dropped():
    params = {"type": "object", "properties": {"definitions": {"type": "string"}, "p": {"$ref": "#/$defs/P"}},
              "$defs": {"P": {"type": "integer"}}}
    assert object_parameters(params) == {"type": "object", "additionalProperties": False, "properties": {
        "definitions": {"type": "string"}, "p": {"type": "integer"}}}


REPLY = json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\"ris é", "n": [1, {}]}},
                                   {"name": "get_time", "arguments": {}}]}, separators=(", ", ": "),
                   ensure_ascii=False)


@pytest.mark.parametrize("step", [1, 3, 7, len(REPLY)])
def test_streamed_calls_equal_the_whole_reply(step):
    stream, events = ToolReplyStream(), []
    for i in range(0, len(REPLY), step):
        events += stream.feed(REPLY[i:i + step])
    names = [e.name for e in events if isinstance(e, CallStarted)]
    arguments = {}
    for e in events:
        if isinstance(e, ArgumentsDelta):
            arguments[e.index] = arguments.get(e.index, "") + e.text
    whole = ToolUse((WEATHER, TIME)).parse(REPLY).calls
    assert whole == [FunctionCall(n, arguments[i]) for i, n in enumerate(names)]
    assert json.loads(whole[0].arguments) == {"city": "Pa\"ris é", "n": [1, {}]}


def test_text_answers_whole_streamed_and_cut():
    use = ToolUse((WEATHER,))
    text = json.dumps({"content": 'say "hi"\n\u00e9'})
    assert use.parse(text).content == 'say "hi"\n\u00e9' and not use.parse(text).calls
    stream = ToolReplyStream()
    got = "".join(e.text for ch in text for e in stream.feed(ch) if isinstance(e, ContentDelta))
    assert got == 'say "hi"\n\u00e9'
    assert use.parse('{"content": "half an ans').content == "half an ans"  # cut by max_tokens


def test_cut_replies_keep_whole_calls_only():
    use = ToolUse((WEATHER, TIME))
    cut = REPLY[:REPLY.index('"get_time"') + 5]
    assert [c.name for c in use.parse(cut).calls] == ["get_weather"]
    assert use.parse('{"tool_calls": [{"name": "get_wea').content == '{"tool_calls": [{"name": "get_wea'
    assert use.parse("not json at all {").content == "not json at all {"
    unknown = '{"tool_calls": [{"name": "rm_rf", "arguments": {}}]}'
    assert use.parse(unknown).content == unknown and not use.parse(unknown).calls
