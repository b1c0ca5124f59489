"""LangChain map-reduce: one LCEL chain with ChatOpenAI, and with ChatParrot swapped in.

The chain summarizes every chunk with ``.map()`` (LangChain runs the map's calls on its
thread pool), joins the summaries in a lambda and writes one summary of them. The same
chain code runs with ``ChatOpenAI`` on the service's OpenAI routes, with ``ChatParrot``
(only the model class swapped: the map's calls reach the service as one graph), and with
``ChatParrot`` through ``compile(chain)``; each on a fresh service, greedy, and the script
checks that all three write the same text.

    python -m benchmarks.langchain_map_reduce            # 24 chunks
    python -m benchmarks.langchain_map_reduce --quick
"""

from __future__ import annotations

import argparse

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_openai import ChatOpenAI

from benchmarks.harness import (
    THROUGHPUT_TUNED,
    Row,
    System,
    add_run_options,
    benchmark_main,
    measure_same_app,
    print_table,
    served_model,
    text_chunk,
    with_model,
)
from parrot.integrations.langchain import ChatParrot, compile

MAP = ChatPromptTemplate.from_messages([("system", "You summarize news."),
                                        ("user", "Summarize in one sentence:\n{chunk}")])
REDUCE = ChatPromptTemplate.from_messages([("system", "You summarize news."),
                                           ("user", "Summaries:\n{summaries}\n\nWrite one overall summary.")])


def chain_of(llm) -> Runnable:
    summarize = MAP | llm | StrOutputParser()
    join = RunnableLambda(lambda parts: {"summaries": "\n".join(f"- {p}" for p in parts)})
    return summarize.map() | join | REDUCE | llm | StrOutputParser()


def measure(args) -> list[Row]:
    chunks = [{"chunk": text_chunk(i, args.sentences)} for i in range(args.chunks)]
    systems = {  # name: (the model on a service's URL, the chain run with it)
        "parrot (class swapped)": (lambda url: ChatParrot(base_url=url, max_tokens=args.tokens), chain_of),
        "parrot (compiled)": (lambda url: ChatParrot(base_url=url, max_tokens=args.tokens),
                              lambda llm: compile(chain_of(llm))),
        "ChatOpenAI": (lambda url: ChatOpenAI(base_url=f"{url}/v1", api_key="none", model=served_model(url),
                                              temperature=0, max_tokens=args.tokens, max_retries=0),
                       chain_of),
    }
    outputs: set = set()

    def run_with(chain_with):
        return lambda llm: chain_with(llm).invoke(chunks)

    return measure_same_app([System(name, THROUGHPUT_TUNED, with_model(model, run_with(chain), outputs))
                             for name, (model, chain) in systems.items()], args, outputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--sentences", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="the longest summary")
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run (6 chunks, 8 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.chunks, args.tokens = 6, 8
    return args


def report(rows: list[Row], args) -> None:
    print_table(f"LangChain map-reduce: {args.chunks} chunks, summaries of up to {args.tokens} tokens, "
                "the same LCEL chain with each model", rows, "parrot (class swapped)")


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
