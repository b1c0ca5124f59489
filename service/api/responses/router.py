"""HTTP routes of ``/v1/responses``: they only translate HTTP; ``ResponsesServing`` works."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from parrot.service.api.auth import request_tenant
from parrot.service.api.http import EventStream, run_until_disconnect, sse_response
from parrot.service.api.responses.protocol import ResponseObject, ResponsesRequest
from parrot.service.api.responses.serving import ResponsesServing

router = APIRouter(prefix="/v1", tags=["responses"])


def get_serving(request: Request) -> ResponsesServing:
    state = request.app.state
    serving = getattr(state, "responses_serving", None)
    if serving is None:  # one per app, over its OpenAI serving (and so its dispatcher)
        serving = state.responses_serving = ResponsesServing(state.openai_serving)
    return serving


Serving = Annotated[ResponsesServing, Depends(get_serving)]


@router.post("/responses", response_model=ResponseObject)
async def create_response(body: ResponsesRequest, raw: Request, serving: Serving) -> Response:
    result = await run_until_disconnect(raw, serving.create(body, request_tenant(raw)))
    if isinstance(result, EventStream):
        return sse_response(result)
    return result  # type: ignore[return-value]  # a response model; FastAPI serializes it


@router.get("/responses/{response_id}", response_model=ResponseObject)
async def retrieve_response(response_id: str, raw: Request, serving: Serving) -> ResponseObject:
    return serving.retrieve(response_id, request_tenant(raw))


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, raw: Request, serving: Serving) -> dict[str, Any]:
    return serving.delete(response_id, request_tenant(raw))
