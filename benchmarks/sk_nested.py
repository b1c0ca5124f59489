"""Semantic Kernel nested prompt functions: SK's own sequential run against Parrot graphs.

A plugin's ``assess`` prompt function calls ``summarize`` once per section from its
template, then asks for an overall assessment. The same kernel code runs with SK's
``OpenAIChatCompletion`` on the service's OpenAI routes (SK renders the nested calls one
after another, each waiting for its reply) and with ``ParrotChatCompletion`` and
``enable_graphs`` (the nested calls and the assessment reach the service as one graph; the
summaries run in parallel); each on a fresh service, greedy, and the script checks that
both write the same text.

    python -m benchmarks.sk_nested            # 6 sections
    python -m benchmarks.sk_nested --quick
"""

from __future__ import annotations

import argparse
import asyncio
import time

from openai import AsyncOpenAI
from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.chat_completion_client_base import ChatCompletionClientBase
from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.functions import KernelArguments, KernelFunctionFromPrompt

from benchmarks.harness import (
    THROUGHPUT_TUNED,
    Measured,
    Row,
    System,
    add_run_options,
    benchmark_main,
    engine_busy_s,
    measure_same_app,
    print_table,
    served_model,
    text_chunk,
)
from parrot.integrations.semantic_kernel import ParrotChatCompletion, enable_graphs

SUMMARIZE = "Summarize this section of a report in one sentence.\n\nSection: {{$section}}"


def assess_template(sections: int) -> str:
    return ("Summaries of a report, section by section:\n"
            + "".join(f"- {{{{report.summarize section=$s{i}}}}}\n" for i in range(sections))
            + "\nWrite a short overall assessment of the report.")


def build_kernel(chat: ChatCompletionClientBase, sections: int, tokens: int) -> Kernel:
    kernel = Kernel()
    kernel.add_service(chat)
    settings = {"default": PromptExecutionSettings(extension_data={"max_tokens": tokens, "temperature": 0.0})}
    kernel.add_function("report", KernelFunctionFromPrompt(
        function_name="summarize", prompt=SUMMARIZE, prompt_execution_settings=settings))
    kernel.add_function("report", KernelFunctionFromPrompt(
        function_name="assess", prompt=assess_template(sections), prompt_execution_settings=settings))
    return kernel


async def timed_assessment(kernel: Kernel, sections: list[str], url: str) -> tuple[Measured, str]:
    # One small call first: connections and first-call costs out of the timing (and out of
    # the engine time).
    await kernel.invoke(kernel.get_function("report", "summarize"), KernelArguments(section="Hello."))
    arguments = KernelArguments(**{f"s{i}": s for i, s in enumerate(sections)})
    busy = engine_busy_s(url)
    started = time.perf_counter()
    result = await kernel.invoke(kernel.get_function("report", "assess"), arguments)
    return Measured(time.perf_counter() - started, engine_s=engine_busy_s(url) - busy), str(result)


def measure(args) -> list[Row]:
    sections = [text_chunk(i, args.sentences) for i in range(args.sections)]
    systems = {
        "parrot (graphs)": lambda url: enable_graphs(build_kernel(
            ParrotChatCompletion(base_url=url), args.sections, args.tokens)),
        "OpenAIChatCompletion": lambda url: build_kernel(
            OpenAIChatCompletion(ai_model_id=served_model(url), async_client=AsyncOpenAI(base_url=f"{url}/v1",
                                                                                   api_key="none")),
            args.sections, args.tokens),
    }
    outputs = set()

    def job(make_kernel):
        def once(url: str) -> Measured:
            measured, text = asyncio.run(timed_assessment(make_kernel(url), sections, url))
            outputs.add(text)
            return measured
        return once

    return measure_same_app([System(name, THROUGHPUT_TUNED, job(kernel)) for name, kernel in systems.items()],
                            args, outputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=6)
    parser.add_argument("--sentences", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="the longest reply")
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run (3 sections, 8 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.sections, args.tokens = 3, 8
    return args


def report(rows: list[Row], args) -> None:
    print_table(f"Semantic Kernel: a prompt function with {args.sections} nested calls, replies of up to "
                f"{args.tokens} tokens, the same kernel code with each connector", rows, "parrot (graphs)")


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
