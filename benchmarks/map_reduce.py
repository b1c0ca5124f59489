"""Map-reduce summary: summarize N chunks of a document in parallel, then combine them.

Parrot: the N map calls and the reduce call go to the service as one graph; the maps
are one task group batched together, the reduce starts the moment they are done.
Request-centric: the map step runs as LangChain's ``batch`` (a thread pool of its
default size), then the client sends the reduce with the summaries pasted in.

    python benchmarks/map_reduce.py            # 24 chunks
    python benchmarks/map_reduce.py --quick
"""

from __future__ import annotations

import argparse

import parrot as P
from benchmarks.harness import (
    LANGCHAIN_WORKERS,
    Completions,
    Row,
    benchmark_main,
    compare_three_ways,
    langchain_batch,
    print_table,
    text_chunk,
)

MAP = "Summarize this part of a news report in one sentence.\n\nText: {chunk}\n\nSummary:"
REDUCE_HEAD = "Here are summaries of the parts of a news report:\n"
REDUCE_TAIL = "\nWrite the headline of the whole report.\n\nHeadline:"


def reduce_function(n: int, reduce_tokens: int) -> P.SemanticFunction:
    names = [f"part_{i}" for i in range(n)]
    template = REDUCE_HEAD + "".join(f"- {{{{input:{x}}}}}\n" for x in names) + REDUCE_TAIL + "{{output:out}}"
    outputs = {"out": P.Output(max_tokens=reduce_tokens, ignore_eos=True)}
    return P.SemanticFunction.from_template(template, name="reduce", inputs=names, outputs=outputs)


async def parrot_job(url: str, chunks: list[str], map_tokens: int, reduce_tokens: int,
                     perf=P.THROUGHPUT) -> str:
    mapper = _mapper(map_tokens)
    async with P.Parrot(url):
        parts = [mapper(c) for c in chunks]
        final = reduce_function(len(chunks), reduce_tokens)(*parts)
        return await final.aget(perf=perf)


def _mapper(map_tokens: int) -> P.SemanticFunction:
    template = MAP.replace("{chunk}", "{{input:chunk}}") + "{{output:summary}}"
    return P.SemanticFunction.from_template(
        template, name="summarize", inputs=["chunk"],
        outputs={"summary": P.Output(max_tokens=map_tokens, ignore_eos=True)})


async def request_centric_job(llm: Completions, chunks: list[str], map_tokens: int,
                              reduce_tokens: int) -> str:
    parts = await langchain_batch([lambda c=c: llm(MAP.format(chunk=c), map_tokens) for c in chunks])
    prompt = REDUCE_HEAD + "".join(f"- {p}\n" for p in parts) + REDUCE_TAIL
    return await llm(prompt, reduce_tokens)


def chunks_for(job: int, n: int, sentences: int) -> list[str]:
    return [text_chunk(job * 1000 + i, sentences) for i in range(n)]


def measure(args) -> list[Row]:
    chunks = chunks_for(0, args.chunks, args.sentences)
    return compare_three_ways(
        lambda url: parrot_job(url, chunks, args.map_tokens, args.reduce_tokens),
        lambda llm: request_centric_job(llm, chunks, args.map_tokens, args.reduce_tokens))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--sentences", type=int, default=3, help="sentences per chunk (~20 tokens each)")
    parser.add_argument("--map-tokens", type=int, default=48)
    parser.add_argument("--reduce-tokens", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run (6 chunks, 8 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.map_tokens, args.reduce_tokens = 6, 8, 4
    return args


def report(rows: list[Row], args) -> None:
    print_table(f"map-reduce summary: {args.chunks} chunks x {args.map_tokens} tokens, reduce "
                f"{args.reduce_tokens} tokens (request-centric map: {LANGCHAIN_WORKERS} workers)",
                rows, "parrot")


main = benchmark_main(parse_args, measure, report)


if __name__ == "__main__":
    main()
