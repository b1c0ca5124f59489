"""The builtin engine: an embedded torch runner for llama-family models."""
