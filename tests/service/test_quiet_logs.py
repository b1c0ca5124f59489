"""What ``parrot serve`` writes to a log (not a terminal): whole lines, no progress bars."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.service.conftest import parrot_serve


def test_a_serve_log_has_whole_lines_and_no_progress_bars(tokenizer, tmp_path):
    folder = tmp_path / "tiny-llama"
    with parrot_serve(tokenizer, folder, "--kv-cache-gib", "0.05", "--log-level", "warning") as (url, _):
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert reply.status_code == 200
    log = (folder / "serve.log").read_text()
    assert "\r" not in log and "it/s]" not in log and "Loading weights" not in log, log
    lines = log.splitlines()
    assert [line for line in lines if line.startswith("Loaded ")] == [
        "Loaded tiny-llama on cpu (context 2048 tokens)"], log
    # 96 columns, wider than the 80 rich assumes when it cannot ask a terminal: still one line.
    assert [line for line in lines if line.startswith("No API keys configured")] == [
        "No API keys configured: anyone who can reach this port can use the service and register engines"]
    # --log-level warning: no per-request or start-up info lines.
    assert "INFO" not in log and "Uvicorn running" not in log, log


def test_the_log_level_must_be_a_level():
    proc = subprocess.run([sys.executable, "-m", "parrot.service", "engine", "--service", "http://127.0.0.1:9",
                           "--log-level", "verbose"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: --log-level 'verbose' is not a level; use critical, error, "
                                   "warning, info, debug")
