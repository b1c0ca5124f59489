"""Regenerate docs/dashboard.png: the dashboard during a map-reduce app on the default model.

Runs the service in-process on the builtin engine (CPU is fine), runs one app to warm the cache,
starts a second, larger one and screenshots /dashboard with headless Chromium while it runs.
Usage: python3 scripts/dashboard_screenshot.py [OUTPUT]   (needs `chromium` on PATH)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from parrot.service.app import create_app
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig

TOPIC = "The history of the printing press"


def map_reduce(http: httpx.Client, num_maps: int, max_tokens: int) -> None:
    sid = http.post("/v1/sessions", json={}).json()["id"]
    out = {"type": "output", "sampling": {"max_tokens": max_tokens, "ignore_eos": True}}
    variables = [{"id": f"part{i}", "value": f"{TOPIC}, part {i}."} for i in range(num_maps)]
    variables += [{"id": f"sum{i}"} for i in range(num_maps)] + [{"id": "final"}]
    calls = [{"id": f"map{i}", "name": f"map{i}", "segments": [
        {"type": "text", "text": "Summarize in one sentence: "}, {"type": "input", "var": f"part{i}"},
        {"type": "text", "text": "\nSummary: "}, {**out, "var": f"sum{i}"}]} for i in range(num_maps)]
    segments: list[dict] = [{"type": "text", "text": "Combine these summaries:"}]
    for i in range(num_maps):
        segments += [{"type": "text", "text": "\n- "}, {"type": "input", "var": f"sum{i}"}]
    segments += [{"type": "text", "text": "\nAll together: "}, {**out, "var": "final"}]
    calls.append({"id": "reduce", "name": "reduce", "segments": segments})
    http.post("/v1/graphs", json={"session_id": sid, "variables": variables, "calls": calls,
                                  "fetches": [{"var": "final", "criterion": "latency"}]}).raise_for_status()
    http.get(f"/v1/sessions/{sid}/variables/final", params={"timeout": 300}).raise_for_status()


def main() -> None:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png").resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found (Debian: apt-get install chromium)")
    app = create_app(BuiltinEngine(BuiltinEngineConfig(device="cpu")), observe_interval_s=0.2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with httpx.Client(base_url=url, timeout=600) as http:
        map_reduce(http, 4, 24)
        running = threading.Thread(target=map_reduce, args=(http, 6, 64))
        running.start()
        time.sleep(3.0)
        sid = http.get("/v1/observe/sessions").json()["data"][0]["id"]
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={profile}", f"--screenshot={output}", "--window-size=1400,1000",
                            "--virtual-time-budget=3000", f"{url}/dashboard#session={sid}"],
                           check=True, capture_output=True, timeout=120)
        running.join()
    server.should_exit = True
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
