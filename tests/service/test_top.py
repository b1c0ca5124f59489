"""``parrot top --once``: one frame of the live view, read from a running service."""

from __future__ import annotations

import httpx
from typer.testing import CliRunner

from parrot.service.app import create_app
from parrot.service.cli import app as cli
from parrot.service.tenancy import TenantConfig, Tenants
from tests.service.observe_workload import submit_map_reduce

WIDE = {"COLUMNS": "220", "TERM": "dumb"}


def test_top_once_shows_engines_load_and_sessions(live_server):
    with live_server.http() as http:
        app = submit_map_reduce(http, num_maps=2, max_tokens=3)
    result = CliRunner().invoke(cli, ["top", "--once", "--url", live_server.base_url], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "cache hit" in out and "tokens/s" in out
    assert "engine-0" in out and "builtin" in out and "tiny-llama" in out and "up" in out
    [row] = [line for line in out.splitlines() if app.session_id in line]
    # 3 calls, all done, none running, pending or failed; 9 output tokens (3 per call).
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[3:8] == ["3", "3", "0", "0", "0"] and cells[9] == "9"


def test_top_needs_the_operator_key_when_keys_are_set(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    tenants = Tenants({"acme": TenantConfig(keys=["sk-acme"])}, admin_keys=["sk-admin"])
    with serve_app(create_app(engine, tenants=tenants)) as url:
        with httpx.Client(base_url=url, timeout=30, headers={"x-api-key": "sk-acme"}) as http:
            app = submit_map_reduce(http, num_maps=2, max_tokens=2)
        runner = CliRunner()
        refused = runner.invoke(cli, ["top", "--once", "--url", url, "--api-key", "sk-acme"], env=WIDE)
        allowed = runner.invoke(cli, ["top", "--once", "--url", url, "--tenant", "acme"],
                                env={**WIDE, "PARROT_ADMIN_KEY": "sk-admin"})
        other = runner.invoke(cli, ["top", "--once", "--url", url, "--api-key", "sk-admin", "--tenant", "x"],
                              env=WIDE)
    assert refused.exit_code == 1 and "HTTP 403" in refused.output and "operator" in refused.output
    assert allowed.exit_code == 0 and app.session_id in allowed.output and "acme" in allowed.output
    assert other.exit_code == 0 and app.session_id not in other.output


def test_top_says_when_the_service_is_unreachable():
    result = CliRunner().invoke(cli, ["top", "--once", "--url", "http://127.0.0.1:9"], env=WIDE)
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output
