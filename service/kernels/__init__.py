"""Attention kernels: torch references (and Triton versions for GPU)."""
