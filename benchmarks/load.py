"""Load: many concurrent sessions of small graphs, plus OpenAI-route traffic, against one service.

Several client processes each run many asyncio tasks. Every task is one session: it submits a
graph of 2 or 3 calls (a producer, a consumer of its output, and for every other session a
third call reading both), long-polls the final variable once, reads the session's graph back
to check it, then deletes the session. At the same time every process sends completions and
chat completions on the OpenAI routes. Afterwards:

- every session's final value was delivered exactly once and its graph has the expected shape
  (calls, edges, variables, all tagged with the session's index, so a mix-up would show);
- no session is left: each deleted id is unknown to the service (404), and the engines have
  nothing running or waiting;
- the server process's memory after the load is compared with before.

    python -m benchmarks.load            # 200 sessions from 4 processes, default model
    python -m benchmarks.load --quick    # 40 sessions
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import THROUGHPUT_TUNED, Row, benchmark_main, console, print_table, running_service

REQUEST_TIMEOUT_S = 300.0  # one request of a loaded 2-core machine; a stuck service still fails


# -- one client process ----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    url: str
    sessions: list[int]  # the indices of the sessions this process runs
    openai_requests: int  # OpenAI-route requests this process sends meanwhile
    tokens: int  # generated per call (EOS ignored, so exactly this many)
    worker: int


def calls_in(index: int) -> int:
    return 2 + index % 2


def session_graph(session_id: str, index: int, tokens: int) -> dict[str, Any]:
    """A chain c0 -> c1 (and c0, c1 -> c2 for odd indices); ids carry the session's tag."""
    tag = f"s{index}"
    sampling = {"max_tokens": tokens, "ignore_eos": True, "temperature": 0}

    def text(t: str) -> dict[str, str]:
        return {"type": "text", "text": t}

    def inp(var: str) -> dict[str, str]:
        return {"type": "input", "var": var}

    def out(var: str) -> dict[str, Any]:
        return {"type": "output", "var": var, "sampling": sampling}

    calls = [
        {"id": f"{tag}-c0", "segments": [text(f"Request {tag}. Name a colour:"), out(f"{tag}-v0")]},
        {"id": f"{tag}-c1", "segments": [text(f"Request {tag}. After "), inp(f"{tag}-v0"),
                                         text(" name a fruit:"), out(f"{tag}-v1")]},
    ]
    if calls_in(index) == 3:
        calls.append({"id": f"{tag}-c2", "segments": [
            text(f"Request {tag}. Colour "), inp(f"{tag}-v0"), text(", fruit "), inp(f"{tag}-v1"),
            text(". A dish:"), out(f"{tag}-v2")]})
    final = f"{tag}-v{len(calls) - 1}"
    return {
        "session_id": session_id,
        "variables": [{"id": f"{tag}-v{i}"} for i in range(len(calls))],
        "calls": calls,
        "fetches": [{"var": final, "criterion": "latency"}],
    }


def expected_edges(index: int) -> set[tuple[str, str, str]]:
    tag = f"s{index}"
    edges = {(f"{tag}-c0", f"{tag}-c1", f"{tag}-v0")}
    if calls_in(index) == 3:
        edges |= {(f"{tag}-c0", f"{tag}-c2", f"{tag}-v0"), (f"{tag}-c1", f"{tag}-c2", f"{tag}-v1")}
    return edges


def check_graph(info: dict[str, Any], index: int, tokens: int, final_value: str) -> list[str]:
    """What is wrong with a finished session's graph (nothing, for a correct one)."""
    tag, n = f"s{index}", calls_in(index)
    problems = []
    calls = {c["id"]: c for c in info["calls"]}
    if set(calls) != {f"{tag}-c{i}" for i in range(n)}:
        problems.append(f"{tag}: calls {sorted(calls)}")
    variables = {v["id"]: v for v in info["variables"]}
    if set(variables) != {f"{tag}-v{i}" for i in range(n)}:
        problems.append(f"{tag}: variables {sorted(variables)}")
    edges = {(e["source"], e["target"], e["var"]) for e in info["edges"]}
    if edges != expected_edges(index):
        problems.append(f"{tag}: edges {sorted(edges)}")
    for call in calls.values():
        if call["state"] != "done" or call["output_tokens"] != tokens:
            problems.append(f"{tag}: call {call['id']} {call['state']} with {call['output_tokens']} tokens")
    # A consumer's prompt holds its producer's output: it is longer than that output alone.
    consumer = calls.get(f"{tag}-c1")
    if consumer is not None and consumer["prompt_tokens"] <= tokens:
        problems.append(f"{tag}: c1's prompt ({consumer['prompt_tokens']} tokens) lacks c0's output")
    final = variables.get(f"{tag}-v{n - 1}")
    if final is None or final["value"] != final_value:
        problems.append(f"{tag}: the final value read differs from the graph's")
    return problems


def _error(what: str, resp: httpx.Response) -> str:
    return f"{what}: {resp.status_code} {resp.text[:200]}"


async def run_session(http: httpx.AsyncClient, index: int, tokens: int) -> dict[str, Any]:
    """One session from creation to deletion; its final variable is read exactly once."""
    started = time.perf_counter()
    result: dict[str, Any] = {"index": index, "session_id": None, "latency_s": None, "reads": 0,
                              "calls": calls_in(index), "problems": []}
    try:
        resp = await http.post("/v1/sessions", json={})
        if resp.status_code != 200:
            result["problems"].append(_error("create session", resp))
            return result
        sid = result["session_id"] = resp.json()["id"]
        graph = session_graph(sid, index, tokens)
        final = graph["fetches"][0]["var"]
        resp = await http.post("/v1/graphs", json=graph)
        if resp.status_code != 200:
            result["problems"].append(_error("submit graph", resp))
        else:
            while True:  # a long-poll answers ready=false at its timeout; ask again
                resp = await http.get(f"/v1/sessions/{sid}/variables/{final}",
                                      params={"criterion": "latency", "timeout": 60})
                if resp.status_code != 200 or resp.json()["ready"]:
                    break
            if resp.status_code != 200:
                result["problems"].append(_error("fetch final", resp))
            else:
                result["reads"] += 1
                result["latency_s"] = time.perf_counter() - started
                value = resp.json()["value"]
                resp = await http.get(f"/v1/sessions/{sid}/graph")
                if resp.status_code != 200:
                    result["problems"].append(_error("read graph", resp))
                else:
                    result["problems"] += check_graph(resp.json(), index, tokens, value)
        resp = await http.delete(f"/v1/sessions/{sid}")
        if resp.status_code != 200:
            result["problems"].append(_error("delete session", resp))
    except httpx.HTTPError as exc:
        result["problems"].append(f"s{index}: {type(exc).__name__}: {exc}")
    return result


async def run_openai(http: httpx.AsyncClient, number: int, tokens: int) -> dict[str, Any]:
    """One request-centric request: a completion or a chat, alternately."""
    started = time.perf_counter()
    sampling = {"max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    try:
        if number % 2:
            resp = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"Request o{number}: say hello."}], **sampling})
        else:
            resp = await http.post("/v1/completions",
                                   json={"prompt": f"Request o{number}: hello", **sampling})
    except httpx.HTTPError as exc:
        return {"latency_s": None, "problem": f"o{number}: {type(exc).__name__}: {exc}"}
    problem = None
    if resp.status_code != 200:
        problem = _error(f"o{number}", resp)
    else:
        body = resp.json()
        if len(body["choices"]) != 1 or body["usage"]["completion_tokens"] != tokens:
            problem = f"o{number}: {len(body['choices'])} choices, {body['usage']} usage"
    return {"latency_s": time.perf_counter() - started, "problem": problem}


async def _worker(plan: WorkerPlan) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, pool=None)
    async with httpx.AsyncClient(base_url=plan.url, timeout=timeout, limits=limits) as http:
        started = time.time()
        first = plan.worker * 100_000  # OpenAI request numbers, distinct across processes
        sessions, openai = await asyncio.gather(
            asyncio.gather(*(run_session(http, i, plan.tokens) for i in plan.sessions)),
            asyncio.gather(*(run_openai(http, first + k, plan.tokens) for k in range(plan.openai_requests))))
        return {"started": started, "finished": time.time(), "sessions": sessions, "openai": openai}


def client_process(plan: WorkerPlan) -> dict[str, Any]:
    """Entry point of one client process (top level, so a spawned process can import it)."""
    return asyncio.run(_worker(plan))


# -- the run -----------------------------------------------------------------------------------


@dataclass
class LoadReport:
    sessions: int
    calls: int  # graph calls delivered
    openai_requests: int
    seconds: float  # first client start to last client finish
    session_latencies: list[float]
    openai_latencies: list[float]
    problems: list[str] = field(default_factory=list)  # errors and wrong results
    leaked: list[str] = field(default_factory=list)  # sessions or engine work left afterwards

    @property
    def calls_per_s(self) -> float:
        return (self.calls + self.openai_requests) / self.seconds

    def percentile(self, q: float, openai: bool = False) -> float:
        values = sorted(self.openai_latencies if openai else self.session_latencies)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_load(url: str, *, sessions: int, processes: int, openai_requests: int, tokens: int) -> LoadReport:
    """Drive ``sessions`` sessions and ``openai_requests`` OpenAI requests from ``processes``
    client processes against the service at ``url``; check delivery and leaks afterwards."""
    plans = [WorkerPlan(url, list(range(w, sessions, processes)),
                        openai_requests // processes + (w < openai_requests % processes), tokens, w)
             for w in range(processes)]
    # spawn: the clients start clean, without the parent's threads (torch, a test's servers).
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        outcomes = pool.map(client_process, plans)
    results = [s for o in outcomes for s in o["sessions"]]
    openai = [r for o in outcomes for r in o["openai"]]
    problems = [p for r in results for p in r["problems"]] + [r["problem"] for r in openai if r["problem"]]
    indices = sorted(r["index"] for r in results)
    if indices != list(range(sessions)):
        problems.append(f"sessions reported: {len(indices)} for {sessions}")
    problems += [f"s{r['index']}: final read {r['reads']} times" for r in results if r["reads"] != 1]
    report = LoadReport(
        sessions=sessions,
        calls=sum(r["calls"] for r in results if r["reads"] == 1 and not r["problems"]),
        openai_requests=sum(1 for r in openai if r["problem"] is None),
        seconds=max(o["finished"] for o in outcomes) - min(o["started"] for o in outcomes),
        session_latencies=[r["latency_s"] for r in results if r["latency_s"] is not None],
        openai_latencies=[r["latency_s"] for r in openai if r["latency_s"] is not None],
        problems=problems,
    )
    report.leaked = leftovers(url, [r["session_id"] for r in results if r["session_id"]])
    return report


def leftovers(url: str, session_ids: list[str]) -> list[str]:
    """What the load left in the service: sessions still known, engine work still running."""
    found = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for sid in session_ids:
            status = http.get(f"/v1/sessions/{sid}/graph").status_code
            if status != 404:
                found.append(f"session {sid} answers {status} after its delete")
        # The engine list may need an operator credential; the per-session check above does not.
        resp = http.get("/v1/engines")
        if resp.status_code == 200:
            deadline = time.monotonic() + 10
            while True:
                busy = [f"engine {e['id']}: load {e['load']}, in flight {e['in_flight']}"
                        for e in resp.json()["data"]
                        if e["load"]["num_running"] or e["load"]["num_waiting"]
                        or any(e["in_flight"].values())]
                if not busy or time.monotonic() > deadline:
                    break
                time.sleep(0.2)  # a cancelled request may take one engine step to leave
                resp = http.get("/v1/engines")
            found += busy
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None
    return psutil.Process(pid).memory_info().rss


def server_pid(url: str) -> int:
    """The pid of this process's child ``parrot serve`` listening on ``url``'s port."""
    import psutil

    port = url.rsplit(":", 1)[1]
    for child in psutil.Process(os.getpid()).children(recursive=True):
        cmdline = child.cmdline()
        if "serve" in cmdline and "--port" in cmdline and cmdline[cmdline.index("--port") + 1] == port:
            return child.pid
    raise RuntimeError(f"no parrot serve child listens on {url}")


def warm_up(url: str, tokens: int) -> None:
    """A few sessions and requests first, so that one-time allocations are not counted as growth."""
    report = run_load(url, sessions=4, processes=1, openai_requests=2, tokens=tokens)
    if report.problems or report.leaked:
        raise RuntimeError(f"warm-up failed: {report.problems + report.leaked}")


# -- benchmark ---------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> tuple[list[Row], LoadReport]:
    # The server's own default KV pool: a load test may hold many long requests at once.
    with running_service(dataclasses.replace(THROUGHPUT_TUNED, kv_cache_gib=2.0)) as url:
        pid = server_pid(url)
        warm_up(url, args.tokens)
        before = rss_bytes(pid)
        report = run_load(url, sessions=args.sessions, processes=args.processes,
                          openai_requests=args.openai_requests, tokens=args.tokens)
        after = rss_bytes(pid)
    mib = 1 << 20
    return [Row("parrot", report.seconds, {
        "sessions": report.sessions,
        "calls": report.calls + report.openai_requests,
        "calls/s": report.calls_per_s,
        "p50 session ms": report.percentile(0.5) * 1000,
        "p99 session ms": report.percentile(0.99) * 1000,
        "p50 openai ms": report.percentile(0.5, openai=True) * 1000,
        "p99 openai ms": report.percentile(0.99, openai=True) * 1000,
        "errors": len(report.problems),
        "leaked": len(report.leaked),
        "RSS before MiB": before / mib,
        "RSS after MiB": after / mib,
    })], report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--openai-requests", type=int, default=40, help="sent meanwhile, in all")
    parser.add_argument("--tokens", type=int, default=4, help="generated per call")
    parser.add_argument("--quick", action="store_true", help="a smoke run (40 sessions)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.processes, args.openai_requests = 40, 2, 8
    return args


COLUMNS = ("sessions", "calls", "calls/s", "p50 session ms", "p99 session ms", "p50 openai ms",
           "p99 openai ms", "errors", "leaked", "RSS before MiB", "RSS after MiB")


def report(measured: tuple[list[Row], LoadReport], args: argparse.Namespace) -> None:
    rows, load = measured
    print_table(f"load: {args.sessions} sessions of 2-3 calls x {args.tokens} tokens from {args.processes} "
                f"processes, plus {args.openai_requests} OpenAI-route requests, one service",
                rows, "parrot", COLUMNS)
    for line in (load.problems + load.leaked)[:20]:
        console.print(f"  {line}")


# The table's rows travel with the load report, whose problems are printed under the table.
_main = benchmark_main(parse_args, measure, report)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> list[Row]:
    rows, _ = _main(argv)  # type: ignore[misc]
    return rows


if __name__ == "__main__":
    main()
