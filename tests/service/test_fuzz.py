"""Property-based fuzz of the HTTP API from its own OpenAPI spec (schemathesis over a live loopback server).

Every operation the spec lists (native sessions, graphs, variables and calls; the OpenAI routes;
engines; ops) gets schema-valid and schema-violating requests. Properties, for every one:

- no 5xx: whatever a client sends is its own fault (4xx) or served (2xx);
- no hang: each request answers within ``REQUEST_TIMEOUT_S``;
- every 4xx is JSON with ``error.message`` (the OpenAI error shape the clients parse);
- afterwards the server still answers ``/healthz`` and a real completion.

The run is bounded for CI: a fixed seed, derandomized generation, no shrinking (a hang would make
shrinking take minutes), a fixed number of examples per operation, and a tiny engine whose default
completion length is a few tokens. Requests are adjusted only where the spec lets a client ask
the server to wait or generate for long on purpose (a long-poll ``timeout``, a large
``max_tokens``): answering those slowly is the contract, not a hang. Engine registration is
pointed at a closed loopback port so that nothing leaves the machine.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from schemathesis.config import SchemathesisConfig

from parrot import limits
from parrot.service.app import create_app
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
from tests.conftest import make_tiny_model, serve_in_thread

REQUEST_TIMEOUT_S = 20.0  # far above any answer of a tiny engine generating a few tokens
MAX_EXAMPLES = 50  # fuzzing-phase cases per operation (the coverage phase adds its own, also bounded)
SEED = 13
MAX_FUZZ_TOKENS = 8  # a larger max_tokens only makes the same request slower
MAX_POLL_S = 1.0  # a long-poll on an unset variable waits its full timeout by contract

# Generated cases per operation label ("POST /v1/graphs"), read by the closing test.
CASES: Counter[str] = Counter()
FINDINGS: list[str] = []


def _closed_loopback_url() -> str:
    """A loopback URL nothing listens on (bound, then released), for engine registration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def fuzz_server(tokenizer: Any) -> Iterator[str]:
    """One server for the whole run: a tiny random-weight llama on a loopback port."""
    hf = make_tiny_model(len(tokenizer))
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.05), hf_model=hf,
                           tokenizer=tokenizer, model_name="tiny-llama")
    # A request without max_tokens would otherwise generate up to 1024 tokens: minutes per run;
    # a streamed graph submission waits for its fetches' values as long as a long-poll may.
    with pytest.MonkeyPatch.context() as patch, \
            serve_in_thread(create_app(engine, default_max_tokens=MAX_FUZZ_TOKENS)) as url:
        patch.setattr(limits, "MAX_WAIT_S", MAX_POLL_S)
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_server: str) -> Any:
    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        "generation": {
            "mode": "all",  # schema-valid and schema-violating requests
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "no-shrink": True,
            "database": "none",
        },
        # The reproduction printed for a finding keeps every value (ids, token counts): this
        # server holds no secrets, and "[Filtered]" would hide the input that broke it.
        "output": {"sanitization": {"enabled": False}},
    })
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


def _cap_tokens(value: Any) -> Any:
    """``value`` with every integer ``max_tokens``-like field above ``MAX_FUZZ_TOKENS`` lowered to it.
    Values that are not positive integers stay: they exercise validation."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if (key in ("max_tokens", "max_completion_tokens") and isinstance(item, int)
                    and not isinstance(item, bool) and item > MAX_FUZZ_TOKENS):
                item = MAX_FUZZ_TOKENS
            out[key] = _cap_tokens(item)
        return out
    if isinstance(value, list):
        return [_cap_tokens(item) for item in value]
    return value


def _number(value: Any) -> float | None:
    """``value`` as the server would read a number from a query string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _open_session(http: httpx.Client) -> str:
    """A session holding a set variable ``doc``, a call ``c0`` and its (soon set) output ``out``,
    so that fuzzed requests also reach the code behind a session that exists."""
    sid = http.post("/v1/sessions", json={}).json()["id"]
    graph = {
        "session_id": sid,
        "variables": [{"id": "doc", "value": "hello world"}, {"id": "out"}],
        "calls": [{"id": "c0", "segments": [
            {"type": "text", "text": "Say: "}, {"type": "input", "var": "doc"},
            {"type": "output", "var": "out", "sampling": {"max_tokens": 2}}]}],
    }
    r = http.post("/v1/graphs", json=graph)
    assert r.status_code == 200, r.text
    return sid


def _prepare(case: Any, http: httpx.Client, closed_url: str) -> str | None:
    """Adjust ``case`` in place (see the module docstring); return the session it was pointed at."""
    number = sum(CASES.values())
    if isinstance(case.body, dict | list):
        case.body = _cap_tokens(case.body)
    path = case.operation.path
    if path == "/v1/engines" and case.method.upper() == "POST" and isinstance(case.body, dict):
        if isinstance(case.body.get("url"), str):
            case.body["url"] = closed_url
    if isinstance(case.query, dict):
        timeout = _number(case.query.get("timeout"))
        if timeout is not None and timeout > MAX_POLL_S:
            case.query["timeout"] = MAX_POLL_S
    # One case in three stays as generated (ids that do not exist); the others target a live
    # session, half of them with ids that exist in it.
    mode = number % 3
    targets_session = "session_id" in (case.path_parameters or {}) or (
        path == "/v1/graphs" and isinstance(case.body, dict) and "session_id" in case.body)
    if mode == 0 or not targets_session:
        return None
    sid = _open_session(http)
    if case.path_parameters and "session_id" in case.path_parameters:
        case.path_parameters["session_id"] = sid
        if mode == 2:
            if "var_id" in case.path_parameters:
                case.path_parameters["var_id"] = "doc" if number % 2 else "out"
            if "call_id" in case.path_parameters:
                case.path_parameters["call_id"] = "c0"
    else:
        case.body["session_id"] = sid
    return sid


def _describe(case: Any, response: requests.Response | None = None) -> str:
    request = case.as_curl_command()
    if response is None:
        return request
    return f"{request}\n-> {response.status_code} {response.text[:500]!r}"


@pytest.fixture(scope="module")
def control(fuzz_server: str) -> Iterator[httpx.Client]:
    """The test's own requests (sessions to aim cases at, clean-up), apart from the fuzzed ones."""
    with httpx.Client(base_url=fuzz_server, timeout=REQUEST_TIMEOUT_S) as http:
        yield http


@schema.parametrize()
def test_api_answers_every_input_without_5xx_or_hang(case: Any, fuzz_server: str,
                                                     control: httpx.Client) -> None:
    sid = _prepare(case, control, _closed_loopback_url())
    CASES[case.operation.label] += 1
    try:
        response = case.call(base_url=fuzz_server, timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout:
        FINDINGS.append(f"hang: {_describe(case)}")
        raise AssertionError(f"no answer within {REQUEST_TIMEOUT_S:g} s: {_describe(case)}") from None
    finally:
        if sid is not None:
            control.delete(f"/v1/sessions/{sid}")  # cancels what the case started in it
    status = response.status_code
    if status >= 500:
        FINDINGS.append(f"{status}: {_describe(case, response)}")
    assert status < 500, f"server error: {_describe(case, response)}"
    if 400 <= status < 500:
        try:
            body = response.json()
        except json.JSONDecodeError:
            FINDINGS.append(f"non-JSON {status}: {_describe(case, response)}")
            raise AssertionError(f"a {status} that is not JSON: {_describe(case, response)}") from None
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        if not (isinstance(message, str) and message):
            FINDINGS.append(f"{status} without error.message: {_describe(case, response)}")
        assert isinstance(message, str) and message, \
            f"a {status} without error.message: {_describe(case, response)}"
    # A session the case created is deleted, so the run does not accumulate them (and a later
    # case's long-poll finds no variable of it that nothing will set).
    if status == 200 and case.operation.path == "/v1/sessions" and case.method.upper() == "POST":
        control.delete(f"/v1/sessions/{response.json()['id']}")
    if (status == 200 and case.operation.path == "/v1/graphs" and isinstance(case.body, dict)
            and case.body.get("open_session") is not None):
        control.delete(f"/v1/sessions/{case.body['session_id']}")


def test_server_still_serves_after_fuzz(fuzz_server: str) -> None:
    """Runs after the fuzz (file order): the server is alive and still generates."""
    with httpx.Client(base_url=fuzz_server, timeout=REQUEST_TIMEOUT_S) as http:
        assert http.get("/healthz").status_code == 200
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0,
                                               "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        sid = _open_session(http)
        out = http.get(f"/v1/sessions/{sid}/variables/out", params={"timeout": 10})
        assert out.status_code == 200 and out.json()["ready"], out.text
        assert http.delete(f"/v1/sessions/{sid}").status_code == 200
    total = sum(CASES.values())
    print(f"\nfuzz: {total} generated cases over {len(CASES)} operations: {dict(sorted(CASES.items()))}")
    print(f"fuzz findings: {FINDINGS or 'none'}")
    if total:  # the fuzz ran in this session (not deselected): it covered every operation
        assert len(CASES) >= 19, f"operations fuzzed: {sorted(CASES)}"
