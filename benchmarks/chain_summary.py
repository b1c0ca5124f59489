"""Chain summary: summarize a document chunk by chunk, each step extending the summary so far.

Step 1 summarizes chunk 0; step i reads the summary so far and chunk i and writes the
new summary. Parrot: all steps go to the service as one graph (each step's input is the
previous step's output variable) and only the last summary is fetched, with P.LATENCY,
so no step waits for a client round trip. Request-centric: the client sends the steps
one by one, pasting each returned summary into the next prompt.

Besides the end-to-end times it prints, for Parrot, the mean time from a step's input being
set to the step's first token (dependent TTFT), with and without prefill ahead (the service
computing a waiting step's known prompt start while the step before it generates).

    python -m benchmarks.chain_summary            # 6 chunks x 32 tokens
    python -m benchmarks.chain_summary --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import parrot as P
from benchmarks.harness import (
    THROUGHPUT_TUNED,
    Completions,
    Measured,
    Row,
    add_run_options,
    benchmark_main,
    compare_three_ways,
    print_table,
    text_chunk,
    ttft_ms,
)

TTFT_COLUMN = "dependent TTFT ms"
NO_PREFILL_AHEAD = ("parrot, no prefill ahead", dataclasses.replace(THROUGHPUT_TUNED, prefill_ahead=False))

# Prompts the model continues as text: asked for an answer, this small instruct model first emits its
# end-of-turn token, which the returned text drops but Parrot's summary variable keeps (its token ids).
# Each summary goes on from "says that" and is pasted back after it, so both ways see the same tokens.
FIRST = "A news report, first part: {chunk}\n\nSummary of the report so far: The report says that"
NEXT = ("Summary of the report so far: The report says that{previous}\n\nThe report, next part: {chunk}\n\n"
        "Summary of the report so far: The report says that")


def _function(text: str, name: str, inputs: list[str], step_tokens: int) -> P.SemanticFunction:
    """The semantic function of ``text`` (``{x}`` fields become inputs) ending in the summary."""
    template = text
    for x in inputs:
        template = template.replace(f"{{{x}}}", f"{{{{input:{x}}}}}")
    return P.SemanticFunction.from_template(
        template + "{{output:summary}}", name=name, inputs=inputs,
        outputs={"summary": P.Output(max_tokens=step_tokens, ignore_eos=True)})


async def parrot_job(url: str, chunks: list[str], step_tokens: int) -> str:
    return (await _parrot_run(url, chunks, step_tokens))[0]


async def measured_parrot_job(url: str, chunks: list[str], step_tokens: int) -> Measured:
    """``parrot_job``'s end-to-end time, and its steps' mean dependent TTFT."""
    _, seconds, ttfts = await _parrot_run(url, chunks, step_tokens)
    return Measured(seconds, {TTFT_COLUMN: statistics.mean(ttfts)} if ttfts else {})


async def _parrot_run(url: str, chunks: list[str], step_tokens: int) -> tuple[str, float, list[float]]:
    """The final summary, the seconds until it was in hand, and each later step's TTFT (ms)."""
    first = _function(FIRST, "summarize_first", ["chunk"], step_tokens)
    step = _function(NEXT, "summarize_next", ["previous", "chunk"], step_tokens)
    async with P.Parrot(url) as vm:
        started = time.perf_counter()
        summary = first(chunks[0])
        for chunk in chunks[1:]:
            summary = step(summary, chunk)
        value = await summary.aget(perf=P.LATENCY)
        seconds = time.perf_counter() - started
        graph = await vm.agraph()
    ttfts = [ttft_ms(c) for c in graph.calls if c.name == "summarize_next"]
    return value, seconds, [t for t in ttfts if t is not None]


async def request_centric_job(llm: Completions, chunks: list[str], step_tokens: int) -> str:
    summary = await llm(FIRST.format(chunk=chunks[0]), step_tokens)
    for chunk in chunks[1:]:
        summary = await llm(NEXT.format(previous=summary, chunk=chunk), step_tokens)
    return summary


def chunks_for(n: int, sentences: int) -> list[str]:
    return [text_chunk(i, sentences) for i in range(n)]


def measure(args) -> list[Row]:
    chunks = chunks_for(args.chunks, args.sentences)
    return compare_three_ways(lambda url: measured_parrot_job(url, chunks, args.step_tokens),
                              lambda llm: request_centric_job(llm, chunks, args.step_tokens),
                              parrot_variants=[NO_PREFILL_AHEAD], repeats=args.repeats, rtt_ms=args.rtt_ms)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--sentences", type=int, default=3, help="sentences per chunk (~13 tokens each)")
    parser.add_argument("--step-tokens", type=int, default=32, help="tokens each step's summary has")
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run (3 chunks, 8 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.chunks, args.step_tokens = 3, 8
    return args


def report(rows: list[Row], args) -> None:
    print_table(f"chain summary: {args.chunks} sequential steps x {args.step_tokens} tokens "
                f"({args.sentences} sentences per chunk)", rows, "parrot", extra_columns=[TTFT_COLUMN],
                note=f"{TTFT_COLUMN}: from a step's input being set to its first token (Parrot only)")


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
