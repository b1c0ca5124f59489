"""Semantic Kernel integration."""
