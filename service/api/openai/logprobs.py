"""Engine logprobs (token ids and floats) in the OpenAI API's two shapes.

Chat: ``choices[i].logprobs.content`` is a list of ``{token, logprob, bytes, top_logprobs}``.
Completions: ``choices[i].logprobs`` is ``{tokens, token_logprobs, top_logprobs, text_offset}``
(legacy, keyed by token text), with the prompt's tokens first when ``echo`` is set.

A token's text is its own decoding, which for a byte-level tokenizer may be part of a
character (shown as U+FFFD); ``bytes`` then holds its real bytes, so a client can join them.
Log probabilities of masked tokens (-inf) are sent as -9999.0, as OpenAI and vLLM do, since
JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from parrot.service.api.openai.protocol import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)
from parrot.service.engine.base import TokenLogprob
from parrot.service.engine.tokenizer import ModelTokenizer

MIN_LOGPROB = -9999.0



def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte: printable bytes stand for themselves, the
    others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF_CHAR = _byte_level_alphabet()


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class TokenStrings:
    """Each token's text and bytes for one tokenizer, remembered as they are asked for."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self.hf = tokenizer.hf
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.hf.decode([token_id], skip_special_tokens=False)
        return text

    def bytes(self, token_id: int) -> list[int]:
        out = self._bytes.get(token_id)
        if out is None:
            out = self._bytes[token_id] = self._raw_bytes(token_id)
        return out

    def _raw_bytes(self, token_id: int) -> list[int]:
        piece = self.hf.convert_ids_to_tokens(token_id)
        text = self.text(token_id)
        if isinstance(piece, str) and "\ufffd" in text:
            if all(c in _BYTE_OF_CHAR for c in piece):  # byte-level BPE (GPT-2, llama 3, SmolLM)
                return [_BYTE_OF_CHAR[c] for c in piece]
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # sentencepiece
                return [int(piece[3:5], 16)]
        return list(text.encode("utf-8"))


def chat_logprobs(strings: TokenStrings, entries: Sequence[TokenLogprob]) -> ChatChoiceLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=strings.text(token_id), logprob=_finite(logprob),
                          bytes=strings.bytes(token_id))

    return ChatChoiceLogprobs(content=[
        ChatTokenLogprob(token=strings.text(e.token_id), logprob=_finite(e.logprob),
                         bytes=strings.bytes(e.token_id),
                         top_logprobs=[top(t, lp) for t, lp in e.top])
        for e in entries
    ])


class CompletionLogprobsBuilder:
    """Builds a completion choice's logprobs piece by piece (streamed or whole), keeping the
    character offset of the next token in the choice's text."""

    def __init__(self, strings: TokenStrings, num_top: int) -> None:
        self.strings = strings
        self.num_top = num_top
        self.offset = 0

    def build(self, entries: Sequence[TokenLogprob | None], token_ids: Sequence[int]) -> CompletionLogprobs:
        """``entries[i]`` is the logprob of ``token_ids[i]``, or None where there is none (the
        first prompt token)."""
        out = CompletionLogprobs()
        for entry, token_id in zip(entries, token_ids, strict=True):
            text = self.strings.text(token_id)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(entry.logprob))
            # As in OpenAI's API, the sampled token is listed too (up to num_top + 1 entries).
            top = {self.strings.text(t): _finite(lp) for t, lp in entry.top[:self.num_top]}
            top.setdefault(text, _finite(entry.logprob))
            out.top_logprobs.append(top)
        return out
