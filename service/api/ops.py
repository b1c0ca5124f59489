"""Operations routes: liveness (``/healthz``), readiness (``/readyz``) and Prometheus metrics.

- ``/healthz`` answers whether the process is worth keeping: 200 unless no engine can ever
  serve again (every configured engine is in-process and its runner died: status
  ``failed``, 503), so a liveness probe restarts only a process that a restart would fix.
  A drain stays 200 (status ``draining``): killing a draining process would drop the work
  it is finishing. An engine marked down is ``degraded`` (it is probed and may come back).
- ``/readyz`` answers whether to send work now: 200 when not draining and at least one
  engine is up, else 503 with the reasons.
- ``POST /flush_cache`` (SGLang's route; ``/reset_prefix_cache`` is vLLM's name for it) empties
  every engine's prefix cache, keeping what running requests and pins hold: for benchmarks
  that repeat a run on cold caches, or to give the cache's memory back. An operator route,
  like the engine registry's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from parrot.service.api.auth import require_operator
from parrot.service.dispatch.registry import EngineRegistry
from parrot.service.drain import Drain
from parrot.service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)
router = APIRouter(tags=["ops"])


class EngineCounts(BaseModel):
    total: int
    up: int  # taking work now
    down: int  # marked down (probed until they answer), or stopped for good


class Health(BaseModel):
    status: Literal["ok", "degraded", "draining", "failed"]
    draining: bool
    engines: EngineCounts


class Readiness(Health):
    ready: bool
    reasons: list[str]  # why not, when not ready


def _health(request: Request) -> tuple[Health, bool]:
    """The service's health, and whether it can ever serve again."""
    registry: EngineRegistry = request.app.state.registry
    drain: Drain = request.app.state.drain
    handles = list(registry.handles.values())
    up = sum(h.down is None and h.engine.alive for h in handles)
    # Engine processes and servers may come back (or register anew); a dead runner may not.
    can_serve = not handles or any(h.engine.alive for h in handles)
    counts = EngineCounts(total=len(handles), up=up, down=len(handles) - up)
    if not can_serve:
        status = "failed"
    elif drain.draining:
        status = "draining"
    elif handles and up == len(handles):
        status = "ok"
    else:
        status = "degraded"
    return Health(status=status, draining=drain.draining, engines=counts), can_serve


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(request: Request) -> JSONResponse:
    health, can_serve = _health(request)
    return JSONResponse(health.model_dump(), status_code=200 if can_serve else 503)


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    health, can_serve = _health(request)
    reasons = []
    if health.draining:
        reasons.append("the service is draining")
    if not can_serve:
        reasons.append("no engine can serve again (an engine thread stopped)")
    elif not health.engines.up:
        reasons.append("no engine is up" if health.engines.total else "no engine has registered yet")
    ready = not reasons
    body = Readiness(**health.model_dump(), ready=ready, reasons=reasons)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(service_metrics.render(), media_type=service_metrics.content_type)


class Flushed(BaseModel):
    flushed: dict[str, bool]  # engine id -> whether its cache was flushed (False: none, or refused)


@router.post("/flush_cache", response_model=Flushed, dependencies=[Depends(require_operator)])
@router.post("/reset_prefix_cache", response_model=Flushed, dependencies=[Depends(require_operator)])
async def flush_cache(request: Request) -> Flushed:
    registry: EngineRegistry = request.app.state.registry
    handles = registry.engines()  # those taking work: one marked down is not reached
    done = await asyncio.gather(*(h.engine.flush_cache() for h in handles), return_exceptions=True)
    for handle, outcome in zip(handles, done, strict=True):
        if isinstance(outcome, BaseException):
            logger.warning("engine %s could not flush its prefix cache: %s", handle.id, outcome)
    return Flushed(flushed={h.id: ok is True for h, ok in zip(handles, done, strict=True)})
