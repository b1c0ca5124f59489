"""Wire schemas between the service and an engine process (``parrot engine``).

Engine process routes (JSON; errors are the service's usual ``{"error": {...}}`` bodies):

    GET  /info            -> EngineInfo (model, context length, tokenizer files)
    GET  /load            -> LoadInfo
    POST /generate        GenerateBody -> SSE: one GenerateOutput object per event
    POST /abort           RequestRef
    POST /priority        PriorityBody
    POST /pin_prefix      PinBody
    POST /unpin_prefix    PinRef

Service routes an engine process calls:

    POST   /v1/engines                    EngineRegistration -> Registered
    POST   /v1/engines/{id}/heartbeat     LoadInfo   (404: unknown, register again)
    DELETE /v1/engines/{id}               leaving
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from parrot.service.engine.base import Objective, SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadInfo(_Strict):
    num_running: int = 0
    num_waiting: int = 0
    kv_tokens_used: int = 0
    kv_tokens_total: int = 0
    cached_tokens: int = 0
    num_latency: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    busy_s: float = 0.0


class EngineInfo(BaseModel):
    model: str
    max_context_len: int
    prompt_prefix_ids: list[int]
    # The tokenizer as saved by ``save_pretrained``: file name -> base64 content, so the
    # service tokenizes exactly as the engine does, on any host.
    tokenizer_files: dict[str, str]


class GenerateBody(_Strict):
    rid: str = Field(min_length=1, max_length=256)
    input_ids: list[int]
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    objective: Objective = "latency"
    priority: int = 0
    group_id: str | None = None


class RequestRef(_Strict):
    rid: str


class PriorityBody(_Strict):
    rid: str
    priority: int
    objective: Objective


class Flushed(_Strict):
    flushed: bool


class PinRef(_Strict):
    pin_id: str = Field(min_length=1, max_length=256)


class PinBody(PinRef):
    input_ids: list[int]


class PrefillBody(_Strict):
    input_ids: list[int] = Field(min_length=1)
    priority: int = 0


class EngineRegistration(_Strict):
    url: str = Field(min_length=1, description="where the service reaches the engine process")
    model: str
    max_context_len: int = Field(gt=0)


class Registered(BaseModel):
    id: str
    heartbeat_interval_s: float
