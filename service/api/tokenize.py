"""``POST /tokenize`` and ``POST /detokenize``, in vLLM's shape.

``/tokenize`` takes ``{model?, prompt}`` or ``{model?, messages, add_generation_prompt?, tools?}``
and answers ``{"tokens": [...], "count": n, "max_model_len": m}``; chat messages are rendered
exactly as ``/v1/chat/completions`` renders them (tools included), so ``count`` is what such a
request's prompt costs. ``add_special_tokens`` defaults as in vLLM: true for a prompt (BOS and
the like, if the model adds any), false for messages (the chat template writes its own).
``/detokenize`` takes ``{model?, tokens}`` and answers ``{"prompt": text}``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from parrot import limits
from parrot.service.api.openai.protocol import ChatCompletionRequest, ChatMessage, ChatTool
from parrot.service.api.openai.serving import OpenAIServing
from parrot.service.api.openai.tools import chat_template_messages
from parrot.service.engine.base import InvalidRequestError
from parrot.service.engine.tokenizer import ModelTokenizer, off_loop
from parrot.service.errors import BadRequestError

router = APIRouter(tags=["tokenize"])


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=limits.MAX_SEGMENTS_PER_CALL)
    tools: list[ChatTool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.tools and self.messages is None:
            raise ValueError("tools go with messages")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


def get_serving(request: Request) -> OpenAIServing:
    return request.app.state.openai_serving


Serving = Annotated[OpenAIServing, Depends(get_serving)]


def _tokenize(tokenizer: ModelTokenizer, body: TokenizeRequest) -> list[int]:
    if body.prompt is not None:
        if body.add_special_tokens is False:
            return tokenizer.encode(body.prompt)
        return list(tokenizer.hf.encode(body.prompt, add_special_tokens=True))
    assert body.messages is not None  # the validator checked
    tool_use = (ChatCompletionRequest(messages=body.messages, tools=body.tools).tool_use
                if body.tools else None)
    messages, tools = chat_template_messages(body.messages, tool_use, body.tools,
                                             native_tools=tokenizer.supports_tools)
    try:
        text = tokenizer.render_chat_template(messages, tools=tools,
                                              add_generation_prompt=body.add_generation_prompt)
    except InvalidRequestError:  # the model has no chat template
        raise
    except Exception as exc:  # a template that raises (e.g. roles must alternate)
        raise BadRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc
    if body.add_special_tokens:
        return list(tokenizer.hf.encode(text, add_special_tokens=True))
    return tokenizer.encode(text)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, serving: Serving) -> TokenizeResponse:
    model = serving._model(body.model)
    tokenizer = await serving.dispatcher.tokenizer(model)
    chars = len(body.prompt or "") + sum(len(m.text()) for m in body.messages or ())
    tokens = await off_loop(chars, _tokenize, tokenizer, body)
    max_model_len = min(h.engine.max_context_len for h in await serving.dispatcher.engines(model))
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, serving: Serving) -> DetokenizeResponse:
    tokenizer = await serving.dispatcher.tokenizer(serving._model(body.model))
    vocab = tokenizer.vocab_size
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise BadRequestError(f"token ids {bad[:5]} are outside the vocabulary (size {vocab})",
                              param="tokens")
    return DetokenizeResponse(prompt=await off_loop(len(body.tokens) * 4, tokenizer.decode, body.tokens))
