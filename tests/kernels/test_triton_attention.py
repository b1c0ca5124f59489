"""Triton decode kernels against the torch references, in triton's CPU interpreter.

The interpreter needs ``TRITON_INTERPRET=1`` before triton is first imported, and the
suite's conftest imports transformers, which imports triton. So the interpreted cases
skip in the main process and ``test_interpreted_cases_in_a_child_process`` runs them
in a fresh pytest with the variable set (alone: ``TRITON_INTERPRET=1 pytest <this file>``).
The interpreter runs each program in numpy, so shapes stay tiny. The sm_90 compile test
catches what the interpreter forgives (e.g. non-constexpr globals); a CUDA comparison
runs only where a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from parrot.service.kernels import triton_attention as ta
from parrot.service.kernels.attention import (
    additive_mask,
    paged_decode_attention,
    shared_prefix_decode_attention,
)
from tests.conftest import run_under_triton_interpreter

SCALE = 0.2


@pytest.fixture
def interpreted():
    pytest.importorskip("triton")
    if not ta.interpret_mode():
        pytest.skip("runs in test_interpreted_cases_in_a_child_process")


def test_interpreted_cases_in_a_child_process():
    pytest.importorskip("triton")
    if ta.interpret_mode():
        pytest.skip("this is the child process")
    summary = run_under_triton_interpreter(__file__, "(matches_torch or one_launch) and not cuda")
    assert "skipped" not in summary and "passed" in summary, summary


def make_pool(kv: int, d: int, num_slots: int = 700, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(kv, num_slots, d, generator=g), torch.randn(kv, num_slots, d, generator=g)
    return k, v, torch.randperm(num_slots, generator=g)  # scattered slots to draw from


def table(rows: list[list[int]], device: str = "cpu"):
    lengths = [len(r) for r in rows]
    width = max(lengths)
    t = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    mask = None
    if min(lengths) < width:
        mask = additive_mask(torch.tensor(lengths, device=device), width, torch.float32)
    return t, mask


def split(perm: torch.Tensor, lengths: list[int], start: int = 0) -> list[list[int]]:
    out = []
    for n in lengths:
        out.append(perm[start:start + n].tolist())
        start += n
    return out


@pytest.mark.parametrize("heads,kv", [(4, 4), (9, 3)])
def test_paged_decode_matches_torch(interpreted, heads, kv):
    d = 16
    k_pool, v_pool, perm = make_pool(kv, d)
    rows = split(perm, [1, 70, 150, 5, 64])  # ragged; 150 keys take three key blocks
    slot_table, mask = table(rows)
    q = torch.randn(len(rows), heads, d)
    out = ta.paged_decode_attention_triton(q, k_pool, v_pool, slot_table, mask, SCALE)
    ref = paged_decode_attention(q, k_pool, v_pool, slot_table, mask, SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv,num_splits", [(4, 4, 1), (9, 3, 3)])
def test_shared_prefix_decode_matches_torch(interpreted, heads, kv, num_splits):
    d = 16
    k_pool, v_pool, perm = make_pool(kv, d)
    prefix = perm[:150]
    suffix_table, mask = table(split(perm, [1, 3, 7, 2, 1], start=150))  # ragged, 1 included
    q = torch.randn(suffix_table.shape[0], heads, d)
    group = ta.Group(q.shape[0], suffix_table, mask, prefix)
    out = ta.grouped_decode_attention_triton(q, k_pool, v_pool, [group], SCALE, num_splits=num_splits)
    ref = shared_prefix_decode_attention(q, k_pool, v_pool, prefix, suffix_table, mask, SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    same = ta.shared_prefix_decode_attention_triton(q, k_pool, v_pool, prefix, suffix_table, mask, SCALE)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)


def test_several_prefix_groups_and_a_plain_group_in_one_launch(interpreted):
    heads, kv, d = 9, 3, 16
    k_pool, v_pool, perm = make_pool(kv, d)
    # Group A: 6 rows on a 130-key prefix (18 query rows: two 16-row blocks); group B: 2
    # rows on a 20-key prefix (shorter than one split); then 3 plain rows.
    prefix_a, prefix_b = perm[:130], perm[130:150]
    groups = [
        ta.Group(6, *table(split(perm, [1, 2, 5, 1, 3, 4], start=150)), prefix_a),
        ta.Group(2, *table(split(perm, [1, 1], start=200)), prefix_b),
        ta.Group(3, *table(split(perm, [40, 1, 90], start=210))),
    ]
    q = torch.randn(11, heads, d)
    out = ta.grouped_decode_attention_triton(q, k_pool, v_pool, groups, SCALE, num_splits=2, block_m=16)
    ref = ta._grouped_torch(q, k_pool, v_pool, groups, SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_falls_back_to_torch_where_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(ta, "triton_available", lambda: False)
    assert not ta.can_use_triton(torch.device("cpu"))
    k_pool, v_pool, perm = make_pool(2, 8)
    slot_table, mask = table(split(perm, [3, 9]))
    q = torch.randn(2, 4, 8)
    out = ta.paged_decode_attention_triton(q, k_pool, v_pool, slot_table, mask, SCALE)
    assert torch.equal(out, paged_decode_attention(q, k_pool, v_pool, slot_table, mask, SCALE))


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from parrot.service.kernels import _triton_decode as k

def compile(fn, pointers, constexprs):
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    sig["qk_scale"] = "fp32"
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32))

for dt, precision in (("bf16", "tf32"), ("fp32", "ieee")):
    common = dict(q_ptr="*" + dt, k_ptr="*" + dt, v_ptr="*" + dt, o_part_ptr="*fp32", lse_part_ptr="*fp32")
    compile(k.prefix_partial_kernel,
            dict(common, prefix_slots_ptr="*i64", prefix_start_ptr="*i32", prefix_len_ptr="*i32",
                 blk_group_ptr="*i32", blk_row0_ptr="*i32", blk_row_end_ptr="*i32"),
            dict(G=3, D=64, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64, PRECISION=precision))
    compile(k.decode_kernel,
            dict(common, out_ptr="*" + dt, table_ptr="*i64", lengths_ptr="*i32", row_splits_ptr="*i32"),
            dict(G=3, G_PAD=16, D=64, BLOCK_D=64, BLOCK_N=64, PRECISION=precision))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs kernels as Python; compiling catches what only the compiler rejects."""
    pytest.importorskip("triton")
    env = {"TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decode_matches_torch_on_cuda(dtype):
    pytest.importorskip("triton")
    heads, kv, d = 9, 3, 64
    k_pool, v_pool, perm = make_pool(kv, d, num_slots=20_000)
    k_pool, v_pool = k_pool.to("cuda", dtype), v_pool.to("cuda", dtype)
    groups = [
        ta.Group(32, *table(split(perm, [1 + i % 7 for i in range(32)], start=3000), "cuda"),
                 perm[:2048].cuda()),
        ta.Group(4, *table(split(perm, [3, 1, 2, 5], start=5000), "cuda"), perm[2048:2100].cuda()),
        ta.Group(5, *table(split(perm, [1, 700, 64, 65, 300], start=6000), "cuda")),
    ]
    q = torch.randn(41, heads, d, device="cuda", dtype=dtype)
    out = ta.grouped_decode_attention_triton(q, k_pool, v_pool, groups, SCALE)
    ref = ta._grouped_torch(q.float(), k_pool.float(), v_pool.float(), [
        ta.Group(g.num_rows, g.slot_table, g.mask, g.prefix_slots) for g in groups], SCALE)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
