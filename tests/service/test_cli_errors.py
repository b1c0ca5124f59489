"""Every ``parrot`` option is checked before anything slow starts: a mistake is one ``error:`` line on
stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from typer.testing import CliRunner

from parrot.service import cli, cli_checks
from parrot.service.cli import app
from parrot.service.drain import DEFAULT_DRAIN_TIMEOUT_S
from parrot.service.engine.builtin import engine as builtin_engine
from parrot.service.engine.builtin import loader
from parrot.service.engine.builtin.model import AttentionBackendOption

runner = CliRunner()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.toml").write_text("engines = [\n")
    (tmp_path / "wrong.toml").write_text("engines = 3\n")
    names = ("notes.txt", "empty", "bad.toml", "wrong.toml")
    return {name.split(".")[0]: str(tmp_path / name) for name in names}


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


CASES = [
    # (argv, expected exit code, text the one line must contain)
    (["serve", "--device", "bogus"], 1, "--device 'bogus' is not a device; use auto, cpu, cuda or cuda:N"),
    (["serve", "--device", "cuda:x"], 1, "is not a device"),
    (["serve", "--dtype", "int8"], 1, "--dtype 'int8' is not supported; use auto, float32, bfloat16"),
    (["serve", "--port", "70000"], 2, "Invalid value for '--port'"),
    (["serve", "--port", "http"], 2, "Invalid value for '--port'"),
    (["serve", "--colour"], 2, "No such option: --colour"),
    (["serve", "--model", "{tmp}/missing.gguf"], 1, "no such file or folder"),
    (["serve", "--model", "{notes}"], 1, "a model file must be a .gguf file"),
    (["serve", "--model", "{empty}"], 1, "no config.json in that folder"),
    (["serve", "--attention-backend", "flash"], 1, "unknown attention backend 'flash'"),
    (["serve", "--engine", "tgi=http://127.0.0.1:9"], 1, "unknown engine kind 'tgi'"),
    (["serve", "--config", "{bad}"], 1, "is not valid TOML"),
    (["serve", "--config", "{wrong}"], 1, "engines: Input should be a valid list"),
    (["serve", "--tenants", "{tmp}/none.toml"], 1, "cannot read the tenants file"),
    (["serve", "--log-level", "loud"], 1, "--log-level 'loud' is not a level"),
    (["serve", "--kv-cache-gib", "0"], 1, "--kv-cache-gib must be more than 0"),
    (["serve", "--threads", "0"], 2, "Invalid value for '--threads'"),
    (["serve", "--port", "{busy}"], 1, "cannot listen on 127.0.0.1:{busy}"),
    (["engine", "--service", "ftp://x"], 1, "--service 'ftp://x' is not an http(s) URL"),
    (["engine", "--service", "http://127.0.0.1:9", "--advertise-url", "here"], 1, "--advertise-url 'here'"),
    (["engine", "--service", "http://127.0.0.1:9", "--port", "-1"], 2, "Invalid value for '--port'"),
    (["engine", "--service", "http://127.0.0.1:9", "--dtype", "fp8"], 1, "--dtype 'fp8' is not supported"),
    (["generate"], 2, "Missing argument 'prompt'"),
    (["generate", "hi", "--url", "localhost:8000"], 1, "--url 'localhost:8000' is not an http(s) URL"),
    (["generate", "hi", "--url", "http://127.0.0.1:{closed}"], 1, "cannot reach a Parrot service"),
    (["generate", "hi", "--max-tokens", "0"], 2, "Invalid value for '--max-tokens'"),
    (["generate", "hi", "--device", "tpu"], 1, "--device 'tpu' is not a device"),
    (["chat", "--url", "http://127.0.0.1:{closed}"], 1, "cannot reach a Parrot service"),
    (["chat", "--temperature", "-1"], 2, "Invalid value for '--temperature'"),
    (["cache", "clear", "no-such-model"], 1, "no cached model named no-such-model"),
    (["cache", "rm"], 2, "No such command 'rm'"),
]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once closed


@pytest.mark.parametrize(("argv", "code", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_bad_option_is_one_line_and_a_non_zero_exit(argv, code, message, files, busy_port, tmp_path,
                                                      monkeypatch):
    values = {**files, "tmp": str(tmp_path), "busy": str(busy_port), "closed": str(_closed_port())}
    argv = [a.format(**values) for a in argv]
    message = message.format(**values)
    monkeypatch.setenv("PARROT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PARROT_BASE_URL", raising=False)
    loads: list[object] = []
    monkeypatch.setattr(builtin_engine, "BuiltinEngine", lambda *a, **k: loads.append(a))
    result = runner.invoke(app, argv)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert loads == []  # found before any model was loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line():
    result = runner.invoke(app, ["serve", "--device", "cuda"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda: CUDA is not available here" in lines[0], result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_device_index_out_of_range_is_one_line():
    result = runner.invoke(app, ["serve", "--device", f"cuda:{torch.cuda.device_count()}"])
    assert result.exit_code == 1 and "CUDA device(s)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_real_process_with_a_bad_option_prints_one_line():
    proc = subprocess.run([sys.executable, "-m", "parrot.service", "serve", "--device", "bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: --device 'bogus' is not a device; use auto, cpu, cuda or cuda:N\n"
    assert proc.stdout == ""


def test_help_outside_a_terminal_is_neither_cut_nor_wrapped():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    proc = subprocess.run([sys.executable, "-m", "parrot.service", "serve", "--help"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    for option in ("--attention-backend", "--latency-step-tokens", "--kv-cache-gib", "--drain-timeout",
                   "--cluster-secret", "--local-engine / --no-local-engine"):
        assert option in proc.stdout
    # An option's help is on its option's line, whole.
    assert any("--drain-timeout" in line and "a second signal cancels at once  [default: 30.0" in line
               for line in proc.stdout.splitlines()), proc.stdout


def test_help_imports_neither_torch_nor_the_service():
    code = ("import sys\n"
            "from parrot.service.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules]\n"
            "print('loaded:', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("loaded: []"), proc.stdout


def test_the_cli_defaults_match_the_engine_and_loader():
    defaults = builtin_engine.BuiltinEngineConfig()
    assert cli.DEFAULT_KV_CACHE_GIB == defaults.kv_cache_gib
    assert cli.DEFAULT_MAX_RUNNING == defaults.max_running
    assert cli.DEFAULT_LATENCY_STEP_TOKENS == defaults.latency_step_tokens
    assert defaults.device == "auto" and defaults.dtype == "auto" and defaults.attention_backend == "auto"
    assert cli_checks.DEFAULT_MODEL == loader.DEFAULT_MODEL
    assert set(cli_checks.DTYPES) == {"auto", *builtin_engine._DTYPES}
    assert cli.DEFAULT_DRAIN_TIMEOUT_S == DEFAULT_DRAIN_TIMEOUT_S
    assert set(cli_checks.ATTENTION_BACKENDS) == set(get_args(AttentionBackendOption))
