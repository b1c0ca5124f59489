"""``ParrotChatCompletion``: a Semantic Kernel chat connector whose requests run as Parrot chat calls.

A request's chat history becomes the messages of one native chat call (``prepare_chat_call``),
rendered by the service with the model's chat template exactly as ``/v1/chat/completions``
renders the same messages. The service knows the roles ``system``, ``developer``, ``user`` and
``assistant``; SK's other contents are written in those terms, as text the model can read:

- an assistant's ``FunctionCallContent`` items are the JSON the model writes for calls,
  ``{"tool_calls": [{"name": "<plugin>-<function>", "arguments": {...}}, ...]}``
  (``parrot.tool_calls``), after the text;
- a ``FunctionResultContent`` (SK puts them in ``tool`` messages, which become ``user``
  messages) is ``Tool <plugin>-<function> returned: <result>`` (a result that is not text as JSON);
- several text items of one message are joined with newlines (as the OpenAI routes join text
  parts); reasoning, annotations and file references carry no prompt text and are left out;
- images, audio and other binary contents are refused (``ServiceInvalidRequestError``).

Function calling and structured output are constrained decoding (see ``settings``); a reply
that calls a function carries one ``FunctionCallContent`` (with a fresh id, its plugin and
function names split as SK expects), so SK's auto-invoke loop runs the kernel function and
asks again with the result in the history.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

from semantic_kernel.connectors.ai.chat_completion_client_base import ChatCompletionClientBase
from semantic_kernel.connectors.ai.function_call_choice_configuration import FunctionCallChoiceConfiguration
from semantic_kernel.connectors.ai.function_choice_type import FunctionChoiceType
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.contents import (
    AnnotationContent,
    AuthorRole,
    ChatHistory,
    ChatMessageContent,
    FileReferenceContent,
    FinishReason,
    FunctionCallContent,
    FunctionResultContent,
    ReasoningContent,
    StreamingAnnotationContent,
    StreamingChatMessageContent,
    StreamingFileReferenceContent,
    StreamingTextContent,
    TextContent,
)
from semantic_kernel.exceptions import ServiceInvalidRequestError
from semantic_kernel.utils.telemetry.model_diagnostics.decorators import (
    trace_chat_completion,
    trace_streaming_chat_completion,
)

from parrot.chat_call import prepare_chat
from parrot.integrations.common.calls import CallOutcome
from parrot.integrations.common.json_schemas import with_instructions
from parrot.integrations.common.placeholders import Part, Placeholders
from parrot.integrations.semantic_kernel.connector import ParrotServiceBase, completion_usage
from parrot.integrations.semantic_kernel.settings import (
    ParrotPromptExecutionSettings,
    sampling_config,
    tool_instructions,
    tool_use,
    update_settings_from_function_choice,
)
from parrot.sdk import PreparedCall
from parrot.tool_calls import ToolUse, call_message_json

if sys.version_info >= (3, 12):
    from typing import override  # pragma: no cover
else:
    from typing_extensions import override  # pragma: no cover

SettingsCallback = Callable[
    [FunctionCallChoiceConfiguration, PromptExecutionSettings, FunctionChoiceType], None]
_ROLES = {AuthorRole.SYSTEM: "system", AuthorRole.DEVELOPER: "developer", AuthorRole.USER: "user",
          AuthorRole.ASSISTANT: "assistant", AuthorRole.TOOL: "user"}
# Contents that carry no prompt text: the model's own scratch work, citations, file handles.
_SILENT = (ReasoningContent, AnnotationContent, FileReferenceContent, StreamingAnnotationContent,
           StreamingFileReferenceContent)


class ParrotChatCompletion(ParrotServiceBase, ChatCompletionClientBase):
    """A chat model served by Parrot, through its native API. Swap it in for ``OpenAIChatCompletion``::

        from parrot.integrations.semantic_kernel import ParrotChatCompletion

        kernel.add_service(ParrotChatCompletion(base_url="http://127.0.0.1:8000"))
        kernel.add_service(ParrotChatCompletion())   # no base_url: the default model in-process

    Replies carry ``ai_model_id`` (the served model's name), ``finish_reason``, and
    ``metadata["usage"]`` (a ``CompletionUsage``; prompt tokens read from the prefix cache are
    ``prompt_tokens_details.cached_tokens``). Streams yield text deltas, then a last chunk with
    the usage; a reply that may call a function streams as one chunk (a call is known once
    complete). Settings: ``ParrotPromptExecutionSettings``.
    """

    SUPPORTS_FUNCTION_CALLING: ClassVar[bool] = True

    # -- the native call -------------------------------------------------------------------------

    def prepare_chat_call(self, chat_history: ChatHistory, settings: PromptExecutionSettings,
                          placeholders: Placeholders | None = None) -> PreparedCall:
        """The native chat call for ``chat_history`` under ``settings``, not submitted.

        Message text holding placeholders that ``placeholders`` knows becomes input segments
        (the variables the placeholders stand for); everything else is static text. Tools come
        from ``settings.tools`` / ``tool_choice`` (SK fills them from the function choice
        behavior): they are described in the first system message (a new one if there is none)
        and constrain the reply. Raises ``ServiceInvalidRequestError`` for a history that cannot
        be sent and ``ServiceInvalidExecutionSettingsError`` for settings that cannot be honoured.
        """
        settings = self.parrot_settings(settings)
        sampling = sampling_config(settings)
        # SK strips a rendered prompt's text (``ChatHistory.from_rendered_prompt``): a reply that
        # starts or ends a message would have lost its whitespace there, so it does here too.
        split = None if placeholders is None else partial(placeholders.split, strip_edges=True)
        messages = chat_messages(chat_history, split)
        instructions = tool_instructions(settings)
        if instructions is not None:
            messages = with_instructions(messages, instructions)
        return prepare_chat(messages, name="chat", sampling=sampling)

    # -- SK's hooks ------------------------------------------------------------------------------

    @override
    @trace_chat_completion(ParrotServiceBase.MODEL_PROVIDER_NAME)
    async def _inner_get_chat_message_contents(self, chat_history: ChatHistory,
                                               settings: PromptExecutionSettings) -> list[ChatMessageContent]:
        settings = self.parrot_settings(settings)
        result, model_name = await self.run_call(
            lambda placeholders: self.prepare_chat_call(chat_history, settings, placeholders), settings)
        items, finish_reason = reply_contents(result, model_name, tool_use(settings))
        return [ChatMessageContent(role=AuthorRole.ASSISTANT, items=items, ai_model_id=model_name,
                                   finish_reason=finish_reason, inner_content=result,
                                   metadata=_metadata(result, model_name))]

    @override
    @trace_streaming_chat_completion(ParrotServiceBase.MODEL_PROVIDER_NAME)
    async def _inner_get_streaming_chat_message_contents(
            self, chat_history: ChatHistory, settings: PromptExecutionSettings,
            function_invoke_attempt: int = 0) -> AsyncGenerator[list[StreamingChatMessageContent], Any]:
        settings = self.parrot_settings(settings)
        tools = tool_use(settings)

        def build(placeholders: Placeholders | None) -> PreparedCall:
            return self.prepare_chat_call(chat_history, settings, placeholders)

        def chunk(model_name: str, items: list[Any], **fields: Any) -> list[StreamingChatMessageContent]:
            # Every chunk of a reply has choice 0 and the same model, so SK can add them together.
            return [StreamingChatMessageContent(role=AuthorRole.ASSISTANT, choice_index=0, items=items,
                                                ai_model_id=model_name,
                                                function_invoke_attempt=function_invoke_attempt, **fields)]

        if tools is not None:  # a call is known once complete: one chunk
            result, model_name = await self.run_call(build, settings)
            items, finish_reason = reply_contents(result, model_name, tools, streaming=True)
            yield chunk(model_name, items, finish_reason=finish_reason, inner_content=result,
                        metadata=_metadata(result, model_name))
            return
        async for model_name, item in self.stream_call(build, settings):
            if isinstance(item, str):
                delta = StreamingTextContent(choice_index=0, text=item, ai_model_id=model_name)
                yield chunk(model_name, [delta])
            else:  # the last chunk: no text, the usage and finish reason (as OpenAI's stream ends)
                yield chunk(model_name, [], finish_reason=_finish_reason(item), inner_content=item,
                            metadata=_metadata(item, model_name))

    @override
    def _update_function_choice_settings_callback(self) -> SettingsCallback:
        return update_settings_from_function_choice

    @override
    def _reset_function_choice_settings(self, settings: PromptExecutionSettings) -> None:
        if isinstance(settings, ParrotPromptExecutionSettings):
            settings.tools = None
            settings.tool_choice = None


# -- chat history → messages -----------------------------------------------------------------------

def chat_messages(chat_history: ChatHistory,
                  split: Callable[[str], Sequence[Part]] | None = None) -> list[dict[str, Any]]:
    """The history as ``prepare_chat`` takes it (see the module docs); ``split`` maps each message's
    text to its parts, strings and semantic variables."""
    if not chat_history.messages:
        raise ServiceInvalidRequestError("the chat history is empty: a Parrot chat request needs a message")
    messages = []
    for index, message in enumerate(chat_history.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise ServiceInvalidRequestError(f"message {index} has role {message.role!r}, which a Parrot "
                                             "chat request cannot send")
        text = _message_text(message, f"message {index} ({message.role.value})")
        entry: dict[str, Any] = {"role": role, "content": list(split(text)) if split else [text]}
        if message.name and message.role != AuthorRole.TOOL:
            entry["name"] = message.name
        messages.append(entry)
    return messages


def _message_text(message: ChatMessageContent, where: str) -> str:
    texts: list[str] = []
    calls: list[tuple[str, Mapping[str, Any] | str]] = []
    for item in message.items:
        if isinstance(item, TextContent):  # streamed text too
            texts.append(item.text)
        elif isinstance(item, FunctionCallContent):
            calls.append((item.name or item.function_name, item.arguments or {}))
        elif isinstance(item, FunctionResultContent):
            texts.append(f"Tool {item.name or item.function_name} returned: {_result_text(item.result)}")
        elif not isinstance(item, _SILENT):
            raise ServiceInvalidRequestError(f"{where} has an item of type {type(item).__name__}; Parrot "
                                             "chat requests take text only")
    if calls:  # as the model writes them: one object after the text
        texts.append(call_message_json(calls))
    return "\n".join(t for t in texts if t)


def _result_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)


def reply_contents(result: CallOutcome, model_name: str, tools: ToolUse | None, *,
                   streaming: bool = False) -> tuple[list[Any], FinishReason | None]:
    """The reply's contents: its text, or with tools constraining it the function call (or
    answer) it holds (``ToolUse.parse``).

    A reply that is no complete call or answer (cut by ``max_tokens`` or a stop string;
    ``finish_reason`` says which) is returned as the text it is; an answer cut short, as the
    text it got to.
    """
    def text(value: str) -> list[Any]:
        if not value:
            return []
        return [StreamingTextContent(choice_index=0, text=value, ai_model_id=model_name) if streaming
                else TextContent(text=value, ai_model_id=model_name)]

    if tools is None:
        return text(result.text), _finish_reason(result)
    reply = tools.parse(result.text)
    if reply.calls:
        calls = [FunctionCallContent(id=f"call_{uuid.uuid4().hex[:24]}", name=c.name, arguments=c.arguments,
                                     ai_model_id=model_name) for c in reply.calls]
        return calls, FinishReason.TOOL_CALLS
    return text(reply.content or ""), _finish_reason(result)


def _finish_reason(result: CallOutcome) -> FinishReason | None:
    try:
        return FinishReason(result.finish_reason) if result.finish_reason else None
    except ValueError:
        return None


def _metadata(result: CallOutcome, model_name: str) -> dict[str, Any]:
    return {"usage": completion_usage(result), "model": model_name}
