"""Every python example in the README runs as written, in reading order, against a live ``parrot serve``
on the real default model, from a fresh virtualenv that has only what the examples say to install.

A reader pastes the examples into one Python session, so they run that way here: one interpreter,
one namespace, each example after the one before (the structured-output example uses the client
the first one made). Only the service's address changes (the README's port may be taken). Each
example's first line says what to install; examples whose extra is ``client`` (or nothing) run in a
virtualenv made here with ``pip install -e .[client]`` and nothing else, so a missing dependency
fails as it would for a newcomer. A ``# prints: TEXT`` comment is a claim checked against what the
example printed.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import free_port, parrot_serve, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
README_URL = "http://127.0.0.1:8000"
# An example's first line: `# pip install -e .` or `# pip install -e ".[EXTRAS]"`, and why.
INSTALL = re.compile(r'# pip install -e (?:\.|"\.\[([\w,-]+)\]")(?:\s|$)')
CLIENT_EXTRA = {"client", "langchain"}  # what `pip install -e .[client]` brings (pyproject.toml)

# Runs the examples in one namespace; prints one JSON line per example.
SESSION = r"""
import contextlib, io, json, sys, traceback
examples = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for example in examples:
    out = io.StringIO()
    error = None
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(example, "<README example>", "exec"), namespace)
    except BaseException:
        error = traceback.format_exc(limit=-3)
    print(json.dumps({"output": out.getvalue(), "error": error}), flush=True)
"""


def readme_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def extras_of(example: str) -> set[str]:
    """The extras the example's first line says to install."""
    match = INSTALL.match(example.splitlines()[0])
    assert match is not None, f"the example does not say on its first line what to install:\n{example}"
    return set(match.group(1).split(",")) if match.group(1) else set()


def test_every_example_says_what_it_needs_on_its_first_line():
    examples = readme_examples()
    assert len(examples) >= 5
    for example in examples:
        extras_of(example)


@pytest.fixture(scope="module")
def starting_service() -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``parrot serve`` on the default model, as the README's quick start runs it, not yet waited
    for: it loads while the virtualenv installs."""
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"parrot-readme-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parrot.service", "serve", "--port", str(port), "--device", "cpu",
             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield f"http://127.0.0.1:{port}", proc, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def service(starting_service) -> str:
    url, proc, log_path = starting_service
    wait_for_http(f"{url}/healthz", proc, log_path, timeout_s=300)
    return url


@pytest.fixture(scope="module")
def client_python(tmp_path_factory) -> str:
    """A fresh virtualenv with this package and its ``client`` extra only (about a minute)."""
    folder = tmp_path_factory.mktemp("client-venv")
    venv.create(folder, with_pip=True)
    python = str(folder / "bin" / "python")
    started = time.monotonic()
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "-e", f"{ROOT}[client]"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"fresh client virtualenv installed in {time.monotonic() - started:.0f} s")
    return python


def run_session(python: str, examples: list[str], url: str, tmp_path: Path) -> list[dict]:
    path = tmp_path / "examples.json"
    path.write_text(json.dumps([e.replace(README_URL, url) for e in examples]))
    proc = subprocess.run([python, "-c", SESSION, str(path)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def check_claims(example: str, output: str) -> None:
    for claim in re.findall(r"# prints: (.+)$", example, re.M):
        assert claim.strip() in output, f"the README says it prints {claim!r}; it printed {output!r}"


@pytest.mark.e2e
def test_the_readme_examples_run_as_written(starting_service, client_python, service, tmp_path):
    examples = readme_examples()
    in_client_venv = [e for e in examples if extras_of(e) <= CLIENT_EXTRA]
    elsewhere = [e for e in examples if not extras_of(e) <= CLIENT_EXTRA]
    assert len(in_client_venv) >= 4
    results = run_session(client_python, in_client_venv, service, tmp_path)
    # The rest (Semantic Kernel's extra is about 90 packages) run in this environment, which has them.
    results += run_session(sys.executable, elsewhere, service, tmp_path) if elsewhere else []
    for example, result in zip(in_client_venv + elsewhere, results, strict=True):
        assert result["error"] is None, f"{example}\n{result['error']}"
        assert result["output"].strip(), f"the example printed nothing:\n{example}"
        check_claims(example, result["output"])


COOKBOOK = ROOT / "cookbook"
RECIPE_INSTALL = re.compile(r'^    (pip install -e (?:\.|"\.\[([\w,-]+)\]"))\s', re.M)


def recipe_extras(recipe: Path) -> set[str]:
    """The extras a recipe's docstring says to install."""
    match = RECIPE_INSTALL.search(recipe.read_text())
    assert match is not None, f"{recipe.name} does not say what to install"
    return set(match.group(2).split(",")) if match.group(2) else set()


def test_every_recipe_says_what_to_install_and_the_client_extra_has_it():
    recipes = sorted(p for p in COOKBOOK.glob("*.py") if not p.name.startswith("_"))
    assert len(recipes) >= 8
    assert {r.name for r in recipes if recipe_extras(r) <= CLIENT_EXTRA} >= {
        "code_and_test.py", "langchain_map_reduce.py", "langgraph_multi_agent.py"}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    client = " ".join(extras["client"])
    for needed in ("parrot-serve[langchain]", "openai", "langchain-openai"):
        assert needed in client


@pytest.fixture(scope="module")
def tiny_service(tokenizer, tmp_path_factory) -> Iterator[str]:
    with parrot_serve(tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-llama",
                      "--kv-cache-gib", "0.05") as (url, _):
        yield url


def test_the_recipes_run_from_a_client_only_virtualenv(client_python, tiny_service):
    """The recipes that need the client extra, as their docstrings say to run them with a service
    (``--url``), from the fresh virtualenv: whatever they import, it installed. (Every recipe runs in
    this environment in tests/sdk/test_cookbook.py; those needing only the package are not repeated.)"""
    recipes = sorted(p for p in COOKBOOK.glob("*.py")
                     if not p.name.startswith("_") and "client" in recipe_extras(p)
                     and recipe_extras(p) <= CLIENT_EXTRA)
    assert len(recipes) >= 3
    for recipe in recipes:
        proc = subprocess.run([client_python, str(recipe), "--url", tiny_service], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, f"{recipe.name}:\n{proc.stderr[-3000:]}"
        assert "wall time:" in proc.stdout


def load_recipe(name: str):
    sys.path.insert(0, str(COOKBOOK))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(COOKBOOK))


def test_the_multi_agent_recipe_drops_the_labels_replies_start_with():
    recipe = load_recipe("langgraph_multi_agent")
    assert recipe.unlabeled("Writer: Writer: The brief.") == "The brief."
    assert recipe.unlabeled("**Security reviewer:** Engineer: Use expiring links.") == "Use expiring links."
    assert recipe.unlabeled("Note: links expire.") == "Note: links expire."  # not a role: kept


@pytest.mark.e2e
def test_the_multi_agent_recipes_messages_carry_one_label_each(service):
    """On the real model (which imitates the conversation's "Role: ..." format), no message of the
    recipe's meeting, round after round, carries its role label twice."""
    from parrot.integrations.langchain import ChatParrot

    recipe = load_recipe("langgraph_multi_agent")
    llm = ChatParrot(base_url=service, temperature=0, max_tokens=24)
    state = recipe.build_graph(llm).invoke({"task": recipe.TASK, "rounds": 2, "notes": []})
    said = [("Planner", state["plan"]), *state["notes"], ("Writer", state["brief"])]
    assert len(said) == 2 + 2 * len(recipe.SPECIALISTS)
    label = re.compile(r"^\W*(%s)\W*:" % "|".join(recipe.ROLES), re.I)  # noqa: UP031
    for role, text in said:
        assert text and not label.match(text), (role, text)
    for _, content in recipe.conversation(state)[2:]:  # as every agent sees the meeting
        assert not re.match(r"([\w ]+): \1:", content), content
