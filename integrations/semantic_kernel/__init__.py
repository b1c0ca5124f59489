"""Semantic Kernel connectors for Parrot: chat and text completion served through Parrot's native
API (semantic calls and variables), with function calling and structured output by the
service's constrained decoding.

    from semantic_kernel import Kernel
    from parrot.integrations.semantic_kernel import ParrotChatCompletion

    kernel = Kernel()
    kernel.add_service(ParrotChatCompletion(base_url="http://127.0.0.1:8000"))  # or () for embedded

Settings are ``ParrotPromptExecutionSettings`` (SK's generic settings are converted).
``enable_graphs(kernel)`` serves prompt functions with nested calls as one graph (see
``graphs.py``).
"""

from parrot.integrations.semantic_kernel.chat_completion import ParrotChatCompletion
from parrot.integrations.semantic_kernel.graphs import enable_graphs
from parrot.integrations.semantic_kernel.settings import ParrotPromptExecutionSettings
from parrot.integrations.semantic_kernel.text_completion import ParrotTextCompletion

__all__ = ["ParrotChatCompletion", "ParrotPromptExecutionSettings", "ParrotTextCompletion", "enable_graphs"]
