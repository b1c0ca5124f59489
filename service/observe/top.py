"""``parrot top``: a live terminal view of a running service, from the same ``/v1/observe`` JSON
the dashboard polls (engines and their load, cache hit rate, tokens/s, sessions and their calls)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import httpx


class ObserveError(RuntimeError):
    """The service could not be read; the message says why in one line."""


def fetch_view(client: httpx.Client, tenant: str | None = None) -> dict[str, Any]:
    """The summary and the sessions, as ``/v1/observe`` returns them."""
    import httpx

    try:
        summary = client.get("/v1/observe/summary")
        sessions = client.get("/v1/observe/sessions", params={"tenant": tenant} if tenant else {})
    except httpx.TransportError as exc:
        raise ObserveError(f"cannot reach {client.base_url}: {exc}") from None
    for resp in (summary, sessions):
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            raise ObserveError(f"{resp.request.url.path}: HTTP {resp.status_code}: {message}")
    return {"summary": summary.json(), "sessions": sessions.json()["data"]}


def _secs(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render(view: dict[str, Any], base_url: str, max_sessions: int = 15) -> Group:
    """One frame: a header line, the engines table and the sessions table."""
    s = view["summary"]
    totals = s["totals"]
    header = Text.assemble(
        ("parrot top ", "bold"), (f"{base_url}  ", "dim"),
        "cache hit ", (f"{100 * s['cache_hit_rate']:.1f}%", "bold green"),
        "  tokens/s ", (f"{s['tokens_per_s']:.1f}", "bold"),
        "  requests running ", (str(s["requests_active"]), "bold"),
        "  sessions ", (str(s["sessions_open"]), "bold"),
        "  calls pending/running ", (f"{s['calls']['pending']}/{s['calls']['running']}", "bold"),
        f"\nrequests {totals['requests']}  prompt tokens {totals['prompt_tokens']} "
        f"({totals['cached_tokens']} cached)  generated {totals['generation_tokens']}  "
        f"up {_secs(s['uptime_s'])}",
    )
    engines = Table(title="engines", title_justify="left", expand=True)
    for col in ("engine", "kind", "model", "state", "batch", "queue", "KV used", "cached", "preempted"):
        engines.add_column(col, justify="right" if col in ("batch", "queue", "KV used", "cached",
                                                           "preempted") else "left")
    for e in s["engines"]:
        load = e["load"] or {}
        total = load.get("kv_tokens_total") or 0
        kv = f"{100 * load.get('kv_tokens_used', 0) / total:.1f}%" if total else "–"
        engines.add_row(e["id"], e["kind"], e["model"],
                        Text("up", "green") if e["up"] else Text(f"down: {e['down'] or 'stopped'}", "red"),
                        str(load.get("num_running", "–")), str(load.get("num_waiting", "–")), kv,
                        str(load.get("cached_tokens", "–")), str(load.get("num_preemptions", 0)))
    sessions = Table(title="sessions", title_justify="left", expand=True)
    for col in ("session", "tenant", "calls", "done", "running", "pending", "failed", "tokens in (cached)",
                "out", "time"):
        sessions.add_column(col)
    for x in view["sessions"][:max_sessions]:
        st = x["states"]
        time_s = x["makespan_s"] if x["makespan_s"] is not None else x["elapsed_s"]
        sessions.add_row(Text(x["id"], "dim" if x["deleted"] else ""), x["tenant"], str(x["num_calls"]),
                         str(st["done"]), str(st["running"]), str(st["pending"]),
                         str(st["failed"] + st["cancelled"]),
                         f"{x['prompt_tokens']} ({x['cached_tokens']})", str(x["output_tokens"]),
                         _secs(time_s))
    more = len(view["sessions"]) - max_sessions
    parts: list[Any] = [Panel(header, expand=True), engines, sessions]
    if more > 0:
        parts.append(Text(f"… {more} more sessions", "dim"))
    return Group(*parts)


def top(
    url: Annotated[str, typer.Option(help="The Parrot service")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(
        envvar="PARROT_ADMIN_KEY",
        help="The operator key (--admin-key of the service), if it has keys")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's sessions")] = None,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes")] = 1.0,
    once: Annotated[bool, typer.Option(help="Print one frame and exit")] = False,
) -> None:
    """A live view of a running service: engines, load, cache hits, tokens/s, sessions."""
    import httpx  # here, so that loading the CLI stays fast

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    console = Console()
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=10) as client:
        try:
            if once:
                console.print(render(fetch_view(client, tenant), url))
                return
            with Live(render(fetch_view(client, tenant), url), console=console, screen=False,
                      refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    live.update(render(fetch_view(client, tenant), url))
        except ObserveError as exc:
            Console(stderr=True).print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            return
