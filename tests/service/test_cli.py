"""The ``parrot`` command line."""

from __future__ import annotations

import asyncio

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from parrot.service.cli import app, run_demo
from parrot.service.engine.builtin import engine as builtin_engine

runner = CliRunner()


def test_help_lists_the_commands_and_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "serve" in result.stdout and "generate" in result.stdout
    serve_help = runner.invoke(app, ["serve", "--help"]).stdout
    options = ("--host", "--port", "--model", "--device", "--dtype", "--kv-cache-gib", "--demo")
    for option in options:
        assert option in serve_help


def test_generate_with_a_missing_model_fails_cleanly(tmp_path):
    result = runner.invoke(app, ["generate", "hi", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "Traceback" not in result.output


def test_demo_prints_prompt_and_answer(live_server):
    console = Console(record=True, width=200)
    answer = asyncio.run(run_demo(live_server.base_url, console, prompt="Say hi", max_tokens=5))
    expected = live_server.client().chat.completions.create(
        model=live_server.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
        temperature=0).choices[0].message.content
    assert answer == expected
    printed = console.export_text()
    assert "prompt: Say hi" in printed and f"answer: {answer}" in printed


@pytest.mark.parametrize("chat", [True, False])
def test_generate_prints_the_greedy_completion(tiny_engine_factory, tokenizer, monkeypatch, chat):
    engine, hf = tiny_engine_factory()
    monkeypatch.setattr(builtin_engine, "BuiltinEngine", lambda config: engine)  # the CLI's own loading path
    prompt = "Tell me a joke"
    ids = (engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat
           else engine.tokenizer.encode(prompt))
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        out = hf.generate(torch.tensor([ids]), attention_mask=mask, max_new_tokens=6,
                          do_sample=False)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    args = ["generate", prompt, "--max-tokens", "6", "--chat" if chat else "--no-chat"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


@pytest.mark.e2e
def test_generate_on_the_default_model():
    result = runner.invoke(app, ["generate", "What is the capital of France?",
                                 "--max-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "sglang"], "expected KIND=URL"),
    (["--engine", "tgi=http://127.0.0.1:9"], "unknown engine kind 'tgi'; use sglang or openai"),
    (["--config", "/nowhere/parrot.toml"], "cannot read the config file /nowhere/parrot.toml"),
    (["--no-local-engine", "--engine", "openai=http://127.0.0.1:9/v1"],
     "the openai engine at http://127.0.0.1:9/v1 is unreachable"),
])
def test_serve_with_a_bad_engine_spec_fails_in_one_line(args, message):
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "--attention-backend", "flash"],
     "unknown attention backend 'flash'; use auto, torch or triton"),
    (["engine", "--service", "http://127.0.0.1:9", "--device", "cpu", "--attention-backend", "triton"],
     "attention backend 'triton' cannot run on cpu"),
])
def test_a_bad_attention_backend_fails_in_one_line_before_loading(args, message, monkeypatch):
    from parrot.service.engine.builtin import loader
    from parrot.service.kernels import triton_attention

    # As on a CPU host with Triton installed, whatever TRITON_INTERPRET says.
    monkeypatch.setattr(triton_attention, "can_use_triton", lambda device: False)
    monkeypatch.setattr(triton_attention, "triton_available", lambda: True)
    loads: list[tuple] = []
    monkeypatch.setattr(loader, "load_hf_model", lambda *a: loads.append(a))
    help_text = runner.invoke(app, [args[0], "--help"], env={"COLUMNS": "200"}).stdout
    assert "--attention-backend" in help_text
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert loads == []  # failed before reading any weights
