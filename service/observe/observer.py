"""The service's observer: one place the dispatcher, the executor and the sessions report to.

From those reports it keeps the Prometheus metrics (``ServiceMetrics``), writes the log lines
about requests, calls and sessions (with their ids), opens and closes the trace spans, and
keeps a bounded in-memory record (recent engine requests, engine load samples, recently
deleted sessions) that ``/v1/observe`` and the dashboard read.

    session created ──► session span
      call started (its task) ──► ids bound, call span current
        request opened ──► request placed ──► outputs ... ──► finished | aborted | failed
      call ended ──► call metrics; the graph's last call ──► session makespan
    session deleted ──► a snapshot kept for the dashboard; session span ends

Every hook is cheap and never raises into the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from parrot.service.engine.base import GenerateOutput
from parrot.service.metrics import ServiceMetrics
from parrot.service.observe import ids
from parrot.service.observe.tracing import NoTracing, Span, Tracing

if TYPE_CHECKING:
    from parrot.service.dispatch.dispatcher import DispatchRequest
    from parrot.service.dispatch.registry import EngineHandle, EngineRegistry
    from parrot.service.runtime.graph import Call
    from parrot.service.runtime.sessions import Session

logger = logging.getLogger("parrot.service.observe")

DEFAULT_SAMPLE_INTERVAL_S = 0.5
DEFAULT_HISTORY = 4096  # engine requests kept for the timeline
DEFAULT_SAMPLES = 1200  # load samples kept per engine (10 minutes at the default interval)
DEFAULT_DELETED_SESSIONS = 32  # deleted sessions whose graph the dashboard can still show


@dataclass(eq=False)
class RequestRecord:
    """One engine request as the dispatcher saw it; times are wall clock (``time.time``)."""

    id: str
    endpoint: str
    objective: str
    tenant: str
    session: str | None
    call: str | None
    opened: float
    prompt_tokens: int
    placed: float | None = None
    first_token: float | None = None
    ended: float | None = None
    engine: str | None = None
    cached_tokens: int = 0
    output_tokens: int = 0
    outcome: str | None = None  # stop, length, abort, error
    span: Span | None = None
    _mono_opened: float = field(default_factory=time.monotonic)
    _mono_first: float | None = None
    _streamed: int = 0  # tokens seen so far (the live tokens/s)
    _text: list[str] | None = None  # the output, kept only with log_prompts

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "span"}


@dataclass
class LoadSample:
    t: float
    num_running: int
    num_waiting: int
    kv_tokens_used: int
    kv_tokens_total: int
    num_preemptions: int


class Observer:
    def __init__(self, metrics: ServiceMetrics, tracing: Tracing | None = None, *, log_prompts: bool = False,
                 sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S, history: int = DEFAULT_HISTORY,
                 samples: int = DEFAULT_SAMPLES, deleted_sessions: int = DEFAULT_DELETED_SESSIONS) -> None:
        self.metrics = metrics
        self.tracing = tracing or NoTracing()
        self.log_prompts = log_prompts
        self.sample_interval_s = sample_interval_s
        self.started_at = time.time()
        self.requests: deque[RequestRecord] = deque(maxlen=history)  # finished, oldest first
        self.active: dict[str, RequestRecord] = {}
        self.load_samples: dict[str, deque[LoadSample]] = {}
        self._samples = samples
        # (time, output tokens streamed, prompt tokens, cached tokens), for tokens/s
        self.token_samples: deque[tuple[float, int, int, int]] = deque(maxlen=samples)
        self.deleted: deque[dict[str, Any]] = deque(maxlen=deleted_sessions)  # snapshots, newest last
        self.totals = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generation_tokens": 0}
        self._streamed_total = 0
        self._ids = itertools.count()
        self._session_of: weakref.WeakKeyDictionary[Call, str] = weakref.WeakKeyDictionary()
        self._call_spans: weakref.WeakKeyDictionary[Call, Span] = weakref.WeakKeyDictionary()
        self._ended: weakref.WeakSet[Call] = weakref.WeakSet()
        self._graph_open: dict[str, set[str]] = {}  # session id -> ids of its calls not yet ended
        self._graph_calls: dict[str, list[Call]] = {}  # session id -> calls of its open graph run
        self.session_created_at: dict[str, float] = {}
        self.makespans: dict[str, float] = {}  # session id -> its last finished graph run's makespan
        self._sampler: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self, registry: EngineRegistry) -> None:
        async def sample() -> None:
            while True:
                self.sample(registry)
                await asyncio.sleep(self.sample_interval_s)

        self._sampler = asyncio.create_task(sample())
        registry.on_removed.append(lambda handle: self.load_samples.pop(handle.id, None))

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        self.tracing.shutdown()

    def sample(self, registry: EngineRegistry) -> None:
        """Record every engine's load and the service's token counts now."""
        now = time.time()
        for handle in list(registry.handles.values()):
            try:
                load = handle.engine.load()
            except Exception:  # noqa: BLE001 -- a sample is best effort
                continue
            series = self.load_samples.setdefault(handle.id, deque(maxlen=self._samples))
            series.append(LoadSample(now, load.num_running, load.num_waiting, load.kv_tokens_used,
                                     load.kv_tokens_total, load.num_preemptions))
        self.token_samples.append((now, self._streamed_total, self.totals["prompt_tokens"],
                                   self.totals["cached_tokens"]))

    def tokens_per_s(self, window_s: float = 5.0) -> float:
        """Output tokens per second over the last ``window_s`` of samples (and now)."""
        now = time.time()
        points = [s for s in self.token_samples if s[0] >= now - window_s]
        if not points:
            return 0.0
        t0, n0 = points[0][0], points[0][1]
        return (self._streamed_total - n0) / max(now - t0, 1e-3)

    # ---- engine requests (from the dispatcher) --------------------------------------------
    def request_opened(self, request: DispatchRequest) -> RequestRecord:
        request_id = request.request_id or f"req-{next(self._ids)}"
        bound = ids.current()
        rec = RequestRecord(
            id=request_id, endpoint=request.endpoint, objective=request.objective,
            tenant=bound.get("tenant", "default"), session=bound.get("session"), call=bound.get("call"),
            opened=time.time(), prompt_tokens=len(request.prompt_token_ids),
            _text=[] if self.log_prompts else None,
        )
        ids.request_id.set(request_id)  # this task's later lines are about this request
        if self.tracing.enabled:
            rec.span = self._request_span(request, rec)
        self.active[request_id] = rec
        return rec

    def _request_span(self, request: DispatchRequest, rec: RequestRecord) -> Span | None:
        return self.tracing.start_request({
            "parrot.request.id": rec.id, "parrot.endpoint": request.endpoint,
            "parrot.objective": request.objective, "parrot.tenant": rec.tenant,
            "gen_ai.request.max_tokens": request.sampling.max_new_tokens,
            "gen_ai.usage.input_tokens": rec.prompt_tokens,
            **({"parrot.session.id": rec.session} if rec.session else {}),
            **({"parrot.call.id": rec.call} if rec.call else {}),
        })

    def request_placed(self, rec: RequestRecord, handle: EngineHandle) -> None:
        if rec.placed is None:
            rec.placed = time.time()
            self.metrics.queue_time.labels(rec.objective).observe(time.monotonic() - rec._mono_opened)
        rec.engine = handle.id

    def request_output(self, rec: RequestRecord, out: GenerateOutput) -> None:
        if rec._mono_first is None and (out.token_ids or out.text):
            rec._mono_first, rec.first_token = time.monotonic(), time.time()
        n = len(out.token_ids) or (1 if out.text else 0)
        rec._streamed += n
        self._streamed_total += n
        if rec._text is not None and out.text:
            rec._text.append(out.text)

    def request_finished(self, rec: RequestRecord, out: GenerateOutput, handle: EngineHandle | None,
                         prompt_token_ids: list[int] | None = None) -> None:
        outcome = "error" if out.error else (out.finish_reason or "unknown")
        rec.prompt_tokens = out.num_prompt_tokens or rec.prompt_tokens
        rec.cached_tokens, rec.output_tokens = out.num_cached_tokens, out.num_output_tokens
        if handle is not None:
            rec.engine = handle.id
        m = self.metrics
        m.prompt_tokens.labels(rec.tenant).inc(rec.prompt_tokens)
        m.cached_prompt_tokens.labels(rec.tenant).inc(rec.cached_tokens)
        m.generation_tokens.labels(rec.tenant).inc(rec.output_tokens)
        if rec.engine is not None:
            m.prefix_cache_queries.labels(rec.engine).inc(rec.prompt_tokens)
            m.prefix_cache_hits.labels(rec.engine).inc(rec.cached_tokens)
        self.totals["prompt_tokens"] += rec.prompt_tokens
        self.totals["cached_tokens"] += rec.cached_tokens
        self.totals["generation_tokens"] += rec.output_tokens
        now = time.monotonic()
        if not out.error:
            m.e2e.labels(rec.objective).observe(now - rec._mono_opened)
            if rec._mono_first is not None:
                m.ttft.labels(rec.objective).observe(rec._mono_first - rec._mono_opened)
                if rec.output_tokens > 1:
                    m.tpot.labels(rec.objective).observe((now - rec._mono_first) / (rec.output_tokens - 1))
        extra: dict[str, Any] = {}
        if self.log_prompts:
            if prompt_token_ids is not None and handle is not None:
                with contextlib.suppress(Exception):
                    extra["prompt"] = handle.engine.tokenizer.decode(prompt_token_ids)
            extra["output"] = "".join(rec._text or [])
        self._end_request(rec, outcome, out.error, extra)

    def request_aborted(self, rec: RequestRecord) -> None:
        self._end_request(rec, "abort", None, {})

    def request_failed(self, rec: RequestRecord, error: str, outcome: str = "error") -> None:
        """Ended by an exception; ``rejected``: the engine refused it (a 400)."""
        self._end_request(rec, outcome, error, {})

    def _end_request(self, rec: RequestRecord, outcome: str, error: str | None,
                     extra: dict[str, Any]) -> None:
        if rec.ended is not None:
            return
        rec.ended, rec.outcome = time.time(), outcome
        self.active.pop(rec.id, None)
        self.requests.append(rec)
        self.totals["requests"] += 1
        self.metrics.requests.labels(rec.endpoint, rec.objective, rec.tenant, outcome).inc()
        if rec.span is not None:
            self.tracing.end_span(rec.span, {
                "parrot.engine.id": rec.engine or "", "gen_ai.usage.input_tokens": rec.prompt_tokens,
                "gen_ai.usage.output_tokens": rec.output_tokens, "parrot.cached_tokens": rec.cached_tokens,
                "parrot.finish_reason": outcome}, error)
        rec.span = None
        rec._text = None
        took = rec.ended - rec.opened
        level = logging.WARNING if outcome == "error" else logging.INFO
        logger.log(level, "request %s on %s: %s after %.3f s, %d prompt tokens (%d cached), %d output%s",
                   outcome, rec.engine or "no engine", rec.objective, took, rec.prompt_tokens,
                   rec.cached_tokens, rec.output_tokens, f": {error}" if error else "",
                   extra={"request": rec.id, "session": rec.session, "call": rec.call, "tenant": rec.tenant,
                          "engine": rec.engine, "endpoint": rec.endpoint, "objective": rec.objective,
                          "outcome": outcome, "duration_s": round(took, 6),
                          "prompt_tokens": rec.prompt_tokens, "cached_tokens": rec.cached_tokens,
                          "output_tokens": rec.output_tokens, **extra})

    # ---- sessions and calls (from the runtime) --------------------------------------------
    def session_created(self, session: Session) -> None:
        self.session_created_at[session.id] = time.time()
        self.metrics.sessions_created.labels(session.tenant.name).inc()
        self.metrics.sessions_open.inc()
        self.tracing.start_session(session.id, {"parrot.session.id": session.id,
                                                "parrot.tenant": session.tenant.name})
        logger.info("session created", extra={"session": session.id, "tenant": session.tenant.name})

    def session_deleted(self, session: Session) -> None:
        from parrot.service.observe.views import session_graph

        self.metrics.sessions_open.dec()
        self._graph_open.pop(session.id, None)
        self._graph_calls.pop(session.id, None)
        if session.graph.calls:  # the dashboard can still show a finished app's graph
            with contextlib.suppress(Exception):
                self.deleted.append(session_graph(session, self, deleted=True))
        self.session_created_at.pop(session.id, None)
        self.makespans.pop(session.id, None)
        self.tracing.end_session(session.id)
        logger.info("session deleted", extra={"session": session.id, "tenant": session.tenant.name})

    def calls_added(self, session: Session, calls: list[Call]) -> None:
        open_calls = self._graph_open.setdefault(session.id, set())
        run = self._graph_calls.setdefault(session.id, [])
        for call in calls:
            self._session_of[call] = session.id
            if not call.is_terminal:
                open_calls.add(call.id)
                run.append(call)
        logger.info("graph submitted: %d calls", len(calls),
                    extra={"session": session.id, "tenant": session.tenant.name})

    def call_started(self, call: Call) -> None:
        """Called first thing in the call's own task: binds its ids for every line and span
        made while it runs."""
        session_id = self._session_of.get(call)
        tenant = call.tenant.name if call.tenant is not None else "default"
        ids.bind(tenant=tenant, session=session_id, call=call.id)
        if not self.tracing.enabled:
            return
        span = self.tracing.start_call(session_id, {
            "parrot.call.id": call.id, "parrot.call.name": call.name or "",
            "parrot.session.id": session_id or "", "parrot.tenant": tenant,
            "parrot.objective": _objective(call), "parrot.priority": call.priority,
        })
        if span is not None:
            self._call_spans[call] = span

    def call_ended(self, call: Call) -> None:
        if call in self._ended:
            return
        self._ended.add(call)
        tenant = call.tenant.name if call.tenant is not None else "default"
        objective = _objective(call)
        session_id = self._session_of.get(call)
        if call.kind == "llm":
            self.metrics.calls.labels(objective, tenant, call.state).inc()
            if call.state == "done" and call.started is not None and call.finished is not None:
                self.metrics.call_latency.labels(objective).observe(max(0.0, call.finished - call.started))
            if call.started is not None:
                self.metrics.call_wait.labels(objective).observe(max(0.0, call.started - call.created))
        span = self._call_spans.pop(call, None)
        self.tracing.end_span(span, {"parrot.call.state": call.state,
                                     "parrot.engine.id": call.engine_id or "",
                                     "gen_ai.usage.input_tokens": call.prompt_tokens,
                                     "gen_ai.usage.output_tokens": call.output_tokens,
                                     "parrot.cached_tokens": call.cached_tokens},
                              call.error if call.state == "failed" else None)
        took = (call.finished or time.time()) - (call.started or call.created)
        logger.log(logging.WARNING if call.state == "failed" else logging.INFO,
                   "call %s %s after %.3f s%s", call.name or call.id, call.state, took,
                   f": {call.error}" if call.error and call.state != "done" else "",
                   extra={"call": call.id, "session": session_id, "tenant": tenant, "state": call.state,
                          "objective": objective, "engine": call.engine_id, "duration_s": round(took, 6),
                          "prompt_tokens": call.prompt_tokens, "cached_tokens": call.cached_tokens,
                          "output_tokens": call.output_tokens})
        if session_id is None:
            return
        open_calls = self._graph_open.get(session_id)
        if open_calls is None:
            return
        open_calls.discard(call.id)
        if not open_calls:
            run = self._graph_calls.pop(session_id, [])
            del self._graph_open[session_id]
            if run and all(c.state == "done" for c in run):
                makespan = max(c.finished or 0.0 for c in run) - min(c.created for c in run)
                self.makespans[session_id] = makespan
                self.metrics.session_makespan.observe(max(0.0, makespan))
                logger.info("graph of %d calls done in %.3f s", len(run), makespan,
                            extra={"session": session_id, "tenant": tenant,
                                   "makespan_s": round(makespan, 6)})


def _objective(call: Call) -> str:
    # As the executor places it (objectives.objective_of): unfetched work runs as throughput.
    return "throughput" if call.criterion in (None, "throughput") else "latency"
