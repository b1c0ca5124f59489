"""Kernel plugins the Semantic Kernel tests call."""

from __future__ import annotations

from semantic_kernel.functions import kernel_function


class MagicPlugin:
    """A function a model can only get right by calling it; it records what it was called with."""

    def __init__(self) -> None:
        self.inputs: list[int] = []

    @kernel_function(description="Apply a magic function to an input.")
    def magic_function(self, input: int) -> int:
        self.inputs.append(input)
        return input + 2
