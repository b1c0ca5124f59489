"""Log lines carry the tenant, session, call and request ids they are about, as text or JSON;
prompt text appears only when asked for (``log_prompts``, ``parrot serve --log-prompts``)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from parrot.service.app import create_app
from parrot.service.observe.logs import make_handler
from parrot.service.tenancy import TenantConfig, Tenants
from tests.service.conftest import parrot_serve
from tests.service.observe_workload import submit_map_reduce

SECRET = "zebracorn-7741"  # in every prompt of the app


@contextmanager
def captured(log_format: str = "json") -> Iterator[io.StringIO]:
    """What the service's loggers write at INFO, in ``log_format``, while the block runs."""
    stream = io.StringIO()
    handler = make_handler(log_format, stream)  # type: ignore[arg-type]
    logger = logging.getLogger("parrot")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_lines_about_calls_and_requests_carry_their_ids_and_no_prompt_text(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    tenants = Tenants({"acme": TenantConfig(keys=["sk-acme"])})
    with serve_app(create_app(engine, tenants=tenants)) as url, captured() as stream:
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Bearer sk-acme"}) as http:
            app = submit_map_reduce(http, num_maps=2, max_tokens=4, marker=SECRET, delete=True)
            http.post("/v1/completions", json={"prompt": f"{SECRET} hi", "max_tokens": 2}).raise_for_status()
    lines = json_lines(stream)
    assert SECRET not in stream.getvalue()
    requests = [x for x in lines if x["message"].startswith("request ")]
    calls = [x for x in lines if x["message"].startswith("call ")]
    native = [x for x in requests if x.get("endpoint") == "native"]
    assert sorted(x["call"] for x in native) == sorted(app.call_ids)
    for x in native:
        assert x["session"] == app.session_id and x["tenant"] == "acme" and x["request"].startswith("call-")
        assert x["level"] == "INFO" and x["output_tokens"] == 4 and x["engine"] == "engine-0"
        assert {"time", "logger", "duration_s", "prompt_tokens", "cached_tokens"} <= set(x)
    assert sorted(x["call"] for x in calls) == sorted(app.call_ids)
    assert all(x["session"] == app.session_id and x["state"] == "done" for x in calls)
    [openai_line] = [x for x in requests if x.get("endpoint") == "completions"]
    assert openai_line["tenant"] == "acme" and openai_line["request"] and "session" not in openai_line
    session_lines = [x for x in lines if x["message"].startswith(("session ", "graph "))]
    assert {x["message"] for x in session_lines} >= {"session created", "session deleted"}
    assert all(x["session"] == app.session_id for x in session_lines)


def test_prompts_are_logged_only_when_asked(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    with serve_app(create_app(engine, log_prompts=True)) as url, captured("text") as stream:
        with httpx.Client(base_url=url, timeout=30) as http:
            app = submit_map_reduce(http, num_maps=2, max_tokens=3, marker=SECRET)
    text = stream.getvalue()
    request_lines = [line for line in text.splitlines() if " request " in line]
    assert request_lines and SECRET in text
    # Text lines end with the ids they are about.
    assert any(f"session={app.session_id} call=map0 request=call-map0-" in line for line in request_lines)


def test_parrot_serve_writes_json_lines_with_ids(tokenizer, tmp_path):
    folder = tmp_path / "tiny-llama"
    with parrot_serve(tokenizer, folder, "--log-level", "info", "--log-format", "json") as (url, _):
        with httpx.Client(base_url=url, timeout=30) as http:
            app = submit_map_reduce(http, num_maps=2, max_tokens=3, marker=SECRET)
            bad = http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
            assert bad.status_code == 400
    log = (folder / "serve.log").read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert SECRET not in log
    ids = {(r.get("session"), r.get("call")) for r in records if r["message"].startswith("request ")}
    assert ids == {(app.session_id, c) for c in app.call_ids}
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's lines are JSON too


def test_an_unknown_log_format_is_one_line():
    from typer.testing import CliRunner

    from parrot.service.cli import app

    result = CliRunner().invoke(app, ["serve", "--log-format", "xml"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --log-format: 'xml' is not one of text, json"
