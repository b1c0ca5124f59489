"""Multi-agent conversation (MetaGPT style): rounds of agents with different roles share one chat.

Every agent of a round reads the task and the whole conversation so far (each earlier
message, in order, as a "Role: message" line) and writes one message; a round's messages
join the conversation for the next round, so the prompt is a shared prefix that grows.
Parrot: every round's calls go to the service up front as one graph (each call takes every
earlier message variable as an input), and the last round's messages are fetched with
P.LATENCY. Request-centric: each round's agents run as LangChain's ``batch``, and the client
pastes the returned messages into the next round's prompts.

    python -m benchmarks.multi_agent            # 3 rounds x 4 agents x 24 tokens
    python -m benchmarks.multi_agent --quick
"""

from __future__ import annotations

import argparse
import asyncio
import time

import parrot as P
from benchmarks.harness import (
    LANGCHAIN_WORKERS,
    Completions,
    Measured,
    Row,
    add_run_options,
    benchmark_main,
    compare_three_ways,
    langchain_batch,
    print_table,
    text_chunk,
)

DUTIES = {"architect": "designs the modules and their interfaces", "engineer": "writes the code",
          "tester": "writes the tests and reports failures", "reviewer": "reviews the work"}
TASK = "\n\n".join(text_chunk(2000 + i, 6) for i in range(2))  # ~165 tokens
HEAD = "A team of agents builds a dashboard for the regional news desk from these reports:\n\n"
CONVERSATION = "\n\nConversation so far:\n"


def role(agent: int) -> str:
    roles = list(DUTIES)
    return roles[agent % len(roles)] + (f" {agent // len(roles) + 1}" if agent >= len(roles) else "")


def line(agent: int, message: str) -> str:
    """One message of the conversation; the message goes on from the prompt's "Role:"."""
    return f"{role(agent).capitalize()}:{message}\n"


def tail(agent: int) -> str:
    name = role(agent)
    return (f"\nYou are the {name}, who {DUTIES[name.split()[0]]}. Write your next message to the team."
            f"\n\n{name.capitalize()}:")


def prompt(task: str, conversation: list[tuple[int, str]], agent: int) -> str:
    return HEAD + task + CONVERSATION + "".join(line(a, m) for a, m in conversation) + tail(agent)


def agent_function(earlier: list[int], agent: int, message_tokens: int) -> P.SemanticFunction:
    """The call of ``agent`` after messages by ``earlier`` agents: inputs ``task``, ``m0``, ``m1``, ..."""
    names = [f"m{i}" for i in range(len(earlier))]
    lines = "".join(line(a, f"{{{{input:{x}}}}}") for a, x in zip(earlier, names, strict=True))
    template = HEAD + "{{input:task}}" + CONVERSATION + lines + tail(agent) + "{{output:message}}"
    return P.SemanticFunction.from_template(
        template, name=role(agent).replace(" ", "_"), inputs=["task", *names],
        outputs={"message": P.Output(max_tokens=message_tokens, ignore_eos=True)})


async def parrot_job(url: str, task: str, rounds: int, agents: int, message_tokens: int) -> Measured:
    """The last round's messages are in hand: the time since the session was open (as the
    request-centric way is timed from its client being open)."""
    async with P.Parrot(url):
        started = time.perf_counter()
        authors: list[int] = []
        messages: list[P.SemanticVariable] = []
        for _ in range(rounds):
            new = [agent_function(authors, a, message_tokens)(task, *messages) for a in range(agents)]
            authors += range(agents)
            messages += new
        await asyncio.gather(*(m.aget(perf=P.LATENCY) for m in new))
        return Measured(time.perf_counter() - started)


async def request_centric_job(llm: Completions, task: str, rounds: int, agents: int,
                              message_tokens: int) -> list[str]:
    conversation: list[tuple[int, str]] = []
    for _ in range(rounds):
        prompts = [prompt(task, conversation, a) for a in range(agents)]
        new = await langchain_batch([lambda p=p: llm(p, message_tokens) for p in prompts])
        conversation += enumerate(new)
    return new


def measure(args) -> list[Row]:
    shape = (args.rounds, args.agents, args.message_tokens)
    return compare_three_ways(lambda url: parrot_job(url, TASK, *shape),
                              lambda llm: request_centric_job(llm, TASK, *shape),
                              repeats=args.repeats, rtt_ms=args.rtt_ms)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agents", type=int, default=4, help="agents per round (architect, engineer, ...)")
    parser.add_argument("--message-tokens", type=int, default=24)
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run (2 rounds, 8 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.rounds, args.message_tokens = 2, 8
    return args


def report(rows: list[Row], args) -> None:
    print_table(f"multi-agent: {args.rounds} rounds x {args.agents} agents x {args.message_tokens} tokens, "
                f"shared growing conversation (request-centric rounds: {LANGCHAIN_WORKERS} workers)",
                rows, "parrot")


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
