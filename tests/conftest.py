"""Shared fixtures: tiny random-weight llama models that use the default model's tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from parrot.service.engine.builtin import loader
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model converted from its shipped GGUF (once per machine, then cached)."""
    return loader.resolve_model(None)[1]


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return loader.load_tokenizer(default_model_dir)


def make_tiny_model(vocab_size: int, *, num_kv_heads: int = 2, arch: str = "llama", seed: int = 0):
    """A 2-layer model with random weights. Large init keeps next-token distributions peaked,
    so greedy decoding has clear winners and backends can be compared token for token."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=2048,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.eval()


@pytest.fixture
def tiny_engine_factory(tokenizer):
    """Build a BuiltinEngine on a tiny model; returns (engine, hf_model)."""

    def build(num_kv_heads: int = 2, arch: str = "llama", **config) -> tuple[BuiltinEngine, object]:
        hf = make_tiny_model(len(tokenizer), num_kv_heads=num_kv_heads, arch=arch)
        cfg = BuiltinEngineConfig(device="cpu", **{"kv_cache_gib": 0.05, **config})
        return BuiltinEngine(cfg, hf_model=hf, tokenizer=tokenizer, model_name="tiny-llama"), hf

    return build
