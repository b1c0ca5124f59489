"""Attention over a paged KV pool (torch reference implementations).

The pool stores one row per token slot: ``k_pool[slot] -> [num_kv_heads, head_dim]``.
A request's keys are the rows named by its slot list, in token order, so a
request's KV need not be contiguous and a cached prefix is shared by reference.

Shapes: ``H`` query heads, ``KV`` key/value heads (``H % KV == 0``, GQA), ``D`` head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D], one query token per request
    k_pool: torch.Tensor,  # [S, KV, D]
    v_pool: torch.Tensor,  # [S, KV, D]
    slot_table: torch.Tensor,  # [B, L] int64, row b's first lengths[b] entries are valid
    key_mask: torch.Tensor | None,  # [B, 1, 1, L] bool, True where a key is valid; None = all
    scale: float,
) -> torch.Tensor:
    """Each request's query attends to its own keys: gather, then one batched SDPA."""
    b, length = slot_table.shape
    num_kv, d = k_pool.shape[1], k_pool.shape[2]
    flat = slot_table.reshape(-1)
    # Gathering whole rows of a 2-D view is several times faster than of the 3-D pool.
    k = k_pool.view(-1, num_kv * d).index_select(0, flat).view(b, length, num_kv, d).transpose(1, 2)
    v = v_pool.view(-1, num_kv * d).index_select(0, flat).view(b, length, num_kv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=key_mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)  # [B, H, D]


def prefill_attention(
    q: torch.Tensor,  # [N, H, D], the new tokens of one request
    k: torch.Tensor,  # [L, KV, D], all of the request's keys (cached prefix + new), L >= N
    v: torch.Tensor,  # [L, KV, D]
    scale: float,
) -> torch.Tensor:
    """Causal attention of N new tokens that sit at the end of L keys."""
    n, length = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if n == length:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query i sits at position (L - N + i) and sees keys 0..L-N+i.
        offset = length - n
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril_(offset)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)  # [N, H, D]
