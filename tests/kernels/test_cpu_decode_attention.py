"""The C decode attention, against torch's attention on the same keys: lone rows, groups of
rows of different lengths, and groups that share a prefix (two-phase)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parrot.service.engine.builtin import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels are not built")


def _reference(q, k, v, scale):
    """One row's attention: q [H, D] over k, v [KV, L, D]."""
    kv, heads = k.shape[0], q.shape[0]
    out = F.scaled_dot_product_attention(q.view(1, kv, heads // kv, -1), k.unsqueeze(0), v.unsqueeze(0),
                                         scale=scale)
    return out.reshape(heads, -1)


def _with_threads(count, fn):
    cpu_kernels._threads = count
    try:
        return fn()
    finally:
        cpu_kernels._threads = None


@pytest.mark.parametrize("length", [1, 5, 255, 256, 1000])
@pytest.mark.parametrize(("heads", "kv", "dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 24)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_lone_row_matches_torch_on_paged_and_consecutive_keys(length, heads, kv, dim, threads):
    torch.manual_seed(length + heads)
    pool = 2048
    k_pool, v_pool = torch.randn(kv, pool, dim), torch.randn(kv, pool, dim)
    q = torch.randn(1, heads, dim)
    slots = torch.randperm(pool)[:length]
    lengths = torch.tensor([length])
    paged = _with_threads(threads, lambda: cpu_kernels.decode_attention(
        q, k_pool, v_pool, 0.3, table=slots.view(1, -1), lengths=lengths))
    consecutive = _with_threads(threads, lambda: cpu_kernels.decode_attention(
        q, k_pool, v_pool, 0.3, table=None, first=100, lengths=lengths))
    torch.testing.assert_close(paged[0], _reference(q[0], k_pool[:, slots], v_pool[:, slots], 0.3),
                               rtol=1e-5, atol=1e-5)
    expected = _reference(q[0], k_pool[:, 100:100 + length], v_pool[:, 100:100 + length], 0.3)
    torch.testing.assert_close(consecutive[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix_len", [0, 1, 7, 128, 129, 700])
@pytest.mark.parametrize("rows", [1, 2, 5, 11, 32])
@pytest.mark.parametrize(("heads", "kv", "dim"), [(9, 3, 64), (8, 2, 24), (6, 6, 40), (4, 2, 20)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_group_with_or_without_a_shared_prefix_matches_torch(prefix_len, rows, heads, kv, dim, threads):
    torch.manual_seed(prefix_len * 7 + rows)
    pool = 4096
    k_pool, v_pool = torch.randn(kv, pool, dim), torch.randn(kv, pool, dim)
    # q as the model holds it: each row's heads inside a wider row (q, k and v side by side)
    q = torch.randn(rows, heads + 2 * kv, dim)[:, :heads]
    order = torch.randperm(pool)
    prefix = order[:prefix_len] if prefix_len else None
    lengths = torch.randint(1, 60, (rows,))
    table = order[prefix_len:prefix_len + rows * 60].view(rows, 60)
    out = _with_threads(threads, lambda: cpu_kernels.decode_attention(
        q, k_pool, v_pool, 0.125, table=table, lengths=lengths, prefix=prefix))
    for b in range(rows):
        keys = table[b, :lengths[b]] if prefix is None else torch.cat([prefix, table[b, :lengths[b]]])
        torch.testing.assert_close(out[b], _reference(q[b], k_pool[:, keys], v_pool[:, keys], 0.125),
                                   rtol=1e-5, atol=1e-5)


def test_a_row_answers_the_same_in_any_group_of_the_same_shape_and_threads():
    torch.manual_seed(0)
    k_pool, v_pool = torch.randn(3, 512, 64), torch.randn(3, 512, 64)
    q = torch.randn(4, 9, 64)
    prefix, table = torch.arange(200), torch.arange(200, 240).view(4, 10)
    lengths = torch.tensor([10, 3, 7, 1])
    attention = cpu_kernels.DecodeAttention(4, 9, 64, 0.125, table=table, lengths=lengths, prefix=prefix)
    assert torch.equal(attention(q, k_pool, v_pool), attention(q, k_pool, v_pool))


def test_large_scores_do_not_overflow():
    k_pool, v_pool = torch.randn(1, 64, 16) * 100, torch.randn(1, 64, 16)
    q = torch.randn(3, 2, 16) * 100
    lengths = torch.tensor([64])
    lone = cpu_kernels.decode_attention(q[:1], k_pool, v_pool, 1.0, table=None, lengths=lengths)
    grouped = cpu_kernels.decode_attention(q, k_pool, v_pool, 1.0, table=torch.arange(40, 64).repeat(3, 1),
                                           lengths=torch.tensor([24, 24, 24]), prefix=torch.arange(40))
    assert torch.isfinite(lone).all() and torch.isfinite(grouped).all()
    torch.testing.assert_close(lone[0], _reference(q[0], k_pool, v_pool, 1.0), rtol=1e-4, atol=1e-4)
    for b in range(3):
        torch.testing.assert_close(grouped[b], _reference(q[b], k_pool, v_pool, 1.0), rtol=1e-4, atol=1e-4)


def test_consecutive_keys_serve_a_lone_row_only():
    k_pool = torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match="lone row"):
        cpu_kernels.decode_attention(torch.randn(2, 1, 16), k_pool, k_pool, 1.0, table=None,
                                     lengths=torch.tensor([4, 4]))


def test_the_portable_build_agrees(tmp_path):
    """Machines without AVX-512 build the plain C loops (libm's exp, one query at a time)."""
    try:
        portable = cpu_kernels.build(tmp_path, march="x86-64")
    except cpu_kernels.KernelBuildError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(1)
    k_pool, v_pool = torch.randn(3, 300, 64), torch.randn(3, 300, 64)
    q = torch.randn(5, 9, 64)
    prefix, table = torch.arange(100), torch.arange(100, 300).view(5, 40)
    lengths = torch.tensor([40, 1, 9, 30, 2])
    out = torch.empty(5, 9, 64)
    scratch = torch.empty(portable.parrot_decode_attention_scratch(5, 9, 64, 2))
    portable.parrot_decode_attention(q.data_ptr(), 9 * 64, k_pool.data_ptr(), v_pool.data_ptr(), 3, 300, 64,
                                     9, 5, prefix.data_ptr(), 100, table.data_ptr(), 40, 0,
                                     lengths.data_ptr(), 0.125, scratch.data_ptr(), out.data_ptr(), 2)
    vector = cpu_kernels.decode_attention(q, k_pool, v_pool, 0.125, table=table, lengths=lengths,
                                          prefix=prefix)
    torch.testing.assert_close(out, vector, rtol=1e-5, atol=1e-5)
