"""``parrot generate`` and ``parrot chat`` against a live service (real processes, real HTTP) and
embedded (the model in the command's own process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from parrot.service.cli import app
from parrot.service.engine.builtin import engine as builtin_engine

EMBEDDED_NOTE = "running the model in this process"


def parrot(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "PARROT_BASE_URL"}
    return subprocess.run([sys.executable, "-m", "parrot.service", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**base, **(env or {})})


def greedy_chat(server, messages, max_tokens):
    reply = server.client().chat.completions.create(
        model=server.model, messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_generate_with_url_streams_the_services_greedy_reply(live_server):
    expected = greedy_chat(live_server, [{"role": "user", "content": "Tell me a joke"}], 8)
    proc = parrot("generate", "Tell me a joke", "--url", live_server.base_url, "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert EMBEDDED_NOTE not in proc.stderr and proc.stderr == ""


def test_generate_reads_the_url_from_the_environment_and_takes_plain_prompts(live_server):
    expected = live_server.client().completions.create(
        model=live_server.model, prompt="Once upon a time", max_tokens=6, temperature=0).choices[0].text
    proc = parrot("generate", "Once upon a time", "--no-chat", "--max-tokens", "6",
                  env={"PARROT_BASE_URL": f"{live_server.base_url}/v1"})  # the OpenAI clients' form works too
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_generate_reports_the_services_error_in_one_line(live_server):
    proc = parrot("generate", "hi", "--url", live_server.base_url, "--model", "no-such-model")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the service at") and "404" in lines[0], proc.stderr


def test_chat_keeps_the_conversation_and_ends_on_exit(live_server):
    proc = parrot("chat", "--url", live_server.base_url, "--max-tokens", "6", "--system", "Be brief.",
                  stdin="Hello\n\nHow are you?\n/exit\nnever sent\n")
    assert proc.returncode == 0, proc.stderr
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    first = greedy_chat(live_server, history, 6)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you?"}]
    second = greedy_chat(live_server, history, 6)
    assert proc.stdout == f"{first}\n{second}\n"
    assert proc.stderr == ""  # no prompts or banners when stdin is not a terminal


def test_chat_ends_at_end_of_input_and_clear_forgets(live_server):
    proc = parrot("chat", "--url", live_server.base_url, "--max-tokens", "5", stdin="Hi\n/clear\nHi\n")
    assert proc.returncode == 0, proc.stderr
    once = greedy_chat(live_server, [{"role": "user", "content": "Hi"}], 5)
    assert proc.stdout == f"{once}\n{once}\n"  # after /clear the second "Hi" starts afresh


@pytest.mark.parametrize("command", [["generate", "Tell me a joke"], ["chat"]])
def test_without_a_url_it_says_so_and_runs_embedded(command, tiny_engine_factory, monkeypatch):
    engine, _ = tiny_engine_factory()
    monkeypatch.setattr(builtin_engine, "BuiltinEngine", lambda config: engine)  # the CLI's loading path
    monkeypatch.delenv("PARROT_BASE_URL", raising=False)
    result = CliRunner().invoke(app, [*command, "--max-tokens", "6"], input="Tell me a joke\n/exit\n")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if EMBEDDED_NOTE in line]
    assert len(notes) == 1 and "--url" in notes[0]
    assert result.stdout.endswith("\n") and result.stdout.strip()


def test_an_embedded_prompt_longer_than_the_context_is_one_line(tiny_engine_factory, monkeypatch):
    engine, _ = tiny_engine_factory()
    monkeypatch.setattr(builtin_engine, "BuiltinEngine", lambda config: engine)
    monkeypatch.delenv("PARROT_BASE_URL", raising=False)
    result = CliRunner().invoke(app, ["generate", "word " * 5000, "--max-tokens", "4"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2048" in errors[0], result.stderr
