"""Structural limits of one request, checked at the edge (a 400 or 413 naming the limit) before
any work is done, so no single request can exhaust the service's memory or CPU.

They live here, in the core, because the wire schemas (``parrot.schemas``) and the service's
OpenAI protocol both validate against them. Per-tenant quotas (sessions, tokens per minute)
are separate: see the service's tenancy settings.
"""

from __future__ import annotations

from typing import Final

# Seeds: OpenAI and vLLM clients send 64-bit values, signed or unsigned; torch's generator
# takes the same range (a negative seed is taken modulo 2**64, as torch itself does).
MIN_SEED: Final = -(2**63)
MAX_SEED: Final = 2**64 - 1

# A temperature below this samples as greedy decoding (as vLLM's _SAMPLING_EPS): dividing
# logits by anything smaller overflows float32 and the distribution is one-hot anyway.
MIN_TEMPERATURE: Final = 1e-5

# A session reaped after being idle this long at most, whatever its client asks for.
MAX_IDLE_TIMEOUT_S: Final = 24 * 3600.0
# How long a streamed graph submission waits for its fetches' values; what is not set by
# then is fetched with a poll (each poll a bounded wait too, so no proxy cuts it short).
MAX_WAIT_S: Final = 30.0

# One graph submission.
MAX_CALLS_PER_GRAPH: Final = 1000
MAX_VARIABLES_PER_GRAPH: Final = 4000
MAX_FETCHES_PER_GRAPH: Final = 4000
MAX_SEGMENTS_PER_CALL: Final = 1000  # template segments, or chat messages, or one message's parts
MAX_STOP_STRINGS: Final = 16

# What all of one session's submissions add up to.
MAX_CALLS_PER_SESSION: Final = 10_000
MAX_VARIABLES_PER_SESSION: Final = 40_000

# A variable's value, or one text segment, in characters (about 4 MiB of ASCII).
MAX_VALUE_CHARS: Final = 4 * 2**20

# Prompts in one /v1/completions request.
MAX_PROMPTS_PER_REQUEST: Final = 256

# A request body, in bytes: larger is a 413 before it is read further.
MAX_BODY_BYTES: Final = 8 * 2**20

# Sampling extras: alternatives reported per token (as vLLM's default max_logprobs), tokens in
# one logit_bias map, and choices (``n``) per prompt in one OpenAI request.
MAX_LOGPROBS: Final = 20
MAX_LOGIT_BIAS: Final = 1024
MAX_CHOICES: Final = 128
