"""HTTP routes of the OpenAI-compatible API: they only translate HTTP; ``OpenAIServing`` works."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from parrot.service.api.auth import request_tenant
from parrot.service.api.http import EventStream, run_until_disconnect, sse_response
from parrot.service.api.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from parrot.service.api.openai.serving import OpenAIServing

router = APIRouter(prefix="/v1", tags=["openai"])


def get_serving(request: Request) -> OpenAIServing:
    return request.app.state.openai_serving


Serving = Annotated[OpenAIServing, Depends(get_serving)]


@router.get("/models", response_model=ModelList)
async def list_models(serving: Serving) -> ModelList:
    return serving.list_models()


@router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, serving: Serving) -> ModelCard:
    return serving.get_model(model)


def _to_http(result: object) -> Response:
    if isinstance(result, EventStream):
        return sse_response(result)
    return result  # type: ignore[return-value]  # a response model; FastAPI serializes it


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, raw: Request, serving: Serving) -> Response:
    return _to_http(await run_until_disconnect(raw, serving.create_completion(body, request_tenant(raw))))


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, raw: Request,
                                 serving: Serving) -> Response:
    return _to_http(await run_until_disconnect(raw, serving.create_chat_completion(body,
                                                                                   request_tenant(raw))))
