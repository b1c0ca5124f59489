"""Integrations of Parrot with LLM application frameworks."""
