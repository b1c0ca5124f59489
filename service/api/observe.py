"""What the operator sees: ``/v1/observe/*`` (JSON, polled by the dashboard and ``parrot top``)
and the dashboard itself at ``/dashboard``.

The JSON routes need the operator credential (``--admin-key`` or ``--cluster-secret``) when
keys are configured, exactly like the engine routes; they list every tenant's sessions
(``?tenant=`` filters). The dashboard page and its scripts are static files with no data in
them, so they are served to anyone; the page asks for the operator key and sends it with
each request.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from parrot.service.api.auth import require_operator
from parrot.service.dispatch.registry import EngineRegistry
from parrot.service.errors import NotFoundError
from parrot.service.observe import views
from parrot.service.observe.observer import Observer
from parrot.service.runtime.sessions import SessionManager

STATIC_DIR = Path(__file__).resolve().parent.parent / "dashboard" / "static"

router = APIRouter(prefix="/v1/observe", tags=["observe"], dependencies=[Depends(require_operator)])
pages = APIRouter(tags=["observe"])


def _observer(request: Request) -> Observer:
    return request.app.state.observer


def _sessions(request: Request) -> SessionManager:
    return request.app.state.sessions


@router.get("/summary")
async def summary(request: Request) -> dict[str, Any]:
    """Engines and their load, token totals, cache hit rate, tokens/s, sessions and calls."""
    observer = _observer(request)
    registry: EngineRegistry = request.app.state.registry
    sessions = _sessions(request).sessions.values()
    calls = {s: 0 for s in views.CALL_STATES}
    for session in sessions:
        for call in session.graph.calls.values():
            calls[call.state] += 1
    totals = dict(observer.totals)
    engines = []
    for handle in registry.handles.values():
        try:
            load: dict[str, Any] | None = vars(handle.engine.load()).copy()
        except Exception:  # noqa: BLE001 -- show the engine even when its load cannot be read
            load = None
        engines.append({"id": handle.id, "kind": handle.kind, "model": handle.model, "url": handle.url,
                        "up": handle.down is None and handle.engine.alive, "down": handle.down,
                        "load": load})
    now = time.time()
    return {
        "time": now, "uptime_s": now - observer.started_at, "engines": engines, "totals": totals,
        "cache_hit_rate": (totals["cached_tokens"] / totals["prompt_tokens"]) if totals["prompt_tokens"]
        else 0.0,
        "tokens_per_s": observer.tokens_per_s(),
        "requests_active": len(observer.active),
        "sessions_open": len(_sessions(request).sessions), "calls": calls,
    }


@router.get("/sessions")
async def list_sessions(request: Request, tenant: str | None = Query(None, max_length=256),
                        deleted: bool = Query(True, description="include recently deleted sessions")
                        ) -> dict[str, Any]:
    """Sessions, newest first: the open ones, then (``deleted``) recently deleted ones."""
    observer = _observer(request)
    data = [views.session_summary(s, observer) for s in _sessions(request).sessions.values()
            if tenant is None or s.tenant.name == tenant]
    if deleted:
        data += [{k: v for k, v in snap.items() if k not in ("calls", "variables", "edges", "critical_path")}
                 for snap in observer.deleted if tenant is None or snap["tenant"] == tenant]
    data.sort(key=lambda s: s["created"] or 0.0, reverse=True)
    return {"object": "list", "data": data}


@router.get("/sessions/{session_id}")
async def session_graph(request: Request, session_id: str) -> dict[str, Any]:
    """One session's graph: calls (state, objective, engine, timings, tokens), variables (no
    values), edges between calls and the critical path."""
    observer = _observer(request)
    session = _sessions(request).sessions.get(session_id)
    if session is not None:
        return views.session_graph(session, observer)
    for snap in reversed(observer.deleted):
        if snap["id"] == session_id:
            return snap
    raise NotFoundError(f"session {session_id!r} not found", param="session_id")


@router.get("/engines")
async def engines(request: Request, since: float = Query(0.0, description="wall-clock seconds: only "
                                                                          "requests ended and samples "
                                                                          "taken after this")
                  ) -> dict[str, Any]:
    """Per engine: its load now, its recent requests (which call ran when) and load samples
    (batch size and queue depth over time)."""
    observer = _observer(request)
    registry: EngineRegistry = request.app.state.registry
    return {"object": "list", "time": time.time(),
            "data": [views.engine_view(h, observer, since) for h in registry.handles.values()]}


@pages.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def install_dashboard(app: FastAPI) -> None:
    """The observe routes, the dashboard page and its static files (scripts vendored, no CDN)."""
    app.include_router(router)
    app.include_router(pages)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
