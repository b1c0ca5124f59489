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
import time
from pathlib import Path

from langchain_openai import ChatOpenAI

from benchmarks.harness import (
    THROUGHPUT_TUNED,
    Measured,
    Row,
    System,
    add_run_options,
    benchmark_main,
    engine_busy_s,
    measure_systems,
    print_table,
    served_model,
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
    outcomes = set()

    def job(make_model):
        models = {}  # one model object per service, as an app keeps it

        def once(url: str) -> Measured:
            if url not in models:
                models[url] = make_model(url)
                models[url].invoke("Say hello.", max_tokens=4)  # connections, first-call costs: untimed
            graph = recipe.build_graph(models[url])
            busy = engine_busy_s(url)
            started = time.perf_counter()
            state = graph.invoke({"task": recipe.TASK, "rounds": args.rounds, "notes": []})
            seconds = time.perf_counter() - started
            outcomes.add((state["plan"], tuple(state["notes"]), state["brief"]))
            return Measured(seconds, engine_s=engine_busy_s(url) - busy)
        return once

    rows = measure_systems([System(name, THROUGHPUT_TUNED, job(make)) for name, make in systems.items()],
                           args.repeats, args.rtt_ms)
    print(f"identical outputs: {'yes' if len(outcomes) == 1 else 'no'}")
    return rows


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
