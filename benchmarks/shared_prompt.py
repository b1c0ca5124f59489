"""Shared system prompt (Bing Copilot / GPTs style): many users, one long system prompt.

Each user sends one question under the same ~800-token system prompt. Parrot sees
the system prompt as static text of every call, so it is prefilled once, kept in the
prefix cache, and decoded against with shared-prefix attention. Compared with the
same engines serving the same requests without prefix sharing (``--no-prefix-caching``,
as a request-centric server without a prefix cache does) and, for reference, the
request-centric way with the engine's own prefix cache on.

    python -m benchmarks.shared_prompt            # 16 users
    python -m benchmarks.shared_prompt --quick
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time

import parrot as P
from benchmarks.harness import (
    THROUGHPUT_TUNED,
    Completions,
    Measured,
    Row,
    System,
    add_run_options,
    benchmark_main,
    measure_systems,
    print_table,
    run,
    text_chunk,
)

QUESTIONS = (
    "What happened to the bridge?", "Which farms flooded?", "Why did attendance rise?",
    "What is the library used for?", "How did the bakers cut costs?", "How many birds were counted?",
    "When is the parking vote?", "Why did the clinic close?",
)


def system_prompt(paragraphs: int) -> str:
    body = "\n\n".join(text_chunk(900 + i, 5) for i in range(paragraphs))
    return ("You are the assistant of a regional newspaper. Answer readers' questions using only the "
            f"reports below. Keep answers short and factual.\n\nReports:\n{body}\n\n")


def question(user: int) -> str:
    return f"Reader {user} asks: {QUESTIONS[user % len(QUESTIONS)]}\nAnswer:"


async def parrot_users(url: str, system: str, users: int, tokens: int) -> float:
    """Each user asks in a session of its own; the time from every session being open to every
    answer in hand (as the request-centric way is timed from its client being open)."""
    fn = P.SemanticFunction.from_template(
        system + "{{input:q}}{{output:a}}", name="answer", inputs=["q"],
        outputs={"a": P.Output(max_tokens=tokens, ignore_eos=True)})
    opened, all_open, answered = [], asyncio.Event(), []

    async def user(i: int) -> None:
        async with P.Parrot(url):
            opened.append(i)
            if len(opened) == users:
                all_open.set()
            await all_open.wait()
            await fn(question(i)).aget(perf=P.LATENCY)
            answered.append(time.perf_counter())

    users_done = asyncio.gather(*(user(i) for i in range(users)))
    await all_open.wait()
    started = time.perf_counter()
    await users_done
    return max(answered) - started


async def request_centric_users(url: str, system: str, users: int, tokens: int) -> float:
    async with Completions(url) as llm:
        started = time.perf_counter()
        await asyncio.gather(*(llm(system + question(i), tokens) for i in range(users)))
        return time.perf_counter() - started


def measure(args) -> list[Row]:
    system = system_prompt(args.paragraphs)
    no_sharing = dataclasses.replace(THROUGHPUT_TUNED, prefix_caching=False)

    def job(fn):
        def once(url: str) -> Measured:
            seconds = run(fn(url, system, args.users, args.tokens))
            return Measured(seconds, {"tokens/s": args.users * args.tokens / seconds})
        return once

    return measure_systems([System("parrot", THROUGHPUT_TUNED, job(parrot_users)),
                            System("request-centric", THROUGHPUT_TUNED, job(request_centric_users)),
                            System("no sharing", no_sharing, job(request_centric_users))],
                           args.repeats, args.rtt_ms)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--paragraphs", type=int, default=8, help="system prompt size (~100 tokens each)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per answer")
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run (6 users, 8 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.users, args.tokens, args.paragraphs = 6, 8, 3
    return args


def report(rows: list[Row], args) -> None:
    print_table(f"shared system prompt: {args.users} users, {args.paragraphs} paragraphs of system prompt, "
                f"{args.tokens} tokens each", rows, "parrot", ["tokens/s"])


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
