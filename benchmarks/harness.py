"""Shared plumbing of the application benchmarks: start a service (and engine processes),
run an app against it the Parrot way or the request-centric way, print a table of ratios.

The request-centric way is how an app drives an OpenAI-compatible endpoint today
(LangChain's LCEL): one HTTP call per LLM call, dependencies resolved in the client,
and parallel steps (``batch``, ``.map()``, ``RunnableParallel``) run on a thread pool
of LangChain's default size, ``min(32, cpu_count + 4)`` workers. The service sees each
call alone and serves it first come, first served. Parrot's way submits the app's
calls as one graph of semantic variables and fetches only the final outputs.

Both ways run on the same engines. The request-centric run comes in two tunings,
as a deployment must pick one without app knowledge: ``throughput-tuned`` (an
uncapped batch) and ``latency-tuned`` (at most ``LATENCY_TUNED_BATCH`` requests per
batch, the size the Parrot paper's latency-oriented baselines keep). Every system runs on a
service of its own, warmed up the same way before it is timed (see ``_warm_up``).

Each system runs ``--repeats`` times (``REPEATS``), the systems taking turns, each run on a
flushed prefix cache (``POST /flush_cache``); a table shows each system's median. Taking
turns spreads the machine's own slow spells (on a shared 2-core host a decode step can run
10-20% slower for a second or two) over every system, instead of charging them to whichever
ran then. Each row also shows the engine time of a run (the engines' ``busy_s`` counters):
what the app cost the engines, the rest of the end-to-end time being waits and overheads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from rich.console import Console
from rich.table import Table

from benchmarks.network import DelayedLink

T = TypeVar("T")

LANGCHAIN_WORKERS = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default size
LATENCY_TUNED_BATCH = 4
REPEATS = 3
console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass(frozen=True)
class EngineSetup:
    """How each engine of a run is configured (``parrot serve`` / ``parrot engine`` options)."""

    max_running: int = 64
    latency_step_tokens: int = 0  # 0: objective-blind batching
    prefix_caching: bool = True
    threads: int | None = None
    prefill_ahead: bool = True  # the service prefills waiting calls' known prompt starts (serve only)
    # The KV pool: these workloads need under 10k tokens (46 KB each for the default model), and
    # every system of a benchmark keeps its service up while the others run.
    kv_cache_gib: float = 0.5

    def flags(self) -> list[str]:
        out = ["--max-running", str(self.max_running), "--latency-step-tokens", str(self.latency_step_tokens),
               "--prefix-caching" if self.prefix_caching else "--no-prefix-caching",
               "--kv-cache-gib", str(self.kv_cache_gib)]
        return out + (["--threads", str(self.threads)] if self.threads else [])


THROUGHPUT_TUNED = EngineSetup()
LATENCY_TUNED = EngineSetup(max_running=LATENCY_TUNED_BATCH)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_service(setup: EngineSetup, engine_processes: int = 0) -> Iterator[str]:
    """A fresh ``parrot serve`` (cold caches) on a free port; with ``engine_processes`` > 0 it has
    no engine of its own and that many ``parrot engine`` processes register with it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "parrot.service"]
    serve = [*cmd, "serve", "--port", str(port), "--log-level", "warning", *setup.flags()]
    if not setup.prefill_ahead:
        serve += ["--prefill-ahead-min-tokens", "0"]
    if engine_processes:
        serve.append("--no-local-engine")
    procs = [subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait(url, lambda http: http.get("/healthz").status_code == 200, procs)
        for _ in range(engine_processes):
            procs.append(subprocess.Popen([*cmd, "engine", "--service", url, *setup.flags()],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wanted = max(engine_processes, 1)
        _wait(url, lambda http: len(http.get("/v1/engines").json()["data"]) == wanted, procs)
        with ThreadPoolExecutor(1) as thread:  # its own event loop, whoever's loop runs here
            thread.submit(asyncio.run, _warm_up(url, wanted)).result()
        yield url
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


WARM_UP_PROMPT = "Warm-up number {i}: count from one to ten."


async def _warm_up(url: str, engines: int) -> None:
    """What every system pays once on a fresh service, before any timing: each engine's first
    steps (memory first touched, kernels loaded, threads started) and both request paths (an
    OpenAI completion, a Parrot call), with prompts no benchmark uses."""
    import parrot as P

    async with Completions(url) as llm:
        await asyncio.gather(*(llm(WARM_UP_PROMPT.format(i=i), 8) for i in range(engines)))
    warm = P.SemanticFunction.from_template(WARM_UP_PROMPT.format(i="parrot") + "{{output:text}}",
                                            name="warm_up", outputs={"text": P.Output(max_tokens=8)})
    async with P.Parrot(url):
        await warm().aget()


def _wait(url: str, ready: Callable[[httpx.Client], bool], procs: list[subprocess.Popen],
          timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a process of the service at {url} exited during start-up")
            with contextlib.suppress(httpx.HTTPError):
                if ready(http):
                    return
            time.sleep(0.2)
    raise RuntimeError(f"the service at {url} did not come up in {timeout_s:g} s")


def flush_caches(url: str, setup: EngineSetup) -> None:
    """Empty the service's prefix caches, so the next run starts cold as on a fresh service."""
    flushed = httpx.post(f"{url}/flush_cache", timeout=60).raise_for_status().json()["flushed"]
    if setup.prefix_caching and not all(flushed.values()):
        raise RuntimeError(f"the service at {url} did not flush every engine's cache: {flushed}")


def served_model(url: str) -> str:
    """The service's default model, for the clients that must name one (``ChatOpenAI``, SK)."""
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def engine_busy_s(url: str) -> float:
    """The time the service's engines have spent in steps so far, all engines together. An engine
    process is asked itself (the service's copy of its load is as old as its last heartbeat)."""
    total = 0.0
    with httpx.Client(timeout=30) as http:
        for engine in http.get(f"{url}/v1/engines").json()["data"]:
            if engine["kind"] == "remote":
                total += http.get(f"{engine['url']}/load").json()["busy_s"]
            else:
                total += engine["load"]["busy_s"]
    return total


@dataclass(frozen=True)
class System:
    """One way of running the app: ``job(url)`` runs it once on a service set up by ``setup`` (with
    ``engine_processes`` engine processes, if any) and returns its ``Measured`` time."""

    name: str
    setup: EngineSetup
    job: Callable[[str], Measured]
    engine_processes: int = 0


def measure_systems(systems: Sequence[System], repeats: int = REPEATS, rtt_ms: float = 0.0) -> list[Row]:
    """Each system's median over ``repeats`` runs: every system gets a service of its own, started
    up front; then the systems take turns (the first to go rotates), each run on a flushed cache.
    ``rtt_ms``: the apps reach their services over an emulated network with this round-trip time
    (``benchmarks.network``); 0 is loopback."""
    runs: dict[str, list[Measured]] = {s.name: [] for s in systems}
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(running_service(s.setup, s.engine_processes)) for s in systems]
        app_urls = [stack.enter_context(DelayedLink(url, rtt_ms / 1000)) if rtt_ms else url for url in urls]
        for r in range(repeats):
            for k in range(len(systems)):
                i = (k + r) % len(systems)
                system, url = systems[i], urls[i]
                flush_caches(url, system.setup)
                before = engine_busy_s(url)
                measured = system.job(app_urls[i])
                if measured.engine_s is None:  # a job with untimed warm-up work counts its own
                    measured.engine_s = engine_busy_s(url) - before
                runs[system.name].append(measured)
    return [dataclasses.replace(_median_row(name, measured), rtt_ms=rtt_ms)
            for name, measured in runs.items()]


def measure_same_app(systems: Sequence[System], args: Any, outputs: set) -> list[Row]:
    """``measure_systems`` for systems that run one app with different clients, each adding what
    the app wrote to ``outputs``: says whether they all wrote the same."""
    rows = measure_systems(systems, args.repeats, args.rtt_ms)
    print(f"identical outputs: {'yes' if len(outputs) == 1 else 'no'}")
    return rows


def with_model(make_model: Callable[[str], Any], run_app: Callable[[Any], Any], outputs: set,
               ) -> Callable[[str], Measured]:
    """A system's job for an app that keeps one chat model per service, as an app does: the first
    time, the model is made and called once (connections, first-call costs: untimed); each run
    times ``run_app(model)``, counts its engine time and adds its result to ``outputs``."""
    models: dict[str, Any] = {}

    def once(url: str) -> Measured:
        if url not in models:
            models[url] = make_model(url)
            models[url].invoke("Say hello.", max_tokens=4)
        busy = engine_busy_s(url)
        started = time.perf_counter()
        outputs.add(run_app(models[url]))
        return Measured(time.perf_counter() - started, engine_s=engine_busy_s(url) - busy)
    return once


def _median_row(system: str, runs: list[Measured]) -> Row:
    """The run of median end-to-end time (the lower middle one of an even count), with its engine
    time; each extra column is its own median."""
    middle = sorted(runs, key=lambda m: m.seconds)[(len(runs) - 1) // 2]
    extra = {key: statistics.median(m.extra[key] for m in runs) for key in runs[0].extra}
    return Row(system, middle.seconds, extra, engine_s=middle.engine_s, runs=len(runs))


async def langchain_batch(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` as LangChain's ``batch`` does: at most ``LANGCHAIN_WORKERS`` at a time, in order."""
    gate = asyncio.Semaphore(LANGCHAIN_WORKERS)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


class Completions:
    """The request-centric client: ``/v1/completions``, one call per LLM call, greedy,
    exactly ``max_tokens`` generated (so both ways do the same work)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=600)

    async def __call__(self, prompt: str, max_tokens: int) -> str:
        resp = await self.http.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        resp.raise_for_status()
        return resp.json()["choices"][0]["text"]

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Completions:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass
class Row:
    system: str
    seconds: float  # end to end (the median run's, when the system ran more than once)
    extra: dict[str, float] = field(default_factory=dict)
    engine_s: float | None = None  # the engines' time in steps during a run (the median run's)
    runs: int = 1
    rtt_ms: float = 0.0  # the emulated network's round trip between app and service


@dataclass
class Measured:
    """What a Parrot-way job may return instead of its result: its own end-to-end time, from its
    session being open to the answer in hand (as the request-centric way is timed from its client
    being open, not counting what the job reads back afterwards), and extra table columns."""

    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    engine_s: float | None = None  # the engines' time in steps meanwhile (``measure_systems`` sets it)


def ttft_ms(call: Any) -> float | None:
    """A call's time to first token from the moment its inputs were all set (``CallInfo``), in ms."""
    timings = call.timings
    if timings.started is None or timings.first_token is None:
        return None
    return (timings.first_token - timings.started) * 1000


def print_table(title: str, rows: list[Row], reference: str, extra_columns: Sequence[str] = (),
                note: str = "") -> None:
    """One row per system; the last column is the row's end-to-end time over ``reference``'s,
    so 2.00x means ``reference`` finished twice as fast as that row's system."""
    parrot = next(r for r in rows if r.system == reference)
    runs, rtt_ms = max(r.runs for r in rows), max(r.rtt_ms for r in rows)
    title += f", {rtt_ms:g} ms network round trips" if rtt_ms else ""
    table = Table(title=title + (f" (median of {runs} runs each)" if runs > 1 else ""), title_justify="left")
    table.add_column("system")
    table.add_column("end to end s", justify="right")
    table.add_column("engine busy s", justify="right")
    for name in extra_columns:
        table.add_column(name, justify="right")
    table.add_column(f"{reference} speed-up", justify="right")
    for row in rows:
        cells = [f"{row.extra[c]:.1f}" if c in row.extra else "-" for c in extra_columns]
        busy = "-" if row.engine_s is None else f"{row.engine_s:.2f}"
        table.add_row(row.system, f"{row.seconds:.2f}", busy, *cells, f"{row.seconds / parrot.seconds:.2f}x")
    console.print(table)
    if note:
        console.print(note)


async def timed(coro: Awaitable[T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = await coro
    return time.perf_counter() - started, result


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def compare_three_ways(parrot_way: Callable[[str], Awaitable[Any]],
                       request_centric_way: Callable[[Completions], Awaitable[Any]],
                       parrot_variants: Sequence[tuple[str, EngineSetup]] = (),
                       repeats: int = REPEATS, rtt_ms: float = 0.0) -> list[Row]:
    """End-to-end time of an app run Parrot's way (given the service URL) and the request-centric
    way (given its client), throughput- and latency-tuned (``measure_systems``).
    ``parrot_variants``: more Parrot rows, each on a service set up its own way (an ablation).
    A Parrot-way job that returns ``Measured`` gives its own time and extra columns."""

    async def parrot(url: str) -> Measured:
        seconds, result = await timed(parrot_way(url))
        return result if isinstance(result, Measured) else Measured(seconds)

    async def request_centric(url: str) -> Measured:
        async with Completions(url) as llm:
            return Measured((await timed(request_centric_way(llm)))[0])

    def job(fn: Callable[[str], Awaitable[Measured]]) -> Callable[[str], Measured]:
        return lambda url: run(fn(url))

    return measure_systems([System("parrot", THROUGHPUT_TUNED, job(parrot)),
                            *(System(name, variant, job(parrot)) for name, variant in parrot_variants),
                            System("throughput-tuned", THROUGHPUT_TUNED, job(request_centric)),
                            System("latency-tuned", LATENCY_TUNED, job(request_centric))], repeats, rtt_ms)


def add_run_options(parser: Any) -> None:
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help="runs of each system, taking turns on flushed caches; tables show medians "
                             "(--quick: 1)")
    parser.add_argument("--rtt-ms", type=float, default=0.0,
                        help="emulate a network between the app and the service with this round-trip time "
                             "(the Parrot paper's experiments: 200-300 ms per call); 0: loopback")


def benchmark_main(parse_args: Callable[[list[str] | None], Any], measure: Callable[[Any], list[Row]],
                   report: Callable[[list[Row], Any], None]) -> Callable[[list[str] | None], list[Row]]:
    """A benchmark's ``main(argv)``: parse, measure, print the table, return the rows."""

    def main(argv: list[str] | None = None) -> list[Row]:
        args = parse_args(argv)
        rows = measure(args)
        report(rows, args)
        return rows

    return main


_SENTENCES = (
    "The committee met on Tuesday to review the quarterly budget of the northern district.",
    "Rainfall in the valley was twice the seasonal average, flooding two of the lower farms.",
    "A new bridge over the river shortened the trip to the market town by forty minutes.",
    "Teachers reported that attendance rose after the school started serving breakfast.",
    "The old mill was converted into a library with a reading room for children.",
    "Local bakers agreed to share one delivery van to cut their fuel costs.",
    "Researchers counted more than three hundred species of birds in the wetland.",
    "The council postponed the vote on parking fees until the spring meeting.",
    "A power outage on Friday night closed the hospital's outpatient clinic for a day.",
    "Volunteers planted two thousand trees along the eastern edge of the park.",
    "The museum extended its opening hours to the evening during the summer festival.",
    "Farmers switched to drought-resistant wheat after three dry years in a row.",
    "The train company added a late service on weekends for concert audiences.",
    "Engineers found cracks in the dam's spillway and ordered urgent repairs.",
    "A survey showed that most residents want more cycle lanes in the centre.",
    "The fishing fleet reported its best catch in a decade thanks to cooler waters.",
    "Two startups opened offices in the renovated warehouse by the harbour.",
    "The regional hospital hired twelve nurses to shorten waiting times.",
    "Snow closed the mountain pass for four days, cutting off three villages.",
    "The football club sold its stadium naming rights to a local bank.",
)


def text_chunk(index: int, sentences: int) -> str:
    """A deterministic paragraph, different for every ``index``."""
    n = len(_SENTENCES)
    return " ".join(_SENTENCES[(index * 7 + k * 3) % n] for k in range(sentences))
