"""LangChain messages → chat call messages, and tool / structured-output schemas (no service)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import pytest
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel
from typing_extensions import TypedDict

import parrot as P
from parrot.chat_call import prepare_chat
from parrot.integrations.common.json_schemas import with_instructions
from parrot.integrations.langchain.constrained import (
    bound_tool_use,
    output_json_schema,
    parse_reply,
    response_format_schema,
)
from parrot.integrations.langchain.messages import to_chat_messages
from parrot.schemas import InputSegment


@tool
def lookup(city: str, days: int = 1) -> str:
    """Look up the weather."""
    return "sunny"


@tool
def ping() -> str:
    """Ping."""
    return "pong"


def texts(messages):
    return [(m["role"], "".join(m["content"]), m.get("name")) for m in messages]


def test_every_message_kind_becomes_a_chat_template_role():
    messages = [
        SystemMessage("Be brief."),
        HumanMessage([{"type": "text", "text": "Hi"}, "there"], name="ann"),
        AIMessage([{"type": "text", "text": "Let me check."},
                   {"type": "tool_use", "id": "c1", "name": "lookup", "input": {"city": "Oslo"}}],
                  tool_calls=[{"name": "lookup", "args": {"city": "Oslo"}, "id": "c1"}]),
        ToolMessage("sunny", tool_call_id="c1", name="lookup"),
        ToolMessage("timeout", tool_call_id="c2", status="error"),
        FunctionMessage("42", name="answer"),
        ChatMessage("Use tools wisely.", role="developer"),
        AIMessage("Done."),
    ]
    assert texts(to_chat_messages(messages)) == [
        ("system", "Be brief.", None),
        ("user", "Hi\nthere", "ann"),
        ("assistant",
         'Let me check.\n{"tool_calls": [{"name": "lookup", "arguments": {"city": "Oslo"}}]}', None),
        ("user", "Tool lookup returned: sunny", None),
        ("user", "Tool c2 failed: timeout", None),
        ("user", "Tool answer returned: 42", None),
        ("developer", "Use tools wisely.", None),
        ("assistant", "Done.", None),
    ]


def test_non_text_content_and_unknown_roles_are_refused_by_name():
    with pytest.raises(ValueError, match=r"message 1 \(HumanMessage\) has a 'image_url' content block"):
        image = {"type": "image_url", "image_url": {"url": "u"}}
        to_chat_messages([SystemMessage("x"), HumanMessage([image])])
    with pytest.raises(ValueError, match="role 'critic'"):
        to_chat_messages([ChatMessage("hm", role="critic")])


def test_split_puts_variables_into_the_messages():
    doc = P.SemanticVariable(name="doc")

    def split(text: str) -> list:
        head, found, tail = text.partition("{doc}")
        return [head, doc, tail] if found else [text]

    messages = [SystemMessage("Summarize."), HumanMessage("Text: {doc}!")]
    call = prepare_chat(to_chat_messages(messages, split=split))
    user = call.decl.messages[1]
    assert [type(s).__name__ for s in user.content] == ["TextSegment", "InputSegment", "TextSegment"]
    assert isinstance(user.content[1], InputSegment) and user.content[1].var == doc.id
    assert call.inputs == [doc]


def calls_schema(schema):
    """The schema of a reply's calls (``tool_calls``), from a required or an auto reply schema."""
    return (schema["anyOf"][0] if "anyOf" in schema else schema)["properties"]["tool_calls"]


def test_tool_choices_make_the_reply_schema():
    forced = bound_tool_use([lookup, ping], "lookup")
    calls = calls_schema(forced.json_schema())
    assert (calls["minItems"], calls["maxItems"]) == (1, 1)  # one call per reply unless parallel
    call = calls["items"]
    assert call["properties"]["name"] == {"const": "lookup"}
    assert call["properties"]["arguments"]["additionalProperties"] is False
    assert list(call["properties"]) == ["name", "arguments"]  # the name is written first
    options = calls_schema(bound_tool_use([lookup, ping], "any").json_schema())["items"]["anyOf"]
    assert [o["properties"]["name"]["const"] for o in options] == ["lookup", "ping"]
    auto = bound_tool_use([lookup], None).json_schema()
    assert [list(o["properties"]) for o in auto["anyOf"]] == [["tool_calls"], ["content"]]
    assert bound_tool_use([lookup], "none") is None
    assert bound_tool_use([lookup], {"type": "function", "function": {"name": "lookup"}}).choice == "lookup"
    assert bound_tool_use([lookup], True).choice == "required"
    parallel = calls_schema(bound_tool_use([lookup, ping], "any", parallel_tool_calls=True).json_schema())
    assert parallel["minItems"] == 1 and "maxItems" not in parallel
    with pytest.raises(ValueError, match="'nope' is not one of the bound tools"):
        bound_tool_use([lookup], "nope")
    text = bound_tool_use([lookup, ping], "any").instructions()
    assert "lookup: Look up the weather." in text and "You must call a tool." in text
    assert "(one call)" in text
    assert "(one or more calls)" in bound_tool_use([lookup], "any", True).instructions()


def test_tools_of_one_name_must_be_one_tool():
    class Person(BaseModel):
        """A person."""

        name: str

    # A pydantic class and its JSON schema differ in titles only: one tool.
    use = bound_tool_use([Person, Person.model_json_schema()], "any")
    assert [t.name for t in use.tools] == ["Person"]
    other = {"title": "Person", "description": "A person.", "type": "object",
             "properties": {"age": {"type": "integer"}}}
    with pytest.raises(ValueError, match="two different tools are named 'Person'"):
        bound_tool_use([Person, other], "any")


def test_replies_parse_into_tool_calls_answers_or_invalid_calls():
    use = bound_tool_use([lookup], "auto")
    whole = '{"tool_calls": [{"name": "lookup", "arguments": {"city": "Oslo"}}]}'
    [call] = parse_reply(use, whole, "stop").tool_calls
    assert (call["name"], call["args"], call["id"].startswith("call_")) == ("lookup", {"city": "Oslo"}, True)
    assert parse_reply(use, '{"content": "It is sunny."}', "stop").content == "It is sunny."
    # Cut short: the text so far.
    assert parse_reply(use, '{"content": "It is su', "length").content == "It is su"
    cut = '{"tool_calls": [{"name": "lookup", "arguments": {"ci'
    reply = parse_reply(use, cut, "length")
    [invalid] = reply.invalid_tool_calls
    assert not reply.tool_calls and not reply.content
    assert invalid["name"] == "lookup" and "finish_reason: length" in invalid["error"]
    assert json.loads(json.dumps(invalid["args"])) == cut
    [nameless] = parse_reply(use, '{"tool_c', "length").invalid_tool_calls
    assert nameless["name"] is None
    # Parallel calls: the complete ones are kept, the one cut short is invalid.
    both = bound_tool_use([lookup, ping], "any", parallel_tool_calls=True)
    text = '{"tool_calls": [{"name": "ping", "arguments": {}}, {"name": "lookup", "arguments": {"city": "O'
    reply = parse_reply(both, text, "length")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("ping", {})]
    assert [c["name"] for c in reply.invalid_tool_calls] == ["lookup"]
    text = ('{"tool_calls": [{"name": "ping", "arguments": {}}, '
            '{"name": "lookup", "arguments": {"city": "Oslo"}}]}')
    reply = parse_reply(both, text, "stop")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("ping", {}), ("lookup", {"city": "Oslo"})]
    assert not reply.invalid_tool_calls and len({c["id"] for c in reply.tool_calls}) == 2


def test_instructions_join_the_first_system_message():
    messages = to_chat_messages([SystemMessage("Be brief."), HumanMessage("Hi")])
    joined = with_instructions(messages, "TOOLS")
    assert joined[0]["content"] == ["Be brief.", "\n\nTOOLS"] and len(joined) == 2
    assert with_instructions(messages[1:], "TOOLS")[0] == {"role": "system", "content": ["TOOLS"]}


class Pet(BaseModel):
    name: str
    kind: Literal["cat", "dog"]


class PetDict(TypedDict):
    """A pet."""

    name: Annotated[str, ..., "its name"]


def test_structured_output_schemas():
    assert output_json_schema(Pet)["properties"]["kind"]["enum"] == ["cat", "dog"]
    assert output_json_schema(PetDict)["required"] == ["name"]
    raw = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert output_json_schema(raw) == raw  # a JSON schema without a title is taken as it is
    spec = {"name": "pet", "schema": raw}
    assert output_json_schema(spec) == raw
    assert response_format_schema({"type": "json_object"}) == {"type": "object"}
    assert response_format_schema({"type": "json_schema", "json_schema": spec}) == raw
    assert response_format_schema({"type": "text"}) is None
    with pytest.raises(ValueError, match="'image'"):
        response_format_schema({"type": "image"})
