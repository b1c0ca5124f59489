"""The dashboard in a real browser (headless Chromium): while a map-reduce app runs on the tiny
model, /dashboard draws every call and edge of its graph and the engine timeline has its bars.
A screenshot is kept under test-artifacts/."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from parrot.service.app import create_app
from parrot.service.tenancy import TenantConfig, Tenants
from tests.service.observe_workload import MapReduce, submit_map_reduce

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = next((p for name in ("chromium", "chromium-browser", "google-chrome")
                 if (p := shutil.which(name))), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (scripts/install.sh test installs it)")


class Elements(html.parser.HTMLParser):
    """Every element's tag and attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))

    def having(self, **want: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.found if all(a.get(k.replace("_", "-")) == v for k, v in want.items())]

    def with_class(self, name: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.found if name in (a.get("class") or "").split()]


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=4000", *args, url],
        capture_output=True, text=True, timeout=120)


def test_dashboard_draws_the_running_apps_graph_and_timeline(tiny_engine_factory, serve_app, tmp_path):
    engine, _ = tiny_engine_factory()
    tenants = Tenants({"acme": TenantConfig(keys=["sk-acme"])}, admin_keys=["sk-admin"])
    with serve_app(create_app(engine, tenants=tenants, observe_interval_s=0.1)) as url:
        tenant = httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer sk-acme"})
        admin = httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Bearer sk-admin"})
        done: list[MapReduce] = []
        runner = threading.Thread(target=lambda: done.append(
            submit_map_reduce(tenant, num_maps=4, max_tokens=160)), daemon=True)
        runner.start()
        deadline = time.monotonic() + 30
        while True:  # the app is submitted and its first requests run
            sessions = admin.get("/v1/observe/sessions").json()["data"]
            if sessions and admin.get("/v1/observe/summary").json()["totals"]["requests"] + len(
                    admin.get("/v1/observe/engines").json()["data"][0]["requests"]) > 0:
                break
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.02)
        session_id = sessions[0]["id"]
        page = f"{url}/dashboard#key=sk-admin&session={session_id}"
        dom = chromium(page, tmp_path / "profile", "--dump-dom")
        running_when_drawn = not done
        runner.join(timeout=60)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard-map-reduce.png"
        chromium(page, tmp_path / "profile", f"--screenshot={shot}")
        graph = admin.get(f"/v1/observe/sessions/{session_id}").json()
        tenant.close()
        admin.close()
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert done and done[0].session_id == session_id
    app = done[0]
    page_elements = Elements()
    page_elements.feed(dom.stdout)
    body = page_elements.found[[t for t, _ in page_elements.found].index("body")][1]
    assert body.get("data-ready") == "true", dom.stdout[-3000:]  # it polled with the key from the URL
    # Every call and every edge of the graph, as the canvas draws them.
    calls = {a["data-id"] for a in page_elements.having(data_kind="call")}
    assert calls == set(app.call_ids)
    edges = {(a["data-source"], a["data-target"]) for a in page_elements.having(data_kind="edge")}
    for source, target in app.edges:  # map -> its summary variable -> reduce
        var = next(e["var"] for e in graph["edges"] if (e["source"], e["target"]) == (source, target))
        assert (f"call:{source}", f"var:{var}") in edges and (f"var:{var}", f"call:{target}") in edges
    assert ("call:reduce", "var:final") in edges
    critical = {a["data-id"] for a in page_elements.having(data_kind="call", data_critical="true")}
    assert "reduce" in critical and len(critical & set(app.map_ids)) == 1
    # The engine timeline has a bar for each of the app's requests that had started.
    bars = [a for a in page_elements.with_class("tl-bar") if a.get("data-session") == session_id]
    assert bars and {b["data-call"] for b in bars} <= set(app.call_ids)
    assert page_elements.having(id="engine-engine-0")
    assert running_when_drawn or len(bars) == len(app.call_ids)
    assert shot.exists() and shot.stat().st_size > 10_000
