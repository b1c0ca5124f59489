"""JSON-schema constrained decoding, through ``llguidance``.

A constrained request owns an ``LLMatcher``: before each of its tokens is sampled the
matcher writes a packed bitmask of the tokens the schema allows next (one bit per token,
32 per int32), the sampler sets every other logit to -inf, and the sampled token
advances the matcher. EOS is allowed once the JSON is complete; when nothing else can
follow, the request ends without spending a step on EOS. Unconstrained requests never
touch any of this.

Schemas compile once each (keyed by their canonical JSON) into a matcher kept as a
template; a request gets a cheap copy of it. Compiling and copying run in a worker
thread before the request is queued, so a bad schema is rejected up front and the event
loop never waits; the runner thread only computes masks and advances matchers.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from parrot.service.engine.base import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact, fixed separators (as ``json.dumps`` writes them) instead of free whitespace: a
# small model cannot wander into endless blank lines, and outputs are deterministic. A
# schema may still ask for other settings through llguidance's "x-guidance" keyword.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
}
DEFAULT_CACHE_SIZE = 256


def matcher_error(matcher: llguidance.LLMatcher) -> str:
    """A matcher's error without the parser-state dump that may follow it."""
    return matcher.get_error().split("\n<state>")[0].strip()


def schema_key(schema: dict[str, Any]) -> str:
    """One string per distinct schema, whatever its key order."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


class JsonSchemaGrammars:
    """Compiled schemas of one tokenizer, and the per-request matchers made from them."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int], *,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._hf_tokenizer = tokenizer
        # The model's logits may be wider than the tokenizer (padded embeddings); those
        # extra ids are never allowed.
        self.vocab_size = max(vocab_size, len(tokenizer))
        self._eos_token_ids = sorted(eos_token_ids)
        self._cache_size = cache_size
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self.num_compiled = 0

    def _tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (about a second for a large vocabulary), never per request.
        if self._ll_tokenizer is None:
            try:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids)
            except ValueError as exc:  # e.g. a slow (pure Python) tokenizer
                raise InvalidRequestError(f"this model's tokenizer cannot constrain output: {exc}") from exc
            self._executor = llguidance.LLExecutor()
        return self._ll_tokenizer

    def compile(self, schema: dict[str, Any]) -> llguidance.LLMatcher:
        """The template matcher of ``schema``, compiled on first use; raises
        ``InvalidRequestError`` naming what is wrong with a schema that cannot be used."""
        key = schema_key(schema)
        # One compile at a time, so concurrent requests with a new schema compile it once.
        # Only worker threads wait here: the runner thread never takes this lock.
        with self._lock:
            template = self._templates.get(key)
            if template is not None:
                self._templates.move_to_end(key)
                return template
            tokenizer = self._tokenizer()
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except ValueError as exc:
                raise InvalidRequestError(f"the JSON schema is invalid: {exc}") from exc
            # Compiling happens here (it releases the GIL); errors leave the matcher in an error state.
            template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if template.is_error():
                raise InvalidRequestError(f"the JSON schema is invalid: {matcher_error(template)}")
            self._templates[key] = template
            self.num_compiled += 1
            while len(self._templates) > self._cache_size:
                self._templates.popitem(last=False)
            return template

    def matcher(self, schema: dict[str, Any], output_so_far: list[int]) -> llguidance.LLMatcher:
        """A fresh matcher for one request, advanced past ``output_so_far`` (the output a
        resumed generation already has); raises ``InvalidRequestError`` if that output does
        not fit the schema."""
        matcher = self.compile(schema).deep_copy()
        if output_so_far and not matcher.consume_tokens(output_so_far):
            raise InvalidRequestError(
                f"the output being resumed does not match the JSON schema: {matcher_error(matcher)}")
        return matcher

    def fill_bitmask(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """Packed masks of the tokens each matcher allows next: int32 ``[len(matchers), V/32]``."""
        bitmask = allocate_token_bitmask(len(matchers), self.vocab_size)
        assert self._executor is not None  # a matcher exists, so the tokenizer was built
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return torch.from_numpy(bitmask)
