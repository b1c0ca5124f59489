"""Text <-> token ids through a ``transformers`` tokenizer, the same way for every engine."""

from __future__ import annotations

from typing import Any

from parrot.service.engine.base import InvalidRequestError


class HFTokenization:
    """``Engine`` tokenization methods for engines that hold a Hugging Face tokenizer."""

    tokenizer: Any
    model_name: str

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def render_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(f"model {self.model_name!r} has no chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def prompt_prefix_ids(self) -> list[int]:
        return list(self.tokenizer.encode("", add_special_tokens=True))
