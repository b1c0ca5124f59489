"""A conformance suite for Semantic Kernel chat connectors (SK ships none).

Subclass ``ChatCompletionConformance`` in a test module and provide the fixtures

- ``connector``: the ``ChatCompletionClientBase`` under test, on a live service;
- ``unreachable_connector``: the same kind of connector pointed where nothing listens;

and optionally override ``kernel`` (a ``Kernel`` with ``connector`` added) or
``greedy_settings``. The checks need no model that reads the prompt: they compare the
connector's replies with each other (greedy decoding repeats), never with expected words.
"""

from __future__ import annotations

import asyncio
from functools import reduce
from typing import Any

import pytest
from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.chat_completion_client_base import ChatCompletionClientBase
from semantic_kernel.connectors.ai.completion_usage import CompletionUsage
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.contents import AuthorRole, ChatHistory, ChatMessageContent, StreamingChatMessageContent
from semantic_kernel.exceptions import KernelException
from semantic_kernel.functions import KernelArguments

MAX_TOKENS = 12


def history(*turns: tuple[str, str]) -> ChatHistory:
    chat = ChatHistory()
    for role, text in turns:
        chat.add_message(ChatMessageContent(role=AuthorRole(role), content=text))
    return chat


class ChatCompletionConformance:
    """What every SK chat connector should do; see the module docs for the fixtures to provide."""

    @pytest.fixture
    def kernel(self, connector: ChatCompletionClientBase) -> Kernel:
        kernel = Kernel()
        kernel.add_service(connector)
        return kernel

    def greedy_settings(self, connector: ChatCompletionClientBase, **fields: Any) -> PromptExecutionSettings:
        """The connector's own settings, greedy and short unless ``fields`` say otherwise."""
        return connector.get_prompt_execution_settings_class()(
            **{"temperature": 0.0, "max_tokens": MAX_TOKENS, **fields})

    async def reply(self, connector: ChatCompletionClientBase, chat: ChatHistory,
                    **fields: Any) -> ChatMessageContent:
        replies = await connector.get_chat_message_contents(chat, self.greedy_settings(connector, **fields))
        assert len(replies) == 1
        return replies[0]

    async def chunks(self, connector: ChatCompletionClientBase, chat: ChatHistory,
                     **fields: Any) -> list[StreamingChatMessageContent]:
        settings = self.greedy_settings(connector, **fields)
        chunks = []
        async for batch in connector.get_streaming_chat_message_contents(chat, settings):
            assert len(batch) == 1  # one choice per request
            chunks.append(batch[0])
        return chunks

    # -- replies ----------------------------------------------------------------------------------

    async def test_reply_is_one_assistant_message_with_text(self,
                                                            connector: ChatCompletionClientBase) -> None:
        reply = await self.reply(connector, history(("user", "Hello, how are you?")))
        assert isinstance(reply, ChatMessageContent) and not isinstance(reply, StreamingChatMessageContent)
        assert reply.role == AuthorRole.ASSISTANT
        assert isinstance(reply.content, str) and reply.content
        assert reply.ai_model_id and reply.ai_model_id == connector.ai_model_id

    async def test_reply_reports_usage(self, connector: ChatCompletionClientBase) -> None:
        reply = await self.reply(connector, history(("user", "Count to five.")))
        usage = reply.metadata["usage"]
        assert isinstance(usage, CompletionUsage)
        assert usage.prompt_tokens and usage.prompt_tokens > 0
        assert usage.completion_tokens and 0 < usage.completion_tokens <= MAX_TOKENS

    async def test_greedy_replies_repeat(self, connector: ChatCompletionClientBase) -> None:
        chat = history(("user", "Tell me a story."))
        first, second = await asyncio.gather(self.reply(connector, chat), self.reply(connector, chat))
        assert first.content == second.content

    async def test_multiple_turns(self, connector: ChatCompletionClientBase) -> None:
        chat = history(("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."),
                       ("user", "What can you do?"))
        before = [m.content for m in chat.messages]
        reply = await self.reply(connector, chat)
        assert reply.content
        assert [m.content for m in chat.messages] == before  # the history is the caller's
        shorter = await self.reply(connector, history(("user", "What can you do?")))
        usage, shorter_usage = reply.metadata["usage"], shorter.metadata["usage"]
        assert usage.prompt_tokens > shorter_usage.prompt_tokens  # every turn was sent

    # -- settings ---------------------------------------------------------------------------------

    def test_settings_class_is_the_connectors_own(self, connector: ChatCompletionClientBase) -> None:
        settings_class = connector.get_prompt_execution_settings_class()
        assert settings_class is not PromptExecutionSettings and issubclass(settings_class,
                                                                            PromptExecutionSettings)
        generic = PromptExecutionSettings(max_tokens=7, temperature=0.5, stop=["\n"])
        converted = connector.get_prompt_execution_settings_from_settings(generic)
        assert isinstance(converted, settings_class)
        assert (converted.max_tokens, converted.temperature, converted.stop) == (7, 0.5, ["\n"])

    async def test_max_tokens_bounds_the_reply(self, connector: ChatCompletionClientBase) -> None:
        reply = await self.reply(connector, history(("user", "Write a long essay.")), max_tokens=3)
        assert 0 < reply.metadata["usage"].completion_tokens <= 3

    async def test_stop_ends_the_reply_before_it(self, connector: ChatCompletionClientBase) -> None:
        chat = history(("user", "Write a long essay."))
        full = (await self.reply(connector, chat)).content
        stop = full[len(full) // 2:][:3]  # a piece from the middle of the greedy reply
        cut = (await self.reply(connector, chat, stop=[stop])).content
        assert cut == full[:full.index(stop)]

    async def test_settings_are_left_as_they_were(self, connector: ChatCompletionClientBase) -> None:
        settings = self.greedy_settings(connector)
        before = settings.model_dump()
        await connector.get_chat_message_contents(history(("user", "Hi")), settings)
        assert settings.model_dump() == before

    # -- streaming --------------------------------------------------------------------------------

    async def test_stream_chunks_belong_to_one_reply(self, connector: ChatCompletionClientBase) -> None:
        chunks = await self.chunks(connector, history(("user", "Tell me a story.")))
        assert len(chunks) > 1
        assert all(isinstance(c, StreamingChatMessageContent) for c in chunks)
        assert {c.choice_index for c in chunks} == {0}
        assert {c.ai_model_id for c in chunks} == {connector.ai_model_id}
        assert {c.role for c in chunks} == {AuthorRole.ASSISTANT}

    async def test_stream_joins_to_the_reply(self, connector: ChatCompletionClientBase) -> None:
        chat = history(("user", "Tell me a story."))
        reply = await self.reply(connector, chat)
        joined = reduce(lambda a, b: a + b, await self.chunks(connector, chat))
        assert str(joined) == reply.content
        usage = joined.metadata["usage"]
        assert isinstance(usage, CompletionUsage)
        assert (usage.prompt_tokens, usage.completion_tokens) == (reply.metadata["usage"].prompt_tokens,
                                                                  reply.metadata["usage"].completion_tokens)

    # -- through a kernel -------------------------------------------------------------------------

    async def test_prompt_function_through_the_kernel(self, kernel: Kernel,
                                                      connector: ChatCompletionClientBase) -> None:
        function = kernel.add_function(plugin_name="writer", function_name="story",
                                       prompt="Tell a story about {{$topic}}.")
        arguments = KernelArguments(settings=self.greedy_settings(connector), topic="a parrot")
        result = await kernel.invoke(function, arguments)
        assert result is not None
        direct = await self.reply(connector, ChatHistory.from_rendered_prompt("Tell a story about a parrot."))
        assert str(result) == direct.content
        streamed = [str(chunk[0]) async for chunk in kernel.invoke_stream(function, arguments)]
        assert "".join(streamed) == direct.content

    # -- errors -----------------------------------------------------------------------------------

    async def test_unreachable_service_is_an_error(self,
                                                   unreachable_connector: ChatCompletionClientBase) -> None:
        with pytest.raises(KernelException) as caught:
            await self.reply(unreachable_connector, history(("user", "Hi")))
        assert str(caught.value)
