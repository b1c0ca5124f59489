"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, token masks."""

from __future__ import annotations

import torch

from parrot.service.engine.base import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.is_greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        # Any 64-bit seed, signed or not, as the unsigned value torch keeps (it maps negatives
        # the same way itself); the schemas refuse wider ones.
        gen.manual_seed(params.seed % 2**64)
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
    """Pick one token per row of ``logits``. Each row is sampled on its own: a row whose
    distribution is degenerate (no finite probability mass left) falls back to its greedy
    token, so one request's parameters can never fail the others in the batch."""
    out = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.is_greedy:
            continue
        # float32 division: temperatures down to limits.MIN_TEMPERATURE stay finite here.
        scores = logits[row].float() / p.temperature
        if p.top_k > 0 and p.top_k < scores.shape[0]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest head whose mass reaches top_p (the top token always stays, even
            # when top_p underflows float32 to 0).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            drop[0] = False
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        total = probs.sum()
        if not torch.isfinite(probs).all() or not total > 0:
            continue  # e.g. a row whose every token is masked: keep its argmax
        out[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out
