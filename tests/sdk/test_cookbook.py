"""Every cookbook script runs to the end against a live service (the tiny model, via --url)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COOKBOOK = Path(__file__).resolve().parents[2] / "cookbook"
SCRIPTS = sorted(p.name for p in COOKBOOK.glob("*.py") if not p.name.startswith("_"))  # _x: helpers


def test_the_cookbook_has_the_promised_recipes():
    assert {"code_and_test.py", "chain_summary.py", "map_reduce_summary.py", "multi_agent.py",
            "langchain_map_reduce.py", "langgraph_multi_agent.py",
            "langchain_shared_prompt_chat.py", "semantic_kernel_nested.py"} <= set(SCRIPTS)
    readme = (COOKBOOK / "README.md").read_text()
    assert all(name in readme for name in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_against_a_service(script, service_url):
    result = subprocess.run([sys.executable, str(COOKBOOK / script), "--url", service_url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wall time:" in result.stdout, result.stdout
