"""The builtin engine's attention-backend switch: the Triton kernels in the model runner.

On CPU the kernels run only in Triton's interpreter, which needs ``TRITON_INTERPRET=1``
before triton is first imported; the suite's conftest imports transformers, which
imports triton. So the interpreted engine test skips in the main process and
``test_interpreted_engine_in_a_child_process`` runs it in a fresh pytest with the
variable set (alone: ``TRITON_INTERPRET=1 pytest <this file>``).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from parrot.service.engine.base import SamplingParams
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
from parrot.service.engine.builtin.model import resolve_attention_backend
from parrot.service.kernels import triton_attention as ta
from tests.conftest import make_tiny_model, run_under_triton_interpreter
from tests.conftest import run_request as run

SYSTEM = "You are a helpful assistant. Answer briefly and precisely. " * 4
# Four share a cached system prompt (a two-phase group), two stand alone (plain rows).
PROMPTS = [SYSTEM + f"Question {i}: what is {i} plus {i}?" for i in range(4)] + [
    "The quick brown fox jumps over the lazy dog because",
    "def add(a, b):\n    return",
]
NEW_TOKENS = 6


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' generate; stops at EOS like the engine does."""
    device = next(hf.parameters()).device
    out = hf.generate(torch.tensor([ids], device=device), max_new_tokens=n, do_sample=False,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device))
    return out[0, len(ids):].tolist()


async def greedy_batch(engine: BuiltinEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Cache the shared prompt with one request, then run all prompts as one batch."""
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    await run(engine, prompts[0], SamplingParams(max_new_tokens=1, temperature=0.0))
    results = await asyncio.gather(*(run(engine, ids, sampling) for ids in prompts))
    return [r[0] for r in results]


def count_launches(monkeypatch) -> dict[str, int]:
    """Count the runner's kernel calls: all of them, and those with a two-phase group."""
    counts = {"decode": 0, "two_phase": 0}
    real = ta.decode_attention_triton

    def counted(q, k_pool, v_pool, plan, scale):
        counts["decode"] += 1
        counts["two_phase"] += plan.prefix is not None
        return real(q, k_pool, v_pool, plan, scale)

    monkeypatch.setattr(ta, "decode_attention_triton", counted)
    return counts


async def check_backends_agree(build, tokenizer) -> None:
    """Greedy tokens of the triton backend == the torch backend == transformers' generate."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    outputs = {}
    for backend in ("torch", "triton"):
        # two_phase_min_saved_tokens=1: every shared prefix runs two-phase attention.
        engine, hf = build(attention_backend=backend, two_phase_min_saved_tokens=1)
        assert engine.runner.attention_backend == backend
        try:
            outputs[backend] = await greedy_batch(engine, prompts)
        finally:
            await engine.shutdown()
    expected = [hf_greedy(hf, ids, NEW_TOKENS) for ids in prompts]
    assert outputs["torch"] == expected
    assert outputs["triton"] == expected


@pytest.fixture
def interpreted():
    pytest.importorskip("triton")
    if not ta.interpret_mode():
        pytest.skip("runs in test_interpreted_engine_in_a_child_process")


async def test_triton_backend_matches_torch_and_transformers_interpreted(
    interpreted, tiny_engine_factory, tokenizer, monkeypatch
):
    counts = count_launches(monkeypatch)
    await check_backends_agree(tiny_engine_factory, tokenizer)
    # Both launches ran inside the engine: plain rows and a two-phase group.
    assert counts["decode"] > 0 and counts["two_phase"] > 0, counts


def test_interpreted_engine_in_a_child_process():
    pytest.importorskip("triton")
    if ta.interpret_mode():
        pytest.skip("this is the child process")
    summary = run_under_triton_interpreter(__file__, "interpreted and not child")
    assert "skipped" not in summary and "1 passed" in summary, summary


def test_auto_picks_torch_on_cpu_and_bad_choices_fail_before_loading(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu) == "torch"
    assert resolve_attention_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        BuiltinEngine(BuiltinEngineConfig(device="cpu", attention_backend="flash"))  # type: ignore[arg-type]
    if not ta.interpret_mode():
        with pytest.raises(ValueError, match="cannot run on cpu"):
            BuiltinEngine(BuiltinEngineConfig(device="cpu", attention_backend="triton"))
    monkeypatch.setattr(ta, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="Triton, which is not installed"):
        resolve_attention_backend("triton", torch.device("cuda"))
    assert resolve_attention_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(ta, "can_use_triton", lambda device: True)
    assert resolve_attention_backend("triton", torch.device("cuda")) == "triton"
    # Opt-in until the kernels have run on a GPU; never the interpreter by default.
    assert resolve_attention_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_attention_backend("auto", cpu) == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_triton_backend_matches_torch_and_transformers_on_cuda(tokenizer, monkeypatch):
    pytest.importorskip("triton")

    def build(**config) -> tuple[BuiltinEngine, object]:
        hf = make_tiny_model(len(tokenizer))
        cfg = BuiltinEngineConfig(device="cuda", kv_cache_gib=0.05, **config)
        engine = BuiltinEngine(cfg, hf_model=hf, tokenizer=tokenizer, model_name="tiny-llama")
        return engine, hf.to("cuda")

    counts = count_launches(monkeypatch)
    await check_backends_agree(build, tokenizer)
    assert counts["decode"] > 0 and counts["two_phase"] > 0, counts
