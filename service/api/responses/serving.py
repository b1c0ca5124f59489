"""Serve ``/v1/responses``: a Responses request runs as the chat request it amounts to.

The request's ``instructions`` (a first system message, not carried over to later turns,
as in OpenAI's API), the stored conversation of ``previous_response_id`` and the new
``input`` items become chat messages (``function_call`` items become an assistant
message's tool calls, ``function_call_output`` items tool messages); tools, sampling and
``text.format`` map to the chat fields. It is then rendered, placed and generated exactly
as ``/v1/chat/completions`` does, tool calls included (``parrot.tool_calls``).

The reply is one ``message`` output item, or one ``function_call`` item per call. A
response cut by ``max_output_tokens`` is ``status: "incomplete"``. With ``store`` (the
default) the response and its conversation are kept in the tenant's ``ResponseStore``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from parrot.service.api.http import EventStream
from parrot.service.api.openai.protocol import ChatCompletionRequest
from parrot.service.api.openai.serving import OpenAIServing, _Choice, _observe, _usage
from parrot.service.api.responses.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)
from parrot.service.api.responses.store import ResponseStore, StoredResponse
from parrot.service.errors import BadRequestError, EngineFailedError, NotFoundError, validation_error_info
from parrot.service.tenancy import Tenant
from parrot.tool_calls import ArgumentsDelta, CallStarted, ContentDelta, ToolReplyStream, ToolUse

RESPONSES = "responses"
DEFAULT_TENANT = "default"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """Responses ``input`` as chat messages (OpenAI's chat wire form)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # a reply's calls stay one message
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def _output_messages(output: list[OutputItem]) -> list[dict[str, Any]]:
    """A response's output as the chat messages a later turn continues from."""
    calls = [
        {"id": o.call_id, "type": "function", "function": {"name": o.name, "arguments": o.arguments}}
        for o in output
        if isinstance(o, OutputFunctionCall)
    ]
    text = "".join(part.text for o in output if isinstance(o, OutputMessage) for part in o.content)
    if calls:
        return [{"role": "assistant", "content": text or None, "tool_calls": calls}]
    return [{"role": "assistant", "content": text}]


class ResponsesServing:
    def __init__(self, openai: OpenAIServing, store: ResponseStore | None = None) -> None:
        self.openai = openai
        self.store = store or ResponseStore()

    @staticmethod
    def _tenant_key(tenant: Tenant | None) -> str:
        return tenant.name if tenant is not None else DEFAULT_TENANT

    def retrieve(self, response_id: str, tenant: Tenant | None = None) -> ResponseObject:
        stored = self.store.get(self._tenant_key(tenant), response_id)
        if stored is None:
            raise NotFoundError(f"no stored response has the id {response_id!r}", param="response_id")
        return stored.response

    def delete(self, response_id: str, tenant: Tenant | None = None) -> dict[str, Any]:
        if not self.store.delete(self._tenant_key(tenant), response_id):
            raise NotFoundError(f"no stored response has the id {response_id!r}", param="response_id")
        return {"id": response_id, "object": "response", "deleted": True}

    def _history(self, request: ResponsesRequest, tenant: Tenant | None) -> list[dict[str, Any]]:
        if request.previous_response_id is None:
            return []
        stored = self.store.get(self._tenant_key(tenant), request.previous_response_id)
        if stored is None:
            raise NotFoundError(
                f"previous_response_id: no stored response has the id {request.previous_response_id!r} (a "
                "response made with store: false is not kept)",
                param="previous_response_id",
            )
        return list(stored.conversation)

    @staticmethod
    def _chat_request(request: ResponsesRequest, conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
        messages = [{"role": "system", "content": request.instructions}] if request.instructions else []
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages + conversation,
            "max_completion_tokens": request.max_output_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "parallel_tool_calls": request.parallel_tool_calls,
        }
        if request.tools:
            body["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                for t in request.tools
            ]
        choice = request.tool_choice
        if choice is not None:
            body["tool_choice"] = (
                choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
            )
        fmt = request.text.format if request.text is not None else None
        if isinstance(fmt, TextFormatJSONSchema):
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict},
            }
        elif isinstance(fmt, TextFormatJSONObject):
            body["response_format"] = {"type": "json_object"}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            info = validation_error_info([dict(e) for e in exc.errors()])
            raise BadRequestError(info.message, param=info.param) from exc

    def _response(
        self, request: ResponsesRequest, response_id: str, model: str, **fields: Any
    ) -> ResponseObject:
        return ResponseObject(
            id=response_id,
            model=model,
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            previous_response_id=request.previous_response_id,
            temperature=request.temperature,
            top_p=request.top_p,
            tools=request.tools or [],
            tool_choice=request.tool_choice or "auto",
            parallel_tool_calls=request.parallel_tool_calls is not False,
            metadata=request.metadata or {},
            store=request.store is not False,
            user=request.user,
            **({"text": request.text} if request.text is not None and request.text.format else {}),
            **fields,
        )

    async def create(
        self, request: ResponsesRequest, tenant: Tenant | None = None
    ) -> ResponseObject | EventStream:
        conversation = self._history(request, tenant) + input_messages(request.input)
        chat = self._chat_request(request, conversation)
        response_id = _new_id("resp")
        group = await self.openai.start_chat(chat, response_id, tenant, endpoint=RESPONSES)
        tool_use = chat.tool_use
        if request.stream:
            events = self._events(request, group, response_id, tool_use, conversation, tenant)
            return self.openai._event_stream(events, group, RESPONSES)
        [choice] = await self.openai._collect(group, RESPONSES)
        output = self._output(choice.text, tool_use)
        response = self._finished(request, response_id, group.model, output, choice)
        self._keep(request, response, conversation, tenant)
        return response

    def _finished(
        self,
        request: ResponsesRequest,
        response_id: str,
        model: str,
        output: list[OutputItem],
        choice: _Choice,
    ) -> ResponseObject:
        usage = _usage([choice])
        cut = choice.final is not None and choice.final.finish_reason == "length"
        if cut:
            for item in output:
                item.status = "incomplete"
        return self._response(
            request,
            response_id,
            model,
            output=output,
            status="incomplete" if cut else "completed",
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if cut else None,
            usage=ResponseUsage(
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                input_tokens_details=InputTokensDetails(
                    cached_tokens=usage.prompt_tokens_details.cached_tokens
                ),
            ),
        )

    @staticmethod
    def _output(text: str, tool_use: ToolUse | None) -> list[OutputItem]:
        if tool_use is not None:
            reply = tool_use.parse(text)
            if reply.calls:
                return [
                    OutputFunctionCall(
                        id=_new_id("fc"), call_id=_new_id("call"), name=c.name, arguments=c.arguments
                    )
                    for c in reply.calls
                ]
            text = reply.content or ""
        return [OutputMessage(id=_new_id("msg"), content=[OutputText(text=text)])]

    def _keep(
        self,
        request: ResponsesRequest,
        response: ResponseObject,
        conversation: list[dict[str, Any]],
        tenant: Tenant | None,
    ) -> None:
        if request.store is False:
            return
        self.store.put(
            self._tenant_key(tenant),
            StoredResponse(response, conversation + _output_messages(response.output)),
        )

    # ---- streaming ---------------------------------------------------------------------------
    async def _events(
        self,
        request: ResponsesRequest,
        group: Any,
        response_id: str,
        tool_use: ToolUse | None,
        conversation: list[dict[str, Any]],
        tenant: Tenant | None,
    ) -> AsyncIterator[str]:
        sequence = 0

        def event(kind: str, **data: Any) -> str:
            nonlocal sequence
            payload = {
                "type": kind,
                "sequence_number": sequence,
                **{
                    k: v.model_dump(mode="json", by_alias=True) if hasattr(v, "model_dump") else v
                    for k, v in data.items()
                },
            }
            sequence += 1
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

        model = group.model
        started = self._response(request, response_id, model, status="in_progress")
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        output: list[OutputItem] = []
        open_item: OutputItem | None = None
        reader = ToolReplyStream() if tool_use is not None else None
        choice = _Choice()

        def close(item: OutputItem) -> list[str]:
            index = output.index(item)
            item.status = "completed"
            if isinstance(item, OutputMessage):
                part = item.content[0]
                return [
                    event(
                        "response.output_text.done",
                        item_id=item.id,
                        output_index=index,
                        content_index=0,
                        text=part.text,
                        logprobs=[],
                    ),
                    event(
                        "response.content_part.done",
                        item_id=item.id,
                        output_index=index,
                        content_index=0,
                        part=part,
                    ),
                    event("response.output_item.done", output_index=index, item=item),
                ]
            return [
                event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                ),
                event("response.output_item.done", output_index=index, item=item),
            ]

        def text_delta(piece: str) -> list[str]:
            nonlocal open_item
            lines = []
            if not isinstance(open_item, OutputMessage):
                if open_item is not None:
                    lines += close(open_item)
                open_item = OutputMessage(
                    id=_new_id("msg"), status="in_progress", content=[OutputText(text="")]
                )
                output.append(open_item)
                index = len(output) - 1
                lines.append(
                    event(
                        "response.output_item.added",
                        output_index=index,
                        item=OutputMessage(id=open_item.id, status="in_progress"),
                    )
                )
                lines.append(
                    event(
                        "response.content_part.added",
                        item_id=open_item.id,
                        output_index=index,
                        content_index=0,
                        part=OutputText(text=""),
                    )
                )
            if piece:
                open_item.content[0].text += piece
                lines.append(
                    event(
                        "response.output_text.delta",
                        item_id=open_item.id,
                        output_index=len(output) - 1,
                        content_index=0,
                        delta=piece,
                        logprobs=[],
                    )
                )
            return lines

        def tool_events(piece: str) -> list[str]:
            nonlocal open_item
            assert reader is not None
            lines = []
            for e in reader.feed(piece):
                if isinstance(e, ContentDelta):
                    lines += text_delta(e.text)
                elif isinstance(e, CallStarted):
                    if open_item is not None:
                        lines += close(open_item)
                    open_item = OutputFunctionCall(
                        id=_new_id("fc"),
                        call_id=_new_id("call"),
                        name=e.name,
                        arguments="",
                        status="in_progress",
                    )
                    output.append(open_item)
                    lines.append(
                        event("response.output_item.added", output_index=len(output) - 1, item=open_item)
                    )
                elif isinstance(e, ArgumentsDelta) and isinstance(open_item, OutputFunctionCall):
                    open_item.arguments += e.text
                    lines.append(
                        event(
                            "response.function_call_arguments.delta",
                            item_id=open_item.id,
                            output_index=len(output) - 1,
                            delta=e.text,
                        )
                    )
            return lines

        if reader is None:
            for line in text_delta(""):
                yield line
        async for _, out in group.outputs():
            _observe(choice, out)
            if out.error:
                info = EngineFailedError(f"the engine failed: {out.error}").to_info()
                yield event("error", code=info.code, message=info.message, param=info.param)
                return
            for line in tool_events(out.text) if reader is not None else text_delta(out.text):
                yield line
        if not output and choice.text:  # a tool reply cut short before anything was readable
            for line in text_delta(choice.text):
                yield line
        elif not output:
            for line in text_delta(""):
                yield line
        if open_item is not None:
            for line in close(open_item):
                yield line
        for item in output:
            item.status = "completed"
        response = self._finished(request, response_id, model, output, choice)
        self._keep(request, response, conversation, tenant)
        # Always "response.completed" (its response says "incomplete" when cut), as vLLM does: the
        # official client's stream helpers wait for that event.
        yield event("response.completed", response=response)
