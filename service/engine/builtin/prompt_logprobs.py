"""Log probabilities of a prompt's tokens, for a request whose prompt KV is already computed.

A step computes logits only for the rows that sample, and a prompt served from the prefix
cache is not run at all, so a request that asks for its prompt's logprobs (an OpenAI
completion with ``echo`` and ``logprobs``) gets them by running its prompt once more,
after its prefill, in chunks: each chunk's queries attend to the request's own cached K/V,
and the K/V the pass writes go to one scratch slot nobody reads, so the cache, and every
request sharing it, is left exactly as it was.

    prompt     t0   t1   t2  ...  t(P-1)
    logits     l0   l1   l2  ...             l(i) is the distribution of t(i+1)
    logprobs   None lp1  lp2 ... lp(P-1)
"""

from __future__ import annotations

import torch

from parrot.service.engine.base import TokenLogprob
from parrot.service.engine.builtin.model import ForwardBatch, LlamaRunner
from parrot.service.engine.builtin.sampler import token_logprobs

CHUNK_TOKENS = 256  # bounds the [chunk, vocab] logits held at once


def prompt_logprobs(runner: LlamaRunner, token_ids: list[int], slots: list[int], scratch_slot: int,
                    num_top: int, chunk_tokens: int = CHUNK_TOKENS) -> list[TokenLogprob | None]:
    """The logprob of each of ``token_ids`` given the ones before it (None for the first), with
    its ``num_top`` most likely alternatives; ``slots[i]`` holds token ``i``'s K/V."""
    device = runner.device
    out: list[TokenLogprob | None] = [None]
    num_rows = len(token_ids) - 1  # the last position predicts the output, not the prompt
    for start in range(0, num_rows, chunk_tokens):
        end = min(start + chunk_tokens, num_rows)
        n = end - start

        def as_tensor(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=device)

        batch = ForwardBatch(
            input_ids=as_tensor(token_ids[start:end]),
            positions=as_tensor(list(range(start, end))),
            out_slots=as_tensor([scratch_slot] * n),
            prefills=[(0, n, as_tensor(slots[:end]))],
            logit_rows=None,
        )
        logits = runner.forward(batch)
        out.extend(token_logprobs(logits, range(n), [num_top] * n, token_ids[start + 1:end + 1]))
    return out
