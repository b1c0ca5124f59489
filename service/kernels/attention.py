"""Attention over a paged KV pool (torch implementations; the reference for faster kernels).

The pool is head-major, one column per token slot: ``k_pool[:, slot] -> [KV, D]``, so
gathering a request's slots gives a contiguous ``[L, D]`` block per head. A
request's keys are the columns named by its slot list, in token order: its KV need
not be contiguous, and a cached prefix is shared by reference.

Shapes: ``H`` query heads, ``KV`` key/value heads (``H = KV * G``, GQA), ``D`` head dim.
In decode every query is a single token, so the ``G`` query heads of a KV head are
folded into the query-length axis: exact, and no K/V head is ever repeated.

Shared-prefix (two-phase) decode: for a group of requests whose keys start with the
same prefix slots, all ``B * G`` queries of a KV head attend to the prefix in one
matrix product (the prefix KV is read once, not ``B`` times), each request attends
to its own suffix, and the two partial results merge by their log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Gather this many requests' KV at a time in plain decode: small enough to stay in
# cache between the gather and the attention that reads it.
DECODE_CHUNK = 8


def additive_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, 1, width]`` mask: 0 where key ``j < lengths[b]``, ``-inf`` elsewhere."""
    valid = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    mask = torch.zeros(valid.shape, dtype=dtype, device=lengths.device)
    return mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]


def attention_with_lse(
    q: torch.Tensor,  # [N, KV, M, D]
    k: torch.Tensor,  # [N, KV, L, D]
    v: torch.Tensor,  # [N, KV, L, D]
    mask: torch.Tensor | None,  # additive, broadcastable to [N, KV, M, L]
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention that also returns the log-sum-exp of each query's scores."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    lse = scores.logsumexp(-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype)


def _gather(pool: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[KV, n, D]`` columns of ``pool`` named by the flat ``slots``."""
    return torch.index_select(pool, 1, slots, out=out) if out is not None else pool.index_select(1, slots)


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D], one query token per request
    k_pool: torch.Tensor,  # [KV, S, D]
    v_pool: torch.Tensor,  # [KV, S, D]
    slot_table: torch.Tensor,  # [B, L] int64; row b's first lengths[b] entries are valid
    mask: torch.Tensor | None,  # [B, 1, 1, L] additive (see ``additive_mask``); None = all valid
    scale: float,
) -> torch.Tensor:
    """Each request's query attends to its own keys (the plain, per-request path)."""
    b, length = slot_table.shape
    num_kv, d = k_pool.shape[0], k_pool.shape[2]
    qf = q.view(b, num_kv, -1, d)
    if b == 1:  # batch-1 decode: gather straight into the attention, no chunk buffers
        flat = slot_table.view(-1)
        k = _gather(k_pool, flat).unsqueeze(0)
        v = _gather(v_pool, flat).unsqueeze(0)
        return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale).view(1, -1, d)
    chunk = min(DECODE_CHUNK, b)
    k_buf = q.new_empty(num_kv, chunk * length, d)
    v_buf = q.new_empty(num_kv, chunk * length, d)
    outs = []
    for s in range(0, b, chunk):
        n = min(chunk, b - s)
        flat = slot_table[s:s + n].reshape(-1)
        k = _gather(k_pool, flat, k_buf[:, : n * length]).view(num_kv, n, length, d).transpose(0, 1)
        v = _gather(v_pool, flat, v_buf[:, : n * length]).view(num_kv, n, length, d).transpose(0, 1)
        m = None if mask is None else mask[s:s + n]
        outs.append(F.scaled_dot_product_attention(qf[s:s + n], k, v, attn_mask=m, scale=scale))
    return torch.cat(outs).view(b, -1, d)


def contiguous_decode_attention(
    q: torch.Tensor,  # [1, H, D], one request's query token
    k: torch.Tensor,  # [KV, L, D], its keys in place (a slice of the pool)
    v: torch.Tensor,  # [KV, L, D]
    scale: float,
) -> torch.Tensor:
    """One request whose keys are consecutive pool slots: attention over a view, no gather."""
    num_kv, d = k.shape[0], k.shape[2]
    out = F.scaled_dot_product_attention(q.view(1, num_kv, -1, d), k.unsqueeze(0), v.unsqueeze(0),
                                         scale=scale)
    return out.view(1, -1, d)


def shared_prefix_decode_attention(
    q: torch.Tensor,  # [B, H, D], one query token per request; all B share the prefix
    k_pool: torch.Tensor,  # [KV, S, D]
    v_pool: torch.Tensor,  # [KV, S, D]
    prefix_slots: torch.Tensor,  # [P] slots of the shared prefix
    suffix_table: torch.Tensor,  # [B, Ls] each request's keys after the prefix (padded)
    suffix_mask: torch.Tensor | None,  # [B, 1, 1, Ls] additive; None = all valid
    scale: float,
) -> torch.Tensor:
    """Two-phase attention for one prefix group: prefix once for all, suffixes per request."""
    b = q.shape[0]
    num_kv, d = k_pool.shape[0], k_pool.shape[2]
    # Phase 1: queries [1, KV, B*G, D] against the prefix [1, KV, P, D], read once.
    qp = q.view(b, num_kv, -1, d).transpose(0, 1).reshape(1, num_kv, -1, d)
    kp = _gather(k_pool, prefix_slots).unsqueeze(0)
    vp = _gather(v_pool, prefix_slots).unsqueeze(0)
    out_p, lse_p = attention_with_lse(qp, kp, vp, None, scale)
    out_p = out_p.view(num_kv, b, -1, d).transpose(0, 1)  # [B, KV, G, D]
    lse_p = lse_p.view(num_kv, b, -1).transpose(0, 1)
    # Phase 2: each request against its own suffix (at least its newest token).
    ls = suffix_table.shape[1]
    flat = suffix_table.reshape(-1)
    ks = _gather(k_pool, flat).view(num_kv, b, ls, d).transpose(0, 1)
    vs = _gather(v_pool, flat).view(num_kv, b, ls, d).transpose(0, 1)
    out_s, lse_s = attention_with_lse(q.view(b, num_kv, -1, d), ks, vs, suffix_mask, scale)
    return merge_partials(out_p, lse_p, out_s, lse_s).reshape(b, -1, d)


def prefill_attention(
    q: torch.Tensor,  # [N, H, D], the new tokens of one request
    k: torch.Tensor,  # [KV, L, D], all of the request's keys (cached prefix + new), L >= N
    v: torch.Tensor,  # [KV, L, D]
    scale: float,
) -> torch.Tensor:
    """Causal attention of N new tokens that sit at the end of L keys."""
    n, length = q.shape[0], k.shape[1]
    qh = q.transpose(0, 1)
    if n == length:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query i sits at position (L - N + i) and sees keys 0..L-N+i.
        allowed = torch.ones(n, length, dtype=torch.bool, device=q.device).tril_(length - n)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)  # [N, H, D]
