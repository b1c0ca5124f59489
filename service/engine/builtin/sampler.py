"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, token masks."""

from __future__ import annotations

import torch

from parrot.service.engine.base import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.is_greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` with ``[rows[i], t]`` set to -inf wherever bit ``t`` of ``bitmask[i]``
    is clear (packed 32 tokens per int32, lowest bit first); other rows are unchanged."""
    bitmask = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :logits.shape[1]]
    index = torch.tensor(rows, device=logits.device)
    out = logits.clone()  # a copy, not in place: the model's logits may be an inference tensor
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out


def sample(
    logits: torch.Tensor,  # [R, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Pick one token per row of ``logits``."""
    out = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.is_greedy:
            continue
        scores = logits[row] / p.temperature
        if p.top_k > 0 and p.top_k < scores.shape[0]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest head whose mass reaches top_p (the top token always stays).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        out[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out
