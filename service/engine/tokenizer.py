"""A served model's tokenizer and chat template, apart from the engine that runs the model.

The service builds every prompt as token ids with the ``ModelTokenizer`` of the model it
goes to, the same way for every backend: an engine process or an SGLang server needs no
tokenizing of its own, only the same vocabulary.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Inputs at least this long (in characters) are tokenized and rendered in a worker thread
# (the tokenizer releases the GIL), so the event loop keeps answering other requests: a
# 4 MiB text takes about 2 s. Shorter ones cost less than the thread hop.
OFF_LOOP_CHARS = 32_768
# Template text recurs in every call of a semantic function (a system prompt, instructions):
# encodings of texts up to this long are kept, this many of them, most recent first.
CACHED_TEXT_CHARS = 16_384
CACHED_TEXTS = 256


async def off_loop(chars: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when its input is ``chars`` long or more."""
    if chars < OFF_LOOP_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


class ModelTokenizer:
    """Text <-> token ids and chat rendering through a ``transformers`` tokenizer."""

    def __init__(self, hf_tokenizer: Any, model_name: str) -> None:
        self.hf = hf_tokenizer
        self.model_name = model_name
        self._cached_encode = functools.lru_cache(maxsize=CACHED_TEXTS)(self._encode)

    @classmethod
    def from_path(cls, path: str | Path, model_name: str) -> ModelTokenizer:
        """Load from a Hugging Face folder (``tokenizer.json`` and its config)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), model_name)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if len(text) <= CACHED_TEXT_CHARS:
            return list(self._cached_encode(text))
        return list(self._encode(text))

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids``, special tokens left out (as outputs are reported)."""
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def prompt_text(self, token_ids: list[int]) -> str:
        """Text of a prompt's ids with its special tokens kept (chat markers, BOS), for servers
        that take prompts as text only."""
        return self.hf.decode(token_ids, skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @cached_property
    def supports_tools(self) -> bool:
        """Whether the chat template renders tool definitions itself (it reads ``tools``)."""
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one, or a "tool_use" one
            return "tool_use" in template or "tools" in str(template.get("default", ""))
        return isinstance(template, str) and "tools" in template

    def render_chat_template(self, messages: list[dict[str, Any]], *,
                             tools: list[dict[str, Any]] | None = None,
                             add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` in the model's chat template, with the generation
        prompt appended (unless told not to), and ``tools`` (OpenAI function tools) passed to
        templates that render them; raises ``InvalidRequestError`` when the model has no chat
        template."""
        from parrot.service.engine.base import InvalidRequestError

        if not self.has_chat_template:
            raise InvalidRequestError(f"model {self.model_name!r} has no chat template")
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **extra)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat: the text tokenized whole, with no special tokens
        added beyond those the template writes (as ``transformers`` does)."""
        return self.encode(self.render_chat_template(messages, tools=tools,
                                                     add_generation_prompt=add_generation_prompt))

    @cached_property
    def prompt_prefix_ids(self) -> list[int]:
        """Special tokens a prompt starts with (e.g. BOS), if the model wants any."""
        return list(self.hf.encode("", add_special_tokens=True))

    @cached_property
    def vocab_size(self) -> int:
        return len(self.hf)
