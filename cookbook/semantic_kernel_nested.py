"""Semantic Kernel: a prompt function whose template summarizes six sections through nested
calls and then combines them, with SK's own OpenAIChatCompletion and with ParrotChatCompletion.

The plugin is plain SK: ``summarize`` is a prompt function, and ``assess``'s template calls
it once per section (``{{report.summarize section=$s1}}`` ...) before asking for an overall
assessment. SK renders those nested calls one after another, each waiting for its reply.
The same kernel code runs twice on the same model: with ``OpenAIChatCompletion`` on the
service's OpenAI routes, and, one line changed, with ``ParrotChatCompletion`` and
``enable_graphs(kernel)``: the nested calls and the assessment reach the service as one
graph, the six summaries run in parallel, and the assessment starts the moment they are
done. Decoding is greedy, so both runs should write the same text.

    pip install -e ".[client,semantic-kernel]"           # what it imports (embedded: serve too)
    python cookbook/semantic_kernel_nested.py            # embedded service, default model
    python cookbook/semantic_kernel_nested.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _services import served_model, service
from openai import AsyncOpenAI
from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.chat_completion_client_base import ChatCompletionClientBase
from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.functions import KernelArguments, KernelFunctionFromPrompt

from parrot.integrations.semantic_kernel import ParrotChatCompletion, enable_graphs

SECTIONS = [
    "Revenue grew 12% over the quarter, led by subscriptions in Europe, while hardware sales fell "
    "for the second quarter in a row as customers waited for the new model.",
    "Operating costs rose 5%, mostly from cloud hosting and two new offices; marketing spend was "
    "flat, and the hiring freeze held outside engineering.",
    "The support team answered 94% of tickets within a day, up from 88%, after the new help "
    "center launched; complaints about billing doubled after the price change.",
    "Engineering shipped the offline mode and the new search, but the tablet app slipped to next "
    "quarter after the design review found accessibility problems.",
    "Churn fell to 2.1% a month among paying customers, but trial conversions dropped, mostly "
    "among small teams that found the setup too long.",
    "Cash on hand is 40 million dollars, enough for three years at the current burn; the board "
    "approved a small acquisition in the analytics space.",
]

SUMMARIZE = ("Summarize this section of a quarterly report in one short sentence.\n\n"
             "Section: {{$section}}")
ASSESS = ("Here are the summaries of a company's quarterly report, section by section:\n"
          + "".join(f"- {{{{report.summarize section=$s{i}}}}}\n" for i in range(len(SECTIONS)))
          + "\nWrite a short overall assessment of the quarter: what went well and what did not.")


def build_kernel(chat: ChatCompletionClientBase) -> Kernel:
    """The plugin, with any chat service: the kernel code is the same for both runs."""
    kernel = Kernel()
    kernel.add_service(chat)
    settings = {"default": PromptExecutionSettings(extension_data={"max_tokens": 48, "temperature": 0.0})}
    kernel.add_function("report", KernelFunctionFromPrompt(
        function_name="summarize", prompt=SUMMARIZE, prompt_execution_settings=settings))
    kernel.add_function("report", KernelFunctionFromPrompt(
        function_name="assess", prompt=ASSESS, prompt_execution_settings=settings))
    return kernel


async def assess(kernel: Kernel) -> tuple[str, float]:
    arguments = KernelArguments(**{f"s{i}": section for i, section in enumerate(SECTIONS)})
    started = time.perf_counter()
    result = await kernel.invoke(kernel.get_function("report", "assess"), arguments)
    return str(result), time.perf_counter() - started


async def with_openai(url: str) -> tuple[str, float]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
    chat = OpenAIChatCompletion(ai_model_id=served_model(url), async_client=client)
    return await assess(build_kernel(chat))


async def with_parrot(url: str) -> tuple[str, float]:
    return await assess(enable_graphs(build_kernel(ParrotChatCompletion(base_url=url))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Parrot service (default: a fresh embedded one per run)")
    args = parser.parse_args()
    with service(args.url) as url:
        sk_text, sk_time = asyncio.run(with_openai(url))
    with service(args.url) as url:
        parrot_text, parrot_time = asyncio.run(with_parrot(url))
    print(f"== assessment (OpenAIChatCompletion) ==\n{sk_text.strip()}\n")
    print(f"== assessment (ParrotChatCompletion, graphs on) ==\n{parrot_text.strip()}\n")
    print(f"OpenAIChatCompletion: {sk_time:.2f} s; ParrotChatCompletion with graphs: {parrot_time:.2f} s "
          f"({sk_time / parrot_time:.2f}x)")
    print(f"identical outputs: {'yes' if sk_text == parrot_text else 'no'}")
    print(f"wall time: {sk_time + parrot_time:.2f} s")


if __name__ == "__main__":
    main()
