"""Attention kernels against a naive per-request softmax(QK^T)V reference."""

import pytest
import torch

from parrot.service.kernels.attention import (
    additive_mask,
    contiguous_decode_attention,
    merge_partials,
    paged_decode_attention,
    prefill_attention,
    shared_prefix_decode_attention,
)

SCALE = 0.125


def naive(q, k, v, causal_offset=None):
    """q [N, H, D], k/v [L, KV, D] -> [N, H, D], GQA by repeating KV heads."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k.double()) * SCALE
    if causal_offset is not None:
        n, length = q.shape[0], k.shape[0]
        allowed = torch.ones(n, length, dtype=torch.bool).tril(causal_offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v.double()).float()


def pool(num_slots, kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(kv, num_slots, d, generator=g), torch.randn(kv, num_slots, d, generator=g)


@pytest.mark.parametrize("heads,kv", [(4, 4), (8, 2), (9, 3)])
def test_paged_decode_matches_reference_with_ragged_scattered_keys(heads, kv):
    d, b = 16, 11  # more rows than one gather chunk
    k_pool, v_pool = pool(400, kv, d)
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(1))
    lengths = [3 + 7 * i for i in range(b)]
    rows = [perm[i * 30:i * 30 + n].tolist() for i, n in enumerate(lengths)]
    width = max(lengths)
    table = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = additive_mask(torch.tensor(lengths), width, torch.float32)
    q = torch.randn(b, heads, d)
    out = paged_decode_attention(q, k_pool, v_pool, table, mask, SCALE)
    for i, r in enumerate(rows):
        ref = naive(q[i:i + 1], k_pool[:, r].transpose(0, 1), v_pool[:, r].transpose(0, 1))
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv", [(4, 4), (9, 3)])
def test_one_row_over_consecutive_slots_reads_them_in_place(heads, kv):
    d, start, length = 16, 37, 120
    k_pool, v_pool = pool(400, kv, d)
    q = torch.randn(1, heads, d)
    slots = list(range(start, start + length))
    out = contiguous_decode_attention(q, k_pool[:, start:start + length], v_pool[:, start:start + length],
                                      SCALE)
    ref = naive(q, k_pool[:, slots].transpose(0, 1), v_pool[:, slots].transpose(0, 1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    paged = paged_decode_attention(q, k_pool, v_pool, torch.tensor([slots]), None, SCALE)
    torch.testing.assert_close(out, paged, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("heads,kv", [(4, 4), (9, 3)])
def test_shared_prefix_decode_matches_reference(heads, kv):
    d, b, prefix_len = 16, 5, 37
    k_pool, v_pool = pool(300, kv, d)
    prefix = list(range(100, 100 + prefix_len))
    suffix_lengths = [1, 4, 9, 2, 6]  # ragged suffixes
    suffixes = [list(range(200 + 12 * i, 200 + 12 * i + n)) for i, n in enumerate(suffix_lengths)]
    width = max(suffix_lengths)
    table = torch.tensor([s + [0] * (width - len(s)) for s in suffixes])
    mask = additive_mask(torch.tensor(suffix_lengths), width, torch.float32)
    q = torch.randn(b, heads, d)
    out = shared_prefix_decode_attention(
        q, k_pool, v_pool, torch.tensor(prefix), table, mask, SCALE)
    for i, s in enumerate(suffixes):
        keys = prefix + s
        ref = naive(q[i:i + 1], k_pool[:, keys].transpose(0, 1), v_pool[:, keys].transpose(0, 1))
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_merge_of_two_halves_equals_attention_over_all_keys():
    q = torch.randn(2, 3, 4, 8)
    k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)

    def part(ks, vs):
        s = (q @ ks.transpose(-1, -2)) * SCALE
        return torch.softmax(s, -1) @ vs, s.logsumexp(-1)

    whole, _ = part(k, v)
    merged = merge_partials(*part(k[:, :, :6], v[:, :, :6]), *part(k[:, :, 6:], v[:, :, 6:]))
    torch.testing.assert_close(merged, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n,length", [(5, 5), (3, 12), (1, 7)])
def test_prefill_attention_is_causal_after_a_cached_prefix(n, length):
    heads, kv, d = 6, 2, 16
    q = torch.randn(n, heads, d)
    k, v = torch.randn(length, kv, d), torch.randn(length, kv, d)
    out = prefill_attention(q, k.transpose(0, 1), v.transpose(0, 1), SCALE)
    torch.testing.assert_close(out, naive(q, k, v, causal_offset=length - n), atol=1e-5, rtol=1e-5)
