"""Triton kernels behind ``triton_attention`` (imported lazily: it imports triton).

``TRITON_INTERPRET`` is read when ``@triton.jit`` runs, i.e. when this module is
imported; ``triton_attention`` reloads it if that differs from triton's own mode.

Both kernels work in log2 units (``exp2``, scores pre-multiplied by ``scale * log2 e``)
and keep the running max finite (``NEG`` instead of ``-inf``), so a state that has
seen no key yet merges like any other: its weight becomes ``exp2(NEG - m) = 0`` as
soon as a real score arrives.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # scores are passed pre-scaled by this
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _attend_block(q, k_base, v_base, slots, n_ok, d, d_ok, stride_ks, stride_vs, qk_scale,
                  m, l_sum, acc, PRECISION: tl.constexpr):
    """One online-softmax step: fold the keys at ``slots`` (where ``n_ok``) into (m, l_sum, acc)."""
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + slots[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def prefix_partial_kernel(
    q_ptr, k_ptr, v_ptr,
    prefix_slots_ptr,  # [sum P] int64, the groups' prefix slots back to back
    prefix_start_ptr, prefix_len_ptr,  # [num groups] int32
    blk_group_ptr, blk_row0_ptr, blk_row_end_ptr,  # [num blocks] int32, rows in b * G + g units
    o_part_ptr, lse_part_ptr,  # [splits, B, H, D] f32, [splits, B, H] f32
    split_len,  # keys per split (a multiple of BLOCK_N)
    stride_qb, stride_qh,
    stride_kh, stride_ks, stride_vh, stride_vs,
    stride_os, stride_ob, stride_oh, stride_ls, stride_lb,
    qk_scale,  # scale * log2(e)
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: a block of one group's query rows x one KV head x one split of its prefix."""
    kv = tl.program_id(0)
    blk = tl.program_id(1)
    split = tl.program_id(2)
    group = tl.load(blk_group_ptr + blk)
    row0 = tl.load(blk_row0_ptr + blk)
    row_end = tl.load(blk_row_end_ptr + blk)
    p_start = tl.load(prefix_start_ptr + group).to(tl.int64)
    p_len = tl.load(prefix_len_ptr + group)

    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    b = (rows // G).to(tl.int64)
    head = kv * G + rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m = tl.full([BLOCK_M], NEG, tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + kv.to(tl.int64) * stride_kh
    v_base = v_ptr + kv.to(tl.int64) * stride_vh
    lo = split * split_len
    hi = tl.minimum(lo + split_len, p_len)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        slots = tl.load(prefix_slots_ptr + p_start + n, mask=n_ok, other=0)
        m, l_sum, acc = _attend_block(q, k_base, v_base, slots, n_ok, d, d_ok, stride_ks, stride_vs,
                                      qk_scale, m, l_sum, acc, PRECISION)

    # An empty split (prefix shorter than the splits) writes lse = -inf, weight 0.
    seen = l_sum > 0
    l_safe = tl.where(seen, l_sum, 1.0)
    lse = tl.where(seen, (m + tl.log2(l_safe)) / LOG2E, float("-inf"))
    out = acc / l_safe[:, None]
    tl.store(o_part_ptr + split * stride_os + b[:, None] * stride_ob + head[:, None] * stride_oh
             + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_part_ptr + split * stride_ls + b * stride_lb + head, lse, mask=row_ok)


@triton.jit
def decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    table_ptr,  # [B, W] int64 slots: each row's keys (after its prefix, if it has one)
    lengths_ptr,  # [B] int32 valid entries per table row
    row_splits_ptr,  # [B] int32 prefix partials to merge first (0: a plain row)
    o_part_ptr, lse_part_ptr,  # prefix partials from prefix_partial_kernel (unused if no row has any)
    stride_qb, stride_qh, stride_tb,
    stride_kh, stride_ks, stride_vh, stride_vs,
    stride_outb, stride_outh,
    stride_os, stride_ob, stride_oh, stride_ls, stride_lb,
    qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: one request x one KV head, its G query heads as the rows of a tile.

    The online softmax starts from the request's prefix partials (if any) and goes on
    over its own keys, so the two-phase merge costs nothing extra.
    """
    b = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    head = kv * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_mask = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)

    m = tl.full([G_PAD], NEG, tl.float32)
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    num_splits = tl.load(row_splits_ptr + b)
    for split in range(0, num_splits):
        lse = tl.load(lse_part_ptr + split * stride_ls + b * stride_lb + head, mask=g_ok,
                      other=float("-inf")) * LOG2E
        o = tl.load(o_part_ptr + split * stride_os + b * stride_ob + head[:, None] * stride_oh
                    + d[None, :], mask=q_mask, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        l_sum = l_sum * alpha + w
        acc = acc * alpha[:, None] + o * w[:, None]
        m = m_new

    length = tl.load(lengths_ptr + b)
    k_base = k_ptr + kv.to(tl.int64) * stride_kh
    v_base = v_ptr + kv.to(tl.int64) * stride_vh
    for n0 in range(0, length, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < length
        slots = tl.load(table_ptr + b * stride_tb + n, mask=n_ok, other=0)
        m, l_sum, acc = _attend_block(q, k_base, v_base, slots, n_ok, d, d_ok, stride_ks, stride_vs,
                                      qk_scale, m, l_sum, acc, PRECISION)

    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + b * stride_outb + head[:, None] * stride_outh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)
