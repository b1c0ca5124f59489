"""A call's outcome as LangChain's messages and stream chunks.

Usage: ``input_tokens`` (the prompt), ``output_tokens`` (generated, a stop token
included, as OpenAI counts), ``input_token_details["cache_read"]`` (prompt tokens served
from the prefix cache). Metadata: ``model_name`` and ``finish_reason``, on the message,
or on a stream's last chunk only (LangChain adds chunks' metadata together).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import ToolCallChunk, tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk

from parrot.integrations.common.calls import CallOutcome
from parrot.integrations.langchain.constrained import parse_reply
from parrot.tool_calls import ToolUse


def usage_metadata(result: CallOutcome) -> UsageMetadata:
    return UsageMetadata(input_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
                         total_tokens=result.prompt_tokens + result.output_tokens,
                         input_token_details=InputTokenDetails(cache_read=result.cached_tokens))


def ai_message(result: CallOutcome, model_name: str, tools: ToolUse | None) -> AIMessage:
    """The reply: its text, or with tools bound the tool call (or answer) it holds."""
    usage, metadata = usage_metadata(result), _metadata(result, model_name)
    if tools is None:
        return AIMessage(content=result.text, usage_metadata=usage, response_metadata=metadata)
    reply = parse_reply(tools, result.text, result.finish_reason)
    return AIMessage(content=reply.content, tool_calls=reply.tool_calls,
                     invalid_tool_calls=reply.invalid_tool_calls, usage_metadata=usage,
                     response_metadata=metadata)


def last_chunk(result: CallOutcome, model_name: str, tools: ToolUse | None, *,
               whole: bool = False) -> ChatGenerationChunk:
    """A stream's final chunk: usage and metadata, and with ``whole`` the reply itself (tool
    calls as chunks, which LangChain parses once the stream ends)."""
    content, calls = (result.text if whole else ""), list[ToolCallChunk]()
    if tools is not None:
        reply = parse_reply(tools, result.text, result.finish_reason)
        content = reply.content
        calls = [tool_call_chunk(name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"],
                                 index=i) for i, c in enumerate(reply.tool_calls)]
        calls += [tool_call_chunk(name=c["name"], args=c["args"], id=c["id"], index=len(calls) + i)
                  for i, c in enumerate(reply.invalid_tool_calls)]
    message = AIMessageChunk(content=content, tool_call_chunks=calls, usage_metadata=usage_metadata(result),
                             response_metadata=_metadata(result, model_name), chunk_position="last")
    return ChatGenerationChunk(message=message)


def chunks(items: Iterator[str | CallOutcome], model_name: str,
           tools: ToolUse | None = None) -> Iterator[ChatGenerationChunk]:
    """Text deltas as chunks, then the final chunk."""
    for item in items:
        if isinstance(item, str):
            yield ChatGenerationChunk(message=AIMessageChunk(content=item))
        else:
            yield last_chunk(item, model_name, tools)


async def achunks(items: AsyncIterator[str | CallOutcome], model_name: str,
                  tools: ToolUse | None = None) -> AsyncIterator[ChatGenerationChunk]:
    async for item in items:
        if isinstance(item, str):
            yield ChatGenerationChunk(message=AIMessageChunk(content=item))
        else:
            yield last_chunk(item, model_name, tools)


def _metadata(result: CallOutcome, model_name: str) -> dict[str, str | None]:
    return {"model_name": model_name, "finish_reason": result.finish_reason}
