"""The C decode attention for one query token, against torch's attention on the same keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parrot.service.engine.builtin import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels are not built")


def _reference(q, k, v, scale):
    kv, heads = k.shape[0], q.shape[1]
    out = F.scaled_dot_product_attention(q.view(1, kv, heads // kv, -1), k.unsqueeze(0), v.unsqueeze(0),
                                         scale=scale)
    return out.reshape(1, heads, -1)


@pytest.mark.parametrize("length", [1, 5, 255, 256, 1000])
@pytest.mark.parametrize(("heads", "kv", "dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 24)])
@pytest.mark.parametrize("threads", [1, 2])
def test_it_matches_torch_on_paged_and_consecutive_keys(length, heads, kv, dim, threads):
    torch.manual_seed(length + heads)
    pool = 2048
    k_pool, v_pool = torch.randn(kv, pool, dim), torch.randn(kv, pool, dim)
    q = torch.randn(1, heads, dim)
    slots = torch.randperm(pool)[:length]
    cpu_kernels._threads = threads
    try:
        paged = cpu_kernels.decode_attention(q, k_pool, v_pool, slots, 0, length, 0.3)
        consecutive = cpu_kernels.decode_attention(q, k_pool, v_pool, None, 100, length, 0.3)
    finally:
        cpu_kernels._threads = None
    torch.testing.assert_close(paged, _reference(q, k_pool[:, slots], v_pool[:, slots], 0.3),
                               rtol=1e-5, atol=1e-5)
    expected = _reference(q, k_pool[:, 100:100 + length], v_pool[:, 100:100 + length], 0.3)
    torch.testing.assert_close(consecutive, expected, rtol=1e-5, atol=1e-5)


def test_large_scores_do_not_overflow():
    k_pool, v_pool = torch.randn(1, 64, 16) * 100, torch.randn(1, 64, 16)
    q = torch.randn(1, 2, 16) * 100
    out = cpu_kernels.decode_attention(q, k_pool, v_pool, None, 0, 64, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(q, k_pool, v_pool, 1.0), rtol=1e-4, atol=1e-4)
