"""Keys, tenant isolation and the operator credential, against a live service on a tiny model."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from parrot.client import ServiceClient
from parrot.service import tenancy
from parrot.service.app import create_app
from parrot.service.cli import app as cli_app
from parrot.service.engine.remote.worker import create_worker_app
from parrot.service.tenancy import TenantConfig, Tenants, TenantsFileError, load_tenants, match_digest
from tests.conftest import make_tiny_model
from tests.service.conftest import free_port, wait_for_http

ALICE, BOB, ADMIN, SECRET = "sk-alice-1", "sk-bob-1", "sk-admin-xyz", "cluster-s3cret"
BOB_DIGEST = "sha256:" + hashlib.sha256(BOB.encode()).hexdigest()  # bob is configured by digest


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed_tenants(**admin: str) -> Tenants:
    configs = {"alice": TenantConfig(keys=[ALICE]), "bob": TenantConfig(keys=[BOB_DIGEST])}
    return Tenants(configs, admin_keys=list(admin.values()))


@pytest.fixture
def service(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    with serve_app(create_app(engine, tenants=keyed_tenants(admin=ADMIN, secret=SECRET))) as url:
        yield url


def as_(url: str, key: str | None, header: str = "bearer") -> httpx.Client:
    headers = {} if key is None else bearer(key) if header == "bearer" else {"x-api-key": key}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


# ---- keys ---------------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["bearer", "x-api-key"])
def test_a_missing_or_wrong_key_is_a_401_and_the_right_one_works(service, header):
    for key in (None, "sk-wrong", ALICE + "x"):
        with as_(service, key, header) as http:
            for method, path in [("POST", "/v1/sessions"), ("GET", "/v1/models"),
                                 ("POST", "/v1/completions"), ("GET", "/v1/sessions/abc/graph")]:
                r = http.request(method, path, json={"prompt": "hi", "max_tokens": 1})
                assert r.status_code == 401, (key, path, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
    for key in (ALICE, BOB):  # bob's key is configured as its sha256 digest
        with as_(service, key, header) as http:
            assert http.post("/v1/sessions", json={}).status_code == 200
            r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
    with as_(service, None) as http:  # operations stay open
        assert http.get("/healthz").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_the_sdk_and_the_openai_client_send_their_key(service):
    async def sdk() -> None:
        client = ServiceClient(service, api_key=ALICE)
        try:
            info = await client.create_session()
            await client.delete_session(info.id)
        finally:
            await client.aclose()

    asyncio.run(sdk())
    ok = openai.OpenAI(base_url=f"{service}/v1", api_key=BOB, max_retries=0)
    assert ok.completions.create(model="tiny-llama", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=f"{service}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_keys_are_compared_in_constant_time_over_digests(monkeypatch):
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tenancy.hmac, "compare_digest", spy)
    digests = [(hashlib.sha256(k.encode()).digest(), k) for k in ("k1", "k2", "k3")]
    assert match_digest("k1", digests) == "k1"
    assert len(seen) == 3  # no early exit once the first matched
    assert all(a == hashlib.sha256(b"k1").digest() and len(b) == 32 for a, b in seen)
    seen.clear()
    assert match_digest("nope", digests) is None and len(seen) == 3
    tenants = keyed_tenants(admin=ADMIN)
    assert ALICE not in repr(vars(tenants)) and ADMIN not in repr(vars(tenants))  # digests only
    assert tenants.authenticate(ALICE).name == "alice" and tenants.authenticate(BOB).name == "bob"
    assert tenants.authenticate(BOB_DIGEST) is None  # a digest is not itself a key
    assert tenants.is_operator(ADMIN) and not tenants.is_operator(ALICE)


def test_keys_never_appear_in_logs(service, caplog):
    caplog.set_level(logging.DEBUG)
    for key in (ALICE, "sk-wrong-key-123", ADMIN):
        for header in ("bearer", "x-api-key"):
            with as_(service, key, header) as http:
                http.post("/v1/sessions", json={})
                http.get("/v1/engines")
                http.post("/v1/engines", json={"url": "http://127.0.0.1:9", "model": "m",
                                               "max_context_len": 8})
    assert caplog.records  # something was logged
    for key in (ALICE, "sk-wrong-key-123", ADMIN):
        assert key not in caplog.text


# ---- isolation ------------------------------------------------------------------------------
def native_routes(sid: str) -> list[tuple[str, str, dict | None]]:
    call = {"id": "c2", "segments": [{"type": "text", "text": "Hi"},
                                     {"type": "output", "var": "w", "sampling": {"max_tokens": 2}}]}
    return [
        ("GET", f"/v1/sessions/{sid}/graph", None),
        ("GET", f"/v1/sessions/{sid}/calls/c1", None),
        ("POST", f"/v1/sessions/{sid}/calls", call),
        ("POST", f"/v1/sessions/{sid}/variables", {"id": "new"}),
        ("POST", f"/v1/sessions/{sid}/variables/x", {"value": "stolen"}),
        ("GET", f"/v1/sessions/{sid}/variables/x?timeout=0", None),
        ("GET", f"/v1/sessions/{sid}/variables/secret?timeout=0", None),
        ("GET", f"/v1/sessions/{sid}/variables/x/stream", None),
        ("POST", "/v1/graphs", {"session_id": sid, "variables": [{"id": "z", "value": "1"}]}),
        ("DELETE", f"/v1/sessions/{sid}", None),
    ]


def test_another_tenants_session_is_a_404_like_an_unknown_one_on_every_route(service):
    with as_(service, ALICE) as alice, as_(service, BOB) as bob:
        sid = alice.post("/v1/sessions", json={}).json()["id"]
        r = alice.post("/v1/graphs", json={
            "session_id": sid, "variables": [{"id": "x"}, {"id": "y"}, {"id": "secret", "value": "pw"}],
            "calls": [{"id": "c1", "segments": [{"type": "input", "var": "x"},
                                                {"type": "output", "var": "y",
                                                 "sampling": {"max_tokens": 2}}]}]})
        assert r.status_code == 200, r.text
        unknown = "0" * len(sid)
        for (method, path, body), (_, upath, ubody) in zip(native_routes(sid), native_routes(unknown),
                                                            strict=True):
            theirs = bob.request(method, path, json=body)
            none = bob.request(method, upath, json=ubody)
            assert theirs.status_code == 404, (path, theirs.text)
            assert theirs.json() == none.json() | {"error": {**none.json()["error"], "message":
                                                   none.json()["error"]["message"].replace(unknown, sid)}}
            assert "pw" not in theirs.text
        # Alice's session is untouched: x unset, y pending, nothing added, still there.
        graph = alice.get(f"/v1/sessions/{sid}/graph").json()
        assert sorted(v["id"] for v in graph["variables"]) == ["secret", "x", "y"]
        assert [c["id"] for c in graph["calls"]] == ["c1"] and graph["calls"][0]["state"] == "pending"
        assert alice.post(f"/v1/sessions/{sid}/variables/x", json={"value": "Hello"}).status_code == 200
        assert alice.get(f"/v1/sessions/{sid}/variables/y", params={"timeout": 30}).json()["ready"]
        assert alice.delete(f"/v1/sessions/{sid}").status_code == 200


# ---- the operator credential -------------------------------------------------------------------
def test_engine_routes_need_the_operator_credential(service):
    registration = {"url": "http://127.0.0.1:9", "model": "tiny-llama", "max_context_len": 64}
    with as_(service, None) as anon, as_(service, ALICE) as alice:
        for client, status in ((anon, 401), (alice, 403)):
            assert client.get("/v1/engines").status_code == status
            r = client.post("/v1/engines", json=registration)
            assert r.status_code == status and r.json()["error"]["message"]
            assert client.post("/v1/engines/engine-0/heartbeat", json={}).status_code == status
            assert client.delete("/v1/engines/engine-0").status_code == status
    for key in (ADMIN, SECRET):
        for header in ("bearer", "x-api-key"):
            with as_(service, key, header) as admin:
                [engine] = admin.get("/v1/engines").json()["data"]  # the real engine is still there
                assert engine["id"] == "engine-0"
                assert admin.delete("/v1/engines/engine-9").status_code == 404
    with as_(service, ALICE) as alice:  # and still serves
        assert alice.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_with_tenant_keys_but_no_operator_credential_the_engine_routes_are_closed(
        tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    with serve_app(create_app(engine, tenants=keyed_tenants())) as url:
        with as_(url, ALICE) as alice, as_(url, None) as anon, as_(url, "sk-other") as other:
            assert alice.get("/v1/engines").status_code == 403
            assert anon.get("/v1/engines").status_code == 401
            assert other.delete("/v1/engines/engine-0").status_code == 401
            assert alice.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_an_engine_process_registers_only_with_the_cluster_secret(tiny_engine_factory, serve_app):
    with serve_app(create_app([], tenants=keyed_tenants(secret=SECRET), engine_wait_s=30)) as url:
        intruder, _ = tiny_engine_factory()
        good, _ = tiny_engine_factory()
        with serve_app(lambda u: create_worker_app(intruder, service_url=url, advertise_url=u,
                                                   cluster_secret="wrong")), \
             serve_app(lambda u: create_worker_app(good, service_url=url, advertise_url=u,
                                                   cluster_secret=SECRET)) as good_url, \
             as_(url, SECRET) as admin, as_(url, ALICE) as alice:
            deadline = time.monotonic() + 30
            while not admin.get("/v1/engines").json()["data"] and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.5)  # the intruder retries every second; it must still be refused
            listed = admin.get("/v1/engines").json()["data"]
            assert [e["url"] for e in listed] == [good_url]
            r = alice.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200, r.text


# ---- the tenants file --------------------------------------------------------------------------
BOB_HEX = hashlib.sha256(b"sk-bob-1").hexdigest()
K_HEX = hashlib.sha256(b"k").hexdigest()
GOOD = f"""
[tenants.alice]
keys = ["sk-alice-1"]
max_sessions = 8
max_queued_calls = 64
max_prompt_tokens = 8192
max_tokens = 1024
tokens_per_minute = 200000

[tenants.bob]
keys = ["sha256:{BOB_HEX}"]
"""


@pytest.mark.parametrize(("text", "message"), [
    ("[tenants.alice\nkeys = 1", "not valid TOML"),
    ('[tenants.alice]\nkeys = ["k"]\nmax_session = 3', "tenants.alice.max_session: unknown field"),
    ('[tenants.a]\nkeys = ["k"]\n[tenants.b]\nkeys = ["k"]', "tenants 'a' and 'b' share a key"),
    (f'[tenants.a]\nkeys = ["k"]\n[tenants.b]\nkeys = ["sha256:{K_HEX}"]', "tenants 'a' and 'b' share a key"),
    ('[tenants.a]\nkeys = ["sha256:abc"]', "64 hex digits"),
    ('[tenants.a]\nkeys = ["k"]\nmax_tokens = 0', "tenants.a.max_tokens: Input should be greater"),
    ("[tenants.a]\nmax_tokens = 5", "tenants.a has no keys"),
    ('[users.a]\nkeys = ["k"]', "unknown table 'users'"),
    ("", "no tenants"),
])
def test_the_tenants_file_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    with pytest.raises(TenantsFileError) as err:
        load_tenants(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "sk-" not in str(err.value) and '"k"' not in str(err.value)


def test_the_tenants_file_loads_and_a_bad_one_stops_serve_in_one_line(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(GOOD)
    configs = load_tenants(path)
    assert configs["alice"].max_sessions == 8 and configs["alice"].tokens_per_minute == 200000
    assert Tenants(configs).authenticate("sk-bob-1").name == "bob"
    path.write_text('[tenants.alice]\nkeys = ["k"]\nbogus = 1')
    result = CliRunner().invoke(cli_app, ["serve", "--tenants", str(path)])
    assert result.exit_code == 1
    assert "tenants.alice.bogus: unknown field" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = CliRunner().invoke(cli_app, ["serve", "--tenants", str(tmp_path / "none.toml")])
    assert result.exit_code == 1 and "cannot read the tenants file" in result.stderr


def test_parrot_serve_and_an_engine_process_with_the_cluster_secret(tokenizer, tmp_path):
    """Real processes: ``parrot serve --tenants --cluster-secret`` and ``parrot engine
    --cluster-secret`` register, serve a tenant, and log no key."""
    folder = tmp_path / "tiny-llama"
    make_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tenants_file = tmp_path / "tenants.toml"
    tenants_file.write_text(GOOD)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--model", str(folder), "--device", "cpu", "--threads", "1", "--kv-cache-gib", "0.05"]
    serve_log, engine_log = tmp_path / "serve.log", tmp_path / "engine.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(serve_log, "wb") as slog, open(engine_log, "wb") as elog:
        serve = subprocess.Popen([sys.executable, "-m", "parrot.service", "serve", "--port", str(port),
                                  "--no-local-engine", "--tenants", str(tenants_file),
                                  "--cluster-secret", SECRET, "--log-level", "info"],
                                 env=env, stdout=slog, stderr=subprocess.STDOUT)
        engine = subprocess.Popen([sys.executable, "-m", "parrot.service", "engine", "--service", url,
                                   "--cluster-secret", SECRET, "--log-level", "info", *common],
                                  env=env, stdout=elog, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"{url}/healthz", serve, serve_log)
        with as_(url, SECRET) as admin, as_(url, ALICE) as alice:
            deadline = time.monotonic() + 60
            while not admin.get("/v1/engines").json()["data"]:
                assert time.monotonic() < deadline and engine.poll() is None, engine_log.read_text()
                time.sleep(0.2)
            assert alice.get("/v1/engines").status_code == 403
            r = alice.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
    finally:
        for proc in (engine, serve):
            proc.terminate()
            proc.wait(timeout=30)
    logs = serve_log.read_text() + engine_log.read_text()
    assert "API keys required (tenants: alice, bob)" in logs
    assert SECRET not in logs and ALICE not in logs
