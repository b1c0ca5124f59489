"""An OpenAI-compatible server as an engine of the service (a second, real ``parrot serve``):
alone, and next to the builtin engine, with the cookbook's programs running unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from parrot.service.app import create_app
from parrot.service.engine.factory import EngineSpec, EngineSpecError, build_engine
from tests.service.conftest import Upstream, free_port, wait_for_http

COOKBOOK = Path(__file__).resolve().parents[3] / "cookbook"


def run_recipe(name: str, url: str) -> str:
    result = subprocess.run([sys.executable, str(COOKBOOK / name), "--url", url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wall time:" in result.stdout, result.stdout
    return result.stdout


def completions_served(upstream: Upstream) -> float:
    return sum(upstream.metric("parrot_requests_total", endpoint="completions", finish_reason=reason)
               for reason in ("stop", "length"))


def test_the_code_and_test_example_runs_with_only_an_openai_engine(upstream, tmp_path):
    with pytest.raises(EngineSpecError, match="whose tokenizer is not on this host"):
        build_engine(EngineSpec(kind="openai", url=upstream.api))  # nothing to take it from
    config = tmp_path / "parrot.toml"
    config.write_text(f'local_engine = false\n\n[[engines]]\nkind = "openai"\nurl = "{upstream.api}"\n'
                      f'tokenizer = "{upstream.folder}"\n')
    port, log_path = free_port(), tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "parrot.service", "serve", "--config", str(config), "--port", str(port),
             "--log-level", "warning"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", service, log_path)
        [engine] = httpx.get(f"{url}/v1/engines").json()["data"]
        assert (engine["kind"], engine["url"], engine["model"]) == ("openai", upstream.api, "tiny-llama")
        before = completions_served(upstream)
        out = run_recipe("code_and_test.py", url)
        assert "== code ==" in out and "== test ==" in out
        assert completions_served(upstream) - before == 2  # write_code, then write_test
    finally:
        service.terminate()
        service.wait(timeout=30)


def test_the_map_reduce_recipe_runs_on_a_builtin_and_an_openai_engine_at_once(
        upstream, tiny_engine_factory, serve_app):
    local, _ = tiny_engine_factory()
    remote = build_engine(EngineSpec(kind="openai", url=upstream.api), [local])
    assert remote.model_name == local.model_name == "tiny-llama"
    assert remote.tokenizer is local.tokenizer  # one model, one tokenizer
    before = completions_served(upstream)
    with serve_app(create_app([local, remote])) as url:
        kinds = sorted(e["kind"] for e in httpx.get(f"{url}/v1/engines").json()["data"])
        assert kinds == ["builtin", "openai"]
        out = run_recipe("map_reduce_summary.py", url)
    assert "== verdict (5 reviews) ==" in out
    # The verdict is fetched for latency, so the map calls spread over both engines.
    assert local.num_steps > 0
    assert completions_served(upstream) - before >= 2
