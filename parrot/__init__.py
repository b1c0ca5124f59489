"""Parrot: serving LLM applications with semantic variables.

The native SDK is re-exported here, so programs read ``import parrot as P``::

    @P.semantic_function()
    def write_code(task: P.Input, code: P.Output):
        \"\"\"Write python code of {{input:task}}. Code: {{output:code}}\"\"\"

    with P.Parrot("http://127.0.0.1:9000") as vm:   # P.Parrot(): an embedded service
        print(write_code("a snake game").get(perf=P.LATENCY))
"""

from parrot.chat_call import chat
from parrot.errors import ParrotError, ParrotTimeoutError
from parrot.schemas import Criterion, SamplingConfig
from parrot.sdk import (
    LATENCY,
    THROUGHPUT,
    TTFT,
    Input,
    NativeFunction,
    Output,
    SemanticFunction,
    native_function,
    semantic_function,
)
from parrot.template import TemplateError
from parrot.variable import SemanticVariable
from parrot.vm import Parrot, current_vm

__version__ = "0.1.0"

__all__ = [
    "LATENCY", "THROUGHPUT", "TTFT", "Criterion", "Input", "NativeFunction", "Output", "Parrot",
    "ParrotError", "ParrotTimeoutError", "SamplingConfig", "SemanticFunction", "SemanticVariable",
    "TemplateError", "chat", "current_vm", "native_function", "semantic_function",
]
