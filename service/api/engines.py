"""HTTP routes of the engine registry: list engines; engine processes register and heartbeat."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from parrot.service.dispatch.registry import EngineHandle, EngineRegistry
from parrot.service.dispatch.scheduler import GlobalScheduler
from parrot.service.engine.remote.protocol import EngineRegistration, LoadInfo, Registered

router = APIRouter(prefix="/v1/engines", tags=["engines"])


def _registry(request: Request) -> EngineRegistry:
    return request.app.state.registry


def engine_info(handle: EngineHandle, scheduler: GlobalScheduler) -> dict:
    stats = scheduler.stats.get(handle.id)
    return {
        "id": handle.id,
        "kind": handle.kind,  # builtin, remote (an engine process), sglang or openai
        "registered": handle.registered,  # an engine process that registered itself
        "down": handle.down,  # why it gets no work now, if so
        "url": handle.url,
        "model": handle.model,
        "max_context_len": handle.engine.max_context_len,
        "load": asdict(handle.engine.load()),
        "in_flight": {"latency": stats.latency, "throughput": stats.throughput} if stats else
                     {"latency": 0, "throughput": 0},
    }


@router.get("")
async def list_engines(request: Request) -> dict:
    scheduler: GlobalScheduler = request.app.state.scheduler
    handles = _registry(request).handles.values()  # those marked down too
    return {"object": "list", "data": [engine_info(h, scheduler) for h in handles]}


@router.post("")
async def register_engine(request: Request, body: EngineRegistration) -> Registered:
    registry = _registry(request)
    handle = await registry.register_remote(body)
    return Registered(id=handle.id, heartbeat_interval_s=registry.heartbeat_interval_s)


@router.post("/{engine_id}/heartbeat")
async def heartbeat(request: Request, engine_id: str, body: LoadInfo) -> dict:
    _registry(request).heartbeat(engine_id, body)
    return {"ok": True}


@router.delete("/{engine_id}")
async def deregister_engine(request: Request, engine_id: str) -> dict:
    registry = _registry(request)
    registry.get(engine_id)  # 404 when unknown
    await registry.remove(engine_id, "it left")
    return {"id": engine_id, "deleted": True}
