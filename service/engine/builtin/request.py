"""State of one request inside the builtin engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from parrot.service.engine.base import FinishReason, Objective, SamplingParams, TokenLogprob
from parrot.service.engine.builtin.radix_cache import RadixNode

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from parrot.service.engine.builtin.sampler import TokenHistory


@dataclass(eq=False)
class Request:
    request_id: str
    token_ids: list[int]  # prompt, then each generated token
    num_prompt_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None
    objective: Objective = "latency"
    priority: int = 0
    group_id: str | None = None
    seq: int = 0  # arrival order
    group_seq: int = 0  # arrival order of the group's first request: keeps a group together
    # KV state: slots[i] holds token_ids[i]'s K/V for i < num_computed.
    slots: list[int] = field(default_factory=list)
    num_computed: int = 0
    # slots[:num_in_tree] belong to the radix cache, protected by locking ``node``.
    num_in_tree: int = 0
    node: RadixNode | None = None
    num_cached_tokens: int = -1  # prompt tokens reused from the cache, set at first admission
    finish_reason: FinishReason | None = None
    detokenizer: IncrementalDetokenizer | None = None
    grammar: LLMatcher | None = None  # set for a JSON-schema constrained request (see grammar.py)
    history: TokenHistory | None = None  # set when the sampling has penalties
    # Logprobs of tokens sampled but not yet sent, and the prompt's (sent with the first output).
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def queue_key(self) -> tuple[int, int, int, int]:
        """Waiting-queue order: priority, then latency before throughput, then group, then arrival."""
        return (-self.priority, self.objective != "latency", self.group_seq, self.seq)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_generated(self) -> int:
        """Output tokens so far, counting those generated before a resume (see
        ``SamplingParams.resumed_output_len``)."""
        return self.num_output_tokens + self.sampling.resumed_output_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, and finds stop strings.

    Decodes a small window around the newest tokens so cost per token stays
    constant, and holds back text that could still be the start of a stop string,
    so streamed text always equals the final text.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all text so far (cut at a stop string once found)
        self.num_sent = 0  # characters of ``text`` already emitted
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, ids: list[int], find_stop: bool = True) -> bool:
        """Account for the newest token of ``ids``; return True if a stop string appeared (looked
        for only with ``find_stop``: a stop string completed earlier is never found later)."""
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        prefix = decode(ids[self._prefix_offset:self._read_offset])
        full = decode(ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for more tokens
        delta = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        for s in self.stop if find_stop else ():
            pos = self.text.find(s, start)
            if pos != -1:
                self.text = self.text[:pos]
                return True
        return False

    def take(self, final: bool) -> str:
        """Text not emitted yet; while unfinished, keep back a possible stop-string start."""
        end = len(self.text) if final or not self.stop else max(self.num_sent, len(self.text) - self.holdback)
        out = self.text[self.num_sent:end]
        self.num_sent = end
        return out
