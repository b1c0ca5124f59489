"""Mixed workload: latency-sensitive chat sessions while map-reduce jobs run, on 2 engine processes.

Chat users send a question, wait for the answer, think, and ask again; meanwhile
several map-reduce summary jobs run as in ``map_reduce.py``. Parrot knows which is
which: chat answers are fetched with ``P.LATENCY``, job results with ``P.THROUGHPUT``,
and the SDK sends each fetch's criterion with the graph, so every call is placed for
its objective. The global scheduler keeps each job's maps on one engine and sends
chat turns where the least latency work runs; on that engine, while a chat turn
runs, throughput work only gets what is left of ``--latency-step-tokens`` per step
(8 here), and takes the whole batch again in between. A decode step of the 4-bit CPU
kernels costs about 5.5 ms for one row and about 1 ms more per row after it, so 8 rows
of job work beside a chat keep its turn near 1.5x its solo speed while the jobs go on
(1 pauses them: the chat decodes fastest, the jobs finish later; 32, the engine's
default, favours the jobs). The request-centric way serves
every call alike, as any OpenAI request: on an engine with the fewest requests in
flight, the one holding its prompt's prefix if any.

Chat latency is the normalized latency of the Parrot paper: a turn's end-to-end time
over its output tokens, averaged over turns.

    python -m benchmarks.mixed            # 6 jobs x 8 chunks, 2 chat users x 3 turns
    python -m benchmarks.mixed --quick
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time

import parrot as P
from benchmarks.harness import (
    LATENCY_TUNED,
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
)
from benchmarks.map_reduce import chunks_for, parrot_job, request_centric_job

CHAT = "You are a helpful assistant of a city newsroom. Answer in two sentences.\nUser: {q}\nAssistant:"
CHAT_QUESTIONS = ("What is new in the harbour?", "How is the weather this week?", "Who won the match?",
                  "Is the mountain pass open?", "When does the museum close?", "What did the council do?")


async def chat_user(user: int, args, turn) -> list[float]:
    """One user's turns after a staggered start; returns each turn's ms per output token."""
    await asyncio.sleep(args.chat_start_s + user * args.stagger_s)
    latencies = []
    for t in range(args.turns):
        question = f"{CHAT_QUESTIONS[(user + t) % len(CHAT_QUESTIONS)]} (reader {user}, turn {t})"
        started = time.perf_counter()
        await turn(question)
        latencies.append((time.perf_counter() - started) * 1000 / args.chat_tokens)
        await asyncio.sleep(args.think_s)
    return latencies


async def workload(args, job, turn) -> tuple[float, list[float]]:
    started = time.perf_counter()

    async def timed_jobs() -> float:
        await asyncio.gather(*(job(chunks_for(j + 1, args.chunks, args.sentences)) for j in range(args.jobs)))
        return time.perf_counter() - started

    users = (chat_user(u, args, turn) for u in range(args.users))
    jobs_s, *per_user = await asyncio.gather(timed_jobs(), *users)
    return jobs_s, [x for user in per_user for x in user]


async def parrot_run(url: str, args) -> tuple[float, list[float]]:
    chat = P.SemanticFunction.from_template(
        CHAT.replace("{q}", "{{input:q}}") + "{{output:a}}", name="chat", inputs=["q"],
        outputs={"a": P.Output(max_tokens=args.chat_tokens, ignore_eos=True)})

    async def turn(question: str) -> str:
        async with P.Parrot(url, close_in_background=True):  # the turn is over once the answer is in
            return await chat(question).aget(perf=P.LATENCY)

    async def job(chunks: list[str]) -> str:
        return await parrot_job(url, chunks, args.map_tokens, args.reduce_tokens, perf=P.THROUGHPUT)

    return await workload(args, job, turn)


async def request_centric_run(url: str, args) -> tuple[float, list[float]]:
    async with Completions(url) as llm:
        return await workload(
            args, lambda chunks: request_centric_job(llm, chunks, args.map_tokens, args.reduce_tokens),
            lambda question: llm(CHAT.format(q=question), args.chat_tokens))


def measure(args) -> list[Row]:
    one_thread = {"threads": 1}  # two engine processes share the 2 cores
    parrot_setup = dataclasses.replace(THROUGHPUT_TUNED, latency_step_tokens=args.latency_step_tokens,
                                       **one_thread)

    def job(fn):
        def once(url: str) -> Measured:
            jobs_s, chat_ms = run(fn(url, args))
            return Measured(jobs_s, {"chat ms/token": statistics.mean(chat_ms),
                                     "chat p90 ms/token": statistics.quantiles(chat_ms, n=10)[-1]})
        return once

    throughput_tuned = dataclasses.replace(THROUGHPUT_TUNED, **one_thread)
    latency_tuned = dataclasses.replace(LATENCY_TUNED, **one_thread)
    systems = [("parrot", parrot_setup, parrot_run),
               ("throughput-tuned", throughput_tuned, request_centric_run),
               ("latency-tuned", latency_tuned, request_centric_run)]
    return measure_systems([System(name, setup, job(fn), engine_processes=2) for name, setup, fn in systems],
                           args.repeats, args.rtt_ms)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=3)
    parser.add_argument("--map-tokens", type=int, default=48)
    parser.add_argument("--reduce-tokens", type=int, default=16)
    parser.add_argument("--users", type=int, default=2, help="one per engine at most, at best")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--chat-tokens", type=int, default=32)
    parser.add_argument("--chat-start-s", type=float, default=2.0)
    parser.add_argument("--stagger-s", type=float, default=0.5)
    parser.add_argument("--think-s", type=float, default=1.0)
    parser.add_argument("--latency-step-tokens", type=int, default=8,
                        help="Parrot engines' step budget while chat turns run")
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.jobs, args.chunks, args.map_tokens, args.users, args.turns, args.chat_tokens = 2, 4, 8, 2, 2, 8
        args.chat_start_s = 0.5
    return args


def report(rows: list[Row], args) -> None:
    print_table(f"mixed: {args.jobs} map-reduce jobs ({args.chunks} chunks x {args.map_tokens} tokens) "
                f"and {args.users} chat users x {args.turns} turns x {args.chat_tokens} tokens, "
                "2 engine processes", 
                rows, "parrot", ["chat ms/token", "chat p90 ms/token"],
                note="end to end = all map-reduce jobs done")


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
