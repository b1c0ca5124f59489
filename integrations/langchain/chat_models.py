"""``ChatParrot``: a LangChain chat model whose calls run as semantic calls in a Parrot service.

Every invocation (``_generate``, ``_agenerate``, ``_stream``, ``_astream``) builds one
chat call from the messages (``to_chat_messages``, then ``prepare_chat``), submits it
in a Parrot session (its own, or inside a LangGraph step the step's: ``langgraph``) and
waits for its reply (``calls``); ``batch`` / ``abatch`` submit all their calls as one
graph first (``batching``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

import parrot as P
from parrot.chat_call import prepare_chat
from parrot.errors import ParrotError
from parrot.integrations.common.calls import CallOutcome, astream, await_all, stream, submit, wait
from parrot.integrations.common.json_schemas import with_instructions
from parrot.integrations.langchain import batching
from parrot.integrations.langchain.auto import tracker
from parrot.integrations.langchain.base import ParrotModelFields
from parrot.integrations.langchain.constrained import (
    bound_tool_use,
    output_json_schema,
    response_format_schema,
    tool_definitions,
)
from parrot.integrations.langchain.deferred import DeferredScope, current_scope, has_placeholder
from parrot.integrations.langchain.langgraph import astep_session, step_session
from parrot.integrations.langchain.messages import TextSplitter, to_chat_messages
from parrot.integrations.langchain.replies import achunks, ai_message, chunks, last_chunk
from parrot.schemas import SamplingConfig
from parrot.sdk import PreparedCall
from parrot.tool_calls import ToolUse

StructuredMethod = Literal["json_schema", "function_calling", "json_mode"]


@dataclass
class ChatRequest:
    """One invocation's call, before it is prepared: messages, sampling, reply format."""

    messages: list[dict[str, Any]]
    sampling: SamplingConfig
    tools: ToolUse | None
    model: str | None

    @property
    def key(self) -> str:
        return batching.request_key(self.messages, self.sampling.model_dump(mode="json"), self.model)

    def prepare(self) -> PreparedCall:
        """A fresh call (its own ids), ready to submit."""
        return prepare_chat(self.messages, name="chat", sampling=self.sampling)


class ChatParrot(ParrotModelFields, BaseChatModel):
    """A chat model served by Parrot, through its native API (semantic variables).

    Swap it in for ``ChatOpenAI(base_url=...)``::

        from parrot.integrations.langchain import ChatParrot

        model = ChatParrot(base_url="http://127.0.0.1:8000", max_tokens=64)
        model.invoke("Name three colors.")
        model.batch(["Hi", "Hello"])        # one graph submission, one session
        ChatParrot().invoke("Hi")           # no base_url: serves the default model in-process

    Replies carry ``usage_metadata`` (input, output and total tokens; the prompt tokens read
    from the prefix cache as ``input_token_details["cache_read"]``) and ``response_metadata``
    with ``model_name`` and ``finish_reason``. Tool calling and structured output are
    constrained decoding; see ``parrot.integrations.langchain`` for what is supported.
    """

    streaming: bool = False
    """Whether ``invoke`` streams from the service (LangChain's switch)."""

    @property
    def _llm_type(self) -> str:
        return "parrot-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "parrot"
        params.setdefault("ls_model_name", self.model or "default")
        params.setdefault("ls_temperature", 0.0)  # greedy unless told otherwise
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = [stops] if isinstance(stops, str) else list(stops)
        return params

    # -- requests --------------------------------------------------------------------------

    def chat_request(self, messages: Sequence[BaseMessage], stop: list[str] | None,
                     kwargs: dict[str, Any], split: TextSplitter | None = None) -> ChatRequest:
        """The call an invocation makes; per-call keywords override the fields.

        Keywords: ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``,
        ``top_k``, ``seed``, ``model``, ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (as
        ``bind_tools`` binds them), ``json_schema`` or OpenAI's ``response_format``. Anything else is
        a ``ValueError``.
        """
        kwargs = dict(kwargs)
        overrides = self.take_sampling_overrides(kwargs)
        model = kwargs.pop("model", None)
        tools, tool_choice = kwargs.pop("tools", None), kwargs.pop("tool_choice", None)
        parallel_tool_calls = kwargs.pop("parallel_tool_calls", None)
        schema = kwargs.pop("json_schema", None)
        if "response_format" in kwargs:
            if schema is not None:
                raise ValueError("pass json_schema or response_format, not both")
            schema = response_format_schema(kwargs.pop("response_format"))
        if kwargs:
            raise ValueError(f"unsupported parameters for {type(self).__name__}: {', '.join(sorted(kwargs))}")
        if not tools and tool_choice not in (None, False, "auto", "none"):
            raise ValueError(f"tool_choice {tool_choice!r} needs tools: bind them with bind_tools")
        tool_use = bound_tool_use(tools, tool_choice, parallel_tool_calls) if tools else None
        chat = to_chat_messages(messages, split=split)
        if tool_use is not None:
            if schema is not None:
                raise ValueError("bind either tools or a structured output schema, not both")
            chat = with_instructions(chat, tool_use.instructions())
            schema = tool_use.json_schema()
        return ChatRequest(chat, self.sampling(stop, overrides, schema), tool_use, model)

    # -- LangChain's hooks -----------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        found = None if batching.claiming(self) else _scope_of(self, run_manager)
        if found is not None:
            return self._in_scope(*found, messages, stop, kwargs)
        request = self.chat_request(messages, stop, kwargs)
        model_name, result = self._run(request)
        return ChatResult(generations=[ChatGeneration(message=ai_message(result, model_name, request.tools))])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        found = None if batching.claiming(self) else _scope_of(self, run_manager)
        if found is not None:
            return await self._ain_scope(*found, messages, stop, kwargs)
        request = self.chat_request(messages, stop, kwargs)
        model_name, result = await self._arun(request)
        return ChatResult(generations=[ChatGeneration(message=ai_message(result, model_name, request.tools))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        found = None if batching.claiming(self) else _scope_of(self, run_manager)
        if found is not None:
            scope, defer = found
            request, call = self._submit_in_scope(scope, messages, stop, kwargs)
            if defer or request.tools is not None:
                yield _as_chunk(self._reply_in_scope(scope, defer, request, call))
            else:  # the chain's answer: streamed as it generates
                yield from chunks(stream(scope.vm, call, perf=P.TTFT), scope.model_name)
            return
        request = self.chat_request(messages, stop, kwargs)
        if request.tools is not None:  # a tool call is known once complete: one chunk
            model_name, result = self._run(request)
            yield last_chunk(result, model_name, request.tools, whole=True)
            return
        claimed = batching.claim(self, request.key)
        if claimed is not None:
            shared, call = claimed
            items = stream(shared.vm, call, perf=P.THROUGHPUT, infos=shared.infos)
            yield from chunks(items, shared.model_name)
            return
        with step_session(self, request.model) as (vm, model_name, gathered):  # a LangGraph step's or its own
            call = request.prepare()
            submit(vm, [call], fetch=P.LATENCY)  # announced before the step's post: it brings the reply
            gathered()
            yield from chunks(stream(vm, call), model_name)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        found = None if batching.claiming(self) else _scope_of(self, run_manager)
        if found is not None:
            scope, defer = found
            request, call = self._submit_in_scope(scope, messages, stop, kwargs)
            if defer or request.tools is not None:
                yield _as_chunk(await self._areply_in_scope(scope, defer, request, call))
            else:
                async for chunk in achunks(astream(scope.vm, call, perf=P.TTFT), scope.model_name):
                    yield chunk
            return
        request = self.chat_request(messages, stop, kwargs)
        if request.tools is not None:
            model_name, result = await self._arun(request)
            yield last_chunk(result, model_name, request.tools, whole=True)
            return
        claimed = batching.claim(self, request.key)
        if claimed is not None:
            shared, call = claimed
            async for chunk in achunks(astream(shared.vm, call, perf=P.THROUGHPUT, infos=shared.infos),
                                       shared.model_name):
                yield chunk
            return
        async with astep_session(self, request.model) as (vm, model_name, gathered):
            call = request.prepare()
            submit(vm, [call], fetch=P.LATENCY)
            await gathered()
            async for chunk in achunks(astream(vm, call), model_name):
                yield chunk

    # -- inside a compiled chain (see compiler.py): the chain's session, replies deferred --------

    def _in_scope(self, scope: DeferredScope, defer: bool, messages: list[BaseMessage],
                  stop: list[str] | None, kwargs: dict[str, Any]) -> ChatResult:
        request, call = self._submit_in_scope(scope, messages, stop, kwargs)
        return self._reply_in_scope(scope, defer, request, call)

    async def _ain_scope(self, scope: DeferredScope, defer: bool, messages: list[BaseMessage],
                         stop: list[str] | None, kwargs: dict[str, Any]) -> ChatResult:
        request, call = self._submit_in_scope(scope, messages, stop, kwargs)
        return await self._areply_in_scope(scope, defer, request, call)

    def _reply_in_scope(self, scope: DeferredScope, defer: bool, request: ChatRequest,
                        call: PreparedCall) -> ChatResult:
        if defer and request.tools is None:
            return _deferred(scope, call)
        [result] = wait(scope.vm, [call], perf=scope.criterion, timeout=self.timeout)  # a step reads it
        return ChatResult(generations=[ChatGeneration(message=ai_message(_ok(result), scope.model_name,
                                                                         request.tools))])

    async def _areply_in_scope(self, scope: DeferredScope, defer: bool, request: ChatRequest,
                               call: PreparedCall) -> ChatResult:
        if defer and request.tools is None:
            return _deferred(scope, call)
        [result] = await await_all(scope.vm, [call], perf=scope.criterion, timeout=self.timeout)
        return ChatResult(generations=[ChatGeneration(message=ai_message(_ok(result), scope.model_name,
                                                                         request.tools))])

    def _submit_in_scope(self, scope: DeferredScope, messages: list[BaseMessage], stop: list[str] | None,
                         kwargs: dict[str, Any]) -> tuple[ChatRequest, PreparedCall]:
        request = self.chat_request(messages, stop, kwargs, split=scope.split)
        call = request.prepare()
        submit(scope.vm, [call])
        return request, call

    def _run(self, request: ChatRequest) -> tuple[str, CallOutcome]:
        """Submit the request's call (or claim it from a running batch) and wait for it."""
        claimed = batching.claim(self, request.key)
        if claimed is not None:
            shared, call = claimed
            [result] = wait(shared.vm, [call], perf=P.THROUGHPUT, timeout=self.timeout, infos=shared.infos)
            return shared.model_name, _ok(result)
        with step_session(self, request.model) as (vm, model_name, gathered):  # a LangGraph step's or its own
            call = request.prepare()
            submit(vm, [call], fetch=P.LATENCY)  # announced before the step's post: it brings the reply
            gathered()
            [result] = wait(vm, [call], perf=P.LATENCY, timeout=self.timeout)
            return model_name, _ok(result)

    async def _arun(self, request: ChatRequest) -> tuple[str, CallOutcome]:
        claimed = batching.claim(self, request.key)
        if claimed is not None:
            shared, call = claimed
            [result] = await await_all(shared.vm, [call], perf=P.THROUGHPUT, timeout=self.timeout,
                                       infos=shared.infos)
            return shared.model_name, _ok(result)
        async with astep_session(self, request.model) as (vm, model_name, gathered):
            call = request.prepare()
            submit(vm, [call], fetch=P.LATENCY)
            await gathered()
            [result] = await await_all(vm, [call], perf=P.LATENCY, timeout=self.timeout)
            return model_name, _ok(result)

    # -- batches: one graph submission ------------------------------------------------------

    def batch(self, inputs: list[LanguageModelInput],
              config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:  # type: ignore[override]
        """Run the inputs as one graph in one session; each input keeps its own config and
        callbacks. ``max_concurrency`` only bounds how many inputs wait at once: the service
        runs every call of the batch as it schedules them."""
        requests = [] if _in_followed_chain(inputs) else self._batch_requests(inputs, kwargs)
        with ExitStack() as stack:
            if len(requests) >= 2:
                try:
                    vm, model_name = stack.enter_context(self.session(requests[0].model, retries=0))
                except ParrotError:
                    pass  # each input meets the failure in its own invocation, with its callbacks
                else:
                    calls = [(r.key, r.prepare()) for r in requests]
                    submit(vm, [c for _, c in calls], fetch=P.THROUGHPUT)  # what the invocations wait for
                    stack.enter_context(batching.sharing(self, vm, model_name, calls))
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    async def abatch(self, inputs: list[LanguageModelInput],
                     config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:  # type: ignore[override]
        """``batch`` for async code."""
        requests = [] if _in_followed_chain(inputs) else self._batch_requests(inputs, kwargs)
        async with AsyncExitStack() as stack:
            if len(requests) >= 2:
                try:
                    vm, model_name = await stack.enter_async_context(
                        self.asession(requests[0].model, retries=0))
                except ParrotError:
                    pass
                else:
                    calls = [(r.key, r.prepare()) for r in requests]
                    submit(vm, [c for _, c in calls], fetch=P.THROUGHPUT)  # what the invocations wait for
                    stack.enter_context(batching.sharing(self, vm, model_name, calls))
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    def _batch_requests(self, inputs: Sequence[LanguageModelInput],
                        kwargs: dict[str, Any]) -> list[ChatRequest]:
        """The requests the inputs' invocations will make; an input that cannot be converted is
        left to fail in its own invocation."""
        stop = kwargs.get("stop")
        rest = {k: v for k, v in kwargs.items() if k != "stop"}
        requests = []
        for input_ in inputs:
            try:
                requests.append(self.chat_request(self._convert_input(input_).to_messages(), stop, rest))
            except (ValueError, TypeError):
                continue
        return requests

    # -- token counts ------------------------------------------------------------------------

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the served model's tokenizer (through the service)."""
        return self.tokenize({"prompt": text, "add_special_tokens": False})

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[Any] | None = None) -> int:
        """The prompt tokens a call with ``messages`` (and ``tools``) costs: the chat rendered as
        an invocation renders it, tool instructions included, counted by the service."""
        request = self.chat_request(messages, None, {"tools": tools} if tools else {})
        chat = []
        for message in request.messages:
            entry = {"role": message["role"], "content": "".join(message["content"])}
            if message.get("name"):
                entry["name"] = message["name"]
            chat.append(entry)
        return len(self.tokenize({"messages": chat}))

    # -- tools and structured output --------------------------------------------------------

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: dict | str | bool | None = None, strict: bool | None = None,
                   parallel_tool_calls: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; replies are constrained to calls of them (see ``tool_choice`` in
        ``parrot.integrations.langchain``). Arguments always follow the tool's schema, so
        ``strict`` changes nothing. One call per reply unless ``parallel_tool_calls=True``."""
        definitions = tool_definitions(tools)
        bound_tool_use(definitions, tool_choice)  # refuse a bad tool_choice now, not at the first call
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=definitions, **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type | None = None, *,
                               method: StructuredMethod = "json_schema", include_raw: bool = False,
                               strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict | Any]:
        """Replies that follow ``schema`` (a pydantic class, a TypedDict or a JSON schema), parsed.

        ``method``: ``"json_schema"`` (the reply is constrained to the schema), ``"function_calling"``
        (a forced call of a tool whose arguments are the schema) or ``"json_mode"`` (constrained
        to any JSON object; the schema only parses it). ``include_raw`` returns
        ``{"raw", "parsed", "parsing_error"}``. Output always follows the constraint, so ``strict``
        changes nothing.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {', '.join(sorted(kwargs))}")
        if method != "json_mode" and schema is None:
            raise ValueError(f"method={method!r} needs a schema")
        if strict is not None and method == "json_mode":
            raise ValueError("strict is not supported with method='json_mode'")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        llm: Runnable
        parser: Runnable
        if method == "json_schema":
            llm = self.bind(json_schema=output_json_schema(schema), ls_structured_output_format=trace)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        elif method == "json_mode":
            trace["kwargs"] = {"method": method}
            llm = self.bind(json_schema={"type": "object"}, ls_structured_output_format=trace)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        elif method == "function_calling":
            tool_name = convert_to_openai_tool(schema)["function"]["name"]  # type: ignore[arg-type]
            llm = self.bind_tools([schema], tool_choice=tool_name,  # type: ignore[list-item]
                                  ls_structured_output_format=trace)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic  # type: ignore[list-item]
                      else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True))
        else:
            raise ValueError(f"method must be json_schema, function_calling or json_mode, not {method!r}")
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([no_parse], exception_key="parsing_error")


# -------------------------------------------------------------------------------------------------

def _scope_of(model: ChatParrot, run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
              ) -> tuple[DeferredScope, bool] | None:
    """The chain run's session this call joins, and whether its reply may be deferred: a
    compiled chain defers every reply; a followed chain (see auto.py) only those that flow
    into other calls."""
    scope = current_scope()
    if scope is not None:
        return scope, True
    if run_manager is None:
        return None
    return tracker().scope_for(model, run_manager.parent_run_id, run_manager.tags)


def _in_followed_chain(inputs: Sequence[Any]) -> bool:
    """Whether a batch's inputs hold deferred replies: then each input joins its chain run's
    session instead of the batch's own."""
    return current_scope() is not None or has_placeholder(list(inputs))


def _deferred(scope: DeferredScope, call: PreparedCall) -> ChatResult:
    """A reply that stands for the call's output variable until someone reads it."""
    [reply] = call.outputs
    return ChatResult(generations=[ChatGeneration(message=AIMessage(content=scope.defer(reply)))])


def _as_chunk(result: ChatResult) -> ChatGenerationChunk:
    """A whole reply as a stream's one chunk."""
    message = result.generations[0].message
    assert isinstance(message, AIMessage)
    calls = [tool_call_chunk(name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"],
                             index=i) for i, c in enumerate(message.tool_calls)]
    return ChatGenerationChunk(message=AIMessageChunk(
        content=message.content, tool_call_chunks=calls, usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata, chunk_position="last"))


def _ok(result: CallOutcome | ParrotError) -> CallOutcome:
    if isinstance(result, ParrotError):
        raise result
    return result
