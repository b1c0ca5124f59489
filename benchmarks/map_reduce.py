"""Map-reduce summary: summarize N chunks of a document in parallel, then combine them.

Parrot: the N map calls and the reduce call go to the service as one graph; the maps
are one task group batched together, the reduce starts the moment they are done.
Request-centric: the map step runs as LangChain's ``batch`` (a thread pool of its
default size), then the client sends the reduce with the summaries pasted in.

Besides the end-to-end times it prints, for Parrot, the reduce call's time from its last
input being set to its first token (dependent TTFT), with and without prefill ahead (the
service computing the reduce's known prompt start while the maps still generate).

    python benchmarks/map_reduce.py            # 24 chunks
    python benchmarks/map_reduce.py --quick
    python benchmarks/map_reduce.py --reduce-instructions 12   # a reduce prompt that starts with
                                                               # ~190 tokens of instructions
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import parrot as P
from benchmarks.harness import (
    LANGCHAIN_WORKERS,
    THROUGHPUT_TUNED,
    Completions,
    Measured,
    Row,
    add_run_options,
    benchmark_main,
    compare_three_ways,
    langchain_batch,
    print_table,
    text_chunk,
    ttft_ms,
)

TTFT_COLUMN = "dependent TTFT ms"
NO_PREFILL_AHEAD = ("parrot, no prefill ahead", dataclasses.replace(THROUGHPUT_TUNED, prefill_ahead=False))

MAP = "Summarize this part of a news report in one sentence.\n\nText: {chunk}\n\nSummary:"
REDUCE_HEAD = "Here are summaries of the parts of a news report:\n"
REDUCE_TAIL = "\nWrite the headline of the whole report.\n\nHeadline:"


def reduce_function(n: int, reduce_tokens: int, instructions: str = "") -> P.SemanticFunction:
    names = [f"part_{i}" for i in range(n)]
    parts = "".join(f"- {{{{input:{x}}}}}\n" for x in names)
    template = instructions + REDUCE_HEAD + parts + REDUCE_TAIL + "{{output:out}}"
    outputs = {"out": P.Output(max_tokens=reduce_tokens, ignore_eos=True)}
    return P.SemanticFunction.from_template(template, name="reduce", inputs=names, outputs=outputs)


def instructions_for(sentences: int) -> str:
    """Text the reduce prompt starts with (none for 0): static, so known before any input."""
    return f"Background for the editor: {text_chunk(10_000, sentences)}\n\n" if sentences else ""


async def parrot_job(url: str, chunks: list[str], map_tokens: int, reduce_tokens: int,
                     perf=P.THROUGHPUT, instructions: str = "") -> str:
    mapper = _mapper(map_tokens)
    async with P.Parrot(url, close_in_background=True):  # done with the answer in hand, like the other way
        parts = [mapper(c) for c in chunks]
        final = reduce_function(len(chunks), reduce_tokens, instructions)(*parts)
        return await final.aget(perf=perf)


async def measured_parrot_job(url: str, chunks: list[str], map_tokens: int, reduce_tokens: int,
                              perf=P.THROUGHPUT, instructions: str = "") -> Measured:
    """``parrot_job``'s end-to-end time, and the reduce call's dependent TTFT."""
    mapper = _mapper(map_tokens)
    async with P.Parrot(url) as vm:
        started = time.perf_counter()
        parts = [mapper(c) for c in chunks]
        final = reduce_function(len(chunks), reduce_tokens, instructions)(*parts)
        await final.aget(perf=perf)
        seconds = time.perf_counter() - started
        graph = await vm.agraph()
    ttft = next((ttft_ms(c) for c in graph.calls if c.name == "reduce"), None)
    return Measured(seconds, {} if ttft is None else {TTFT_COLUMN: ttft})


def _mapper(map_tokens: int) -> P.SemanticFunction:
    template = MAP.replace("{chunk}", "{{input:chunk}}") + "{{output:summary}}"
    return P.SemanticFunction.from_template(
        template, name="summarize", inputs=["chunk"],
        outputs={"summary": P.Output(max_tokens=map_tokens, ignore_eos=True)})


async def request_centric_job(llm: Completions, chunks: list[str], map_tokens: int,
                              reduce_tokens: int, instructions: str = "") -> str:
    parts = await langchain_batch([lambda c=c: llm(MAP.format(chunk=c), map_tokens) for c in chunks])
    prompt = instructions + REDUCE_HEAD + "".join(f"- {p}\n" for p in parts) + REDUCE_TAIL
    return await llm(prompt, reduce_tokens)


def chunks_for(job: int, n: int, sentences: int) -> list[str]:
    return [text_chunk(job * 1000 + i, sentences) for i in range(n)]


def measure(args) -> list[Row]:
    chunks = chunks_for(0, args.chunks, args.sentences)
    return compare_three_ways(
        lambda url: measured_parrot_job(url, chunks, args.map_tokens, args.reduce_tokens,
                                        instructions=instructions_for(args.reduce_instructions)),
        lambda llm: request_centric_job(llm, chunks, args.map_tokens, args.reduce_tokens,
                                        instructions_for(args.reduce_instructions)),
        parrot_variants=[NO_PREFILL_AHEAD], repeats=args.repeats, rtt_ms=args.rtt_ms)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--sentences", type=int, default=3, help="sentences per chunk (~20 tokens each)")
    parser.add_argument("--map-tokens", type=int, default=48)
    parser.add_argument("--reduce-tokens", type=int, default=16)
    parser.add_argument("--reduce-instructions", type=int, default=0,
                        help="sentences of static text the reduce prompt starts with (~16 tokens each)")
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run (6 chunks, 8 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.chunks, args.map_tokens, args.reduce_tokens = 6, 8, 4
    return args


def report(rows: list[Row], args) -> None:
    print_table(f"map-reduce summary: {args.chunks} chunks x {args.map_tokens} tokens, reduce "
                f"{args.reduce_tokens} tokens (request-centric map: {LANGCHAIN_WORKERS} workers)"
                + (f", reduce instructions {args.reduce_instructions} sentences" if args.reduce_instructions
                   else ""),
                rows, "parrot", extra_columns=[TTFT_COLUMN],
                note=f"{TTFT_COLUMN}: from the reduce's last input being set to its first token "
                     "(Parrot only)")


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
