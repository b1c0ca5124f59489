"""Operations routes: liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from parrot.service.metrics import ServiceMetrics

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(service_metrics.render(), media_type=service_metrics.content_type)
