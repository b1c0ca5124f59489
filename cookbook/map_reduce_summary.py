"""Map-reduce summary: summarize chunks in parallel, then combine the partial summaries.

The map calls do not depend on each other, so the service batches them; they all
feed one reduce call, so it schedules them as one task group. The reduce template
has one input per chunk, so it is made at run time with
``P.SemanticFunction.from_template``. Only the final answer is fetched.

    pip install -e .                                 # what it imports (embedded: serve too)
    python cookbook/map_reduce_summary.py            # embedded service, default model
    python cookbook/map_reduce_summary.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import time

import parrot as P

REVIEWS = """\
The battery easily lasts two full days with normal use, and it charges from empty to full in about an
hour. I only wish the charger were included in the box instead of sold separately.

The screen is bright and sharp, readable even in direct sunlight. Colors look a little cold out of the
box, but the settings menu fixed that in a minute.

The camera takes great photos in daylight with accurate colors. At night the pictures get noisy and the
night mode takes several seconds, so moving subjects come out blurred.

It feels solid and the matte back does not collect fingerprints. It is heavier than my previous phone
and a bit too tall to use comfortably with one hand.

Software updates arrive every month and there is very little preinstalled clutter. The fingerprint
reader under the screen is fast, although it fails when my fingers are wet.
"""


@P.semantic_function()
def summarize_review(review: P.Input, summary: P.Output(max_tokens=40, stop=["\n\n"])):
    """Summarize this customer review of a phone in one short sentence.

    Review: {{input:review}}

    One-sentence summary: {{output:summary}}"""


def make_reduce(num_parts: int) -> P.SemanticFunction:
    """A reduce function with one input per partial summary."""
    names = [f"part_{i}" for i in range(num_parts)]
    bullets = "".join(f"- {{{{input:{name}}}}}\n" for name in names)
    template = ("Here are summaries of customer reviews of a phone:\n" + bullets
                + "\nWrite a short overall verdict on the phone: its strengths and its weaknesses.\n\n"
                "Verdict: {{output:verdict}}")
    return P.SemanticFunction.from_template(
        template, name="reduce", inputs=names,
        outputs={"verdict": P.Output(max_tokens=80, stop=["\n\n"])},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Parrot service (default: start one in this process)")
    args = parser.parse_args()
    reviews = [r.replace("\n", " ") for r in REVIEWS.strip().split("\n\n")]
    reduce = make_reduce(len(reviews))

    with P.Parrot(args.url):
        started = time.perf_counter()
        partials = [summarize_review(review) for review in reviews]  # map: independent calls
        verdict = reduce(*partials)  # reduce: reads every partial summary
        final = verdict.get(perf=P.LATENCY)
        elapsed = time.perf_counter() - started
        for i, partial in enumerate(partials, start=1):
            print(f"== review {i} ==\n{partial.get().strip()}\n")
        print(f"== verdict ({len(reviews)} reviews) ==\n{final.strip()}\n")
        print(f"wall time: {elapsed:.2f} s")


if __name__ == "__main__":
    main()
