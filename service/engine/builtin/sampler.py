"""Token sampling over a batch of rows, one row per request:

    raw logits ──► penalties, logit bias, min_tokens ──► grammar mask (engine) ──► processed
    processed ──► logprobs (when asked)
    processed ──► temperature, top-k, top-p ──► one token per row (its own seeded generator)

Penalties, bias, min_tokens and logprobs run on the whole batch at once, on only the rows that
need them, and are skipped entirely when no row does, so requests without them pay nothing.
Drawing a token is per row (see ``sample``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from parrot.service.engine.base import SamplingParams, TokenLogprob


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


class TokenHistory:
    """What the penalties of one request look at, kept up to date token by token so a step
    never rescans the sequence: each token's count in the output, and which tokens occur in
    the prompt or the output."""

    def __init__(self, vocab_size: int, prompt_ids: Sequence[int], output_ids: Sequence[int],
                 device: torch.device) -> None:
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt_ids:
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        for token in output_ids:
            self.add(token)

    def add(self, token: int) -> None:
        self.counts[token] += 1
        self.seen[token] = True


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


def apply_penalties(
    logits: torch.Tensor,  # [R, V] float32
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory | None],
    num_generated: Sequence[int],
    end_ids: Sequence[Collection[int]],
) -> torch.Tensor:
    """``logits`` with each row's penalties, logit bias and ``min_tokens`` applied (a copy, or
    ``logits`` itself when no row has any).

    ``histories[i]`` is needed where ``params[i].has_penalties``; ``num_generated[i]`` is how
    many tokens row ``i``'s output has; ``end_ids[i]`` the tokens that would end it (EOS and
    stop tokens), masked while ``num_generated[i] < params[i].min_tokens``.
    """
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    held = [i for i, p in enumerate(params) if num_generated[i] < p.min_tokens and end_ids[i]]
    if not (penalized or biased or held):
        return logits
    out = logits.clone()  # the model's logits may be an inference tensor: never in place
    device = out.device
    if penalized:
        index = torch.tensor(penalized, device=device)
        rows = out[index]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=rows.dtype, device=device).unsqueeze(1)

        chosen = [params[i] for i in penalized]
        tracked = [histories[i] for i in penalized]
        if any(h is None for h in tracked):
            raise ValueError("a request with penalties has no token history")
        # Each kind only where some row uses it.
        if any(p.repetition_penalty != 1.0 for p in chosen):
            seen = torch.stack([h.seen for h in tracked if h is not None])
            rep = column([p.repetition_penalty for p in chosen])
            rows = torch.where(seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
        if any(p.frequency_penalty or p.presence_penalty for p in chosen):
            counts = torch.stack([h.counts for h in tracked if h is not None])
            if any(p.frequency_penalty for p in chosen):
                rows = rows - column([p.frequency_penalty for p in chosen]) * counts
            if any(p.presence_penalty for p in chosen):
                rows = rows - column([p.presence_penalty for p in chosen]) * (counts > 0).to(rows.dtype)
        out[index] = rows
    if biased:
        pairs = [(i, t, b) for i in biased for t, b in params[i].logit_bias.items()]
        rows_i = torch.tensor([r for r, _, _ in pairs], device=device)
        tokens = torch.tensor([t for _, t, _ in pairs], device=device)
        out.index_put_((rows_i, tokens), torch.tensor([b for _, _, b in pairs], dtype=out.dtype,
                                                      device=device), accumulate=True)
    if held:
        pairs_h = [(i, t) for i in held for t in end_ids[i]]
        out[torch.tensor([r for r, _ in pairs_h], device=device),
            torch.tensor([t for _, t in pairs_h], device=device)] = float("-inf")
    return out


def token_logprobs(
    logits: torch.Tensor,  # [R, V] float32, processed
    rows: Sequence[int],
    num_top: Sequence[int],
    tokens: Sequence[int],
) -> list[TokenLogprob]:
    """For each of ``rows``: the log-softmax of its logits at ``tokens[i]`` and its ``num_top[i]``
    most likely tokens, in one pass over those rows."""
    if not rows:
        return []
    index = torch.tensor(list(rows), device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(list(tokens), device=logits.device).unsqueeze(1))
    chosen_list = chosen.squeeze(1).tolist()
    k = max(num_top)
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if k > 0:
        values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(int(tokens[i]), float(chosen_list[i]),
                     list(zip(top_ids[i][:num_top[i]], top_values[i][:num_top[i]], strict=True)))
        for i in range(len(rows))
    ]


# Top-p looks for its nucleus among this many most likely tokens first, and sorts the whole
# vocabulary only for a row whose nucleus is larger (a very flat distribution).
TOP_P_HEAD = 1024


def sample(
    logits: torch.Tensor,  # [R, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Pick one token per row of ``logits``: greedy rows take their argmax (one op for the
    batch); the others are scaled, filtered (top-k, top-p) and drawn from with their own
    generator. A row whose distribution is degenerate (no finite probability mass left) falls
    back to its greedy token, so one request's parameters can never fail the others.

    The sampled rows' reductions (softmax, cumulative sums, the draw) run row by row on
    purpose: a batched softmax or cumsum rounds differently with the batch's shape, and a
    seeded request must draw the same tokens whatever shares its batch."""
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
            probs = _top_p(probs, p.top_p, p.top_k)
        total = probs.sum()
        if not torch.isfinite(probs).all() or not total > 0:
            continue  # e.g. a row whose every token is masked: keep its argmax
        out[row] = _draw(probs, gen)
    return out


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` (one row, non-negative, finite, not all zero): the first whose
    cumulative sum passes a uniform draw scaled to the row's total. One random number per token;
    ``torch.multinomial`` costs 0.8 ms a row over a 49k vocabulary on CPU, this 0.05 ms. The sum
    is in float64, so no token's share is lost to rounding. A zero-probability token is never
    drawn: the cumulative sum does not pass anything at it."""
    cumulative = probs.to(torch.float64).cumsum(0)
    point = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, point, right=True))
    if index < probs.shape[0]:
        return index
    return int(probs.nonzero()[-1])  # the draw rounded up to the total: the last possible token


def _top_p(probs: torch.Tensor, top_p: float, top_k: int = 0) -> torch.Tensor:
    """``probs`` (one row, summing to 1) cut to the smallest head whose mass reaches ``top_p``;
    the most likely token always stays, even when ``top_p`` underflows float32 to 0. The head
    is looked for among the ``TOP_P_HEAD`` (or ``top_k``) most likely tokens, a partial sort,
    before sorting the whole row."""
    vocab = probs.shape[0]
    head = min(vocab, max(TOP_P_HEAD, top_k))
    while True:
        if head < vocab:
            values, order = probs.topk(head)  # sorted, most likely first
        else:
            values, order = probs.sort(descending=True)
        drop = values.cumsum(0) - values >= top_p
        drop[0] = False
        if head == vocab or drop[-1]:  # the nucleus ends inside the head
            return torch.zeros_like(probs).scatter_(0, order, values.masked_fill(drop, 0.0))
        head = vocab
