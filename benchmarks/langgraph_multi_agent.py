"""The cookbook's LangGraph multi-agent recipe, with ChatOpenAI and with ChatParrot swapped in.

The same compiled graph (``cookbook/langgraph_multi_agent.py``: a planner, rounds of a
``Send`` fan-out to four specialists over one growing conversation, a writer) runs with
``ChatOpenAI`` on the service's OpenAI routes (LangGraph's threads send one request per
agent) and with ``ChatParrot``, whose calls of one step reach the service as one graph;
each model on a service of its own, greedy, and the script checks both write the same.

    python -m benchmarks.langgraph_multi_agent            # 2 rounds, messages of up to 40 tokens
    python -m benchmarks.langgraph_multi_agent --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    with_model,
)
from parrot.integrations.langchain import ChatParrot

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cookbook"))
import langgraph_multi_agent as recipe  # noqa: E402  (the recipe, from the cookbook's folder)


def measure(args) -> list[Row]:
    systems = {
        "ChatParrot": lambda url: ChatParrot(base_url=url, temperature=0, max_tokens=args.max_tokens),
        "ChatOpenAI": lambda url: ChatOpenAI(base_url=f"{url}/v1", api_key="none", model=served_model(url),
                                             temperature=0, max_tokens=args.max_tokens, max_retries=0),
    }
    outputs: set = set()

    def meeting(llm) -> tuple:
        state = recipe.build_graph(llm).invoke({"task": recipe.TASK, "rounds": args.rounds, "notes": []})
        return state["plan"], tuple(state["notes"]), state["brief"]

    return measure_same_app([System(name, THROUGHPUT_TUNED, with_model(make, meeting, outputs))
                             for name, make in systems.items()], args, outputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of advice from the four specialists")
    parser.add_argument("--max-tokens", type=int, default=40, help="the longest message")
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run (1 round, 8 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.rounds, args.max_tokens = 1, 8
    return args


def report(rows: list[Row], args) -> None:
    calls = 2 + args.rounds * len(recipe.SPECIALISTS)
    print_table(f"LangGraph multi-agent recipe: {calls} calls, {args.rounds} rounds of "
                f"{len(recipe.SPECIALISTS)} specialists, the same graph with each model", rows, "ChatParrot")


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
