"""Chain summary: a running summary refined chunk by chunk (the Parrot paper's first workload).

Step k reads the summary of step k-1 and chunk k and writes a new summary. All steps
are issued at once; the service runs the chain without a client round trip between
steps, and only the final summary is fetched with the LATENCY criterion (which
flows back to every step of the chain).

    pip install -e .                                 # what it imports (embedded: serve too)
    python cookbook/chain_summary.py                 # embedded service, default model
    python cookbook/chain_summary.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import time

import parrot as P

DOCUMENT = """\
The first mechanical clocks appeared in European monasteries and town towers in the late thirteenth
century. They had no faces or hands at first; they struck a bell so that monks knew when to pray and
townspeople knew when markets opened. Their heart was the verge escapement, a toothed wheel and a
swinging bar that released the power of a falling weight in small, regular steps.

Those early clocks were poor timekeepers. A tower clock could drift by a quarter of an hour in a day,
and keepers reset it each noon by the sun. Springs replaced weights in the fifteenth century, which
made clocks small enough to sit on a table and, later, to be carried in a pocket, but accuracy barely
improved because the escapement itself was irregular.

In 1656 Christiaan Huygens built the first pendulum clock. A pendulum swings with a nearly constant
period, so tying the escapement to it cut the daily error from minutes to seconds. The anchor
escapement and the long seconds pendulum followed, and by 1700 a good household clock kept time
within a few seconds a day, making the minute hand worth adding.

Pendulums fail at sea, where ships roll and pitch, and sailors needed precise time to find their
longitude. John Harrison spent four decades building marine chronometers, and his fourth, a large
watch tested in 1761, lost only five seconds on a voyage to Jamaica. Chronometers soon became standard
equipment, and precise time became something every ship could carry.
"""


@P.semantic_function()
def summarize(chunk: P.Input, summary: P.Output(max_tokens=48, stop=["\n\n"])):
    """Summarize the following text in two sentences.

    Text: {{input:chunk}}

    Summary: {{output:summary}}"""


@P.semantic_function()
def refine(summary: P.Input, chunk: P.Input, new_summary: P.Output(max_tokens=56, stop=["\n\n"])):
    """Here is a summary of the beginning of a document:
    {{input:summary}}

    Here is the next part of the document:
    {{input:chunk}}

    Write a new summary in three sentences that covers both.

    New summary: {{output:new_summary}}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Parrot service (default: start one in this process)")
    args = parser.parse_args()
    chunks = [c.replace("\n", " ") for c in DOCUMENT.strip().split("\n\n")]

    with P.Parrot(args.url):
        started = time.perf_counter()
        summaries = [summarize(chunks[0])]  # plain strings go into the prompt as constant text
        for chunk in chunks[1:]:
            summaries.append(refine(summaries[-1], chunk))  # each step reads the previous future
        final = summaries[-1].get(perf=P.LATENCY)
        elapsed = time.perf_counter() - started
        for i, summary in enumerate(summaries[:-1], start=1):
            print(f"== after chunk {i} ==\n{summary.get().strip()}\n")  # already computed: no wait
        print(f"== final summary ({len(chunks)} chunks) ==\n{final.strip()}\n")
        print(f"wall time: {elapsed:.2f} s")


if __name__ == "__main__":
    main()
