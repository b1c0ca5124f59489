"""LangChain map-reduce summary: one LCEL chain, run with ChatOpenAI and with ChatParrot.

The chain summarizes every review with ``.map()`` and then writes a verdict from the
summaries. The same chain code runs three times on the same model: with ``ChatOpenAI`` on the
service's OpenAI routes (one request per call; LangChain runs the map's calls in its
thread pool), with ``ChatParrot`` in the same chain (the map's calls go to the service
as one graph), and with ``ChatParrot`` through ``compile(chain)``, which also sends the
reduce call as soon as their replies are read. Decoding is greedy, so every run should
write the same text.

    pip install -e ".[client]"                         # what it imports (embedded: serve too)
    python cookbook/langchain_map_reduce.py            # embedded service, default model
    python cookbook/langchain_map_reduce.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import time

from _services import served_model, service
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_openai import ChatOpenAI

from parrot.integrations.langchain import ChatParrot, compile

REVIEWS = [
    "The battery easily lasts two full days with normal use, and it charges from empty to full in "
    "about an hour. I only wish the charger were included in the box instead of sold separately.",
    "The screen is bright and sharp, readable even in direct sunlight. Colors look a little cold out "
    "of the box, but the settings menu fixed that in a minute.",
    "The camera takes great photos in daylight with accurate colors. At night the pictures get noisy "
    "and the night mode takes several seconds, so moving subjects come out blurred.",
    "It feels solid and the matte back does not collect fingerprints. It is heavier than my previous "
    "phone and a bit too tall to use comfortably with one hand.",
    "Software updates arrive every month and there is very little preinstalled clutter. The "
    "fingerprint reader under the screen is fast, although it fails when my fingers are wet.",
    "The speakers are loud and clear for videos, but the bass is thin and music sounds flat. There is "
    "no headphone jack, and the adapter is not in the box.",
    "Calls sound clear on both ends and the signal holds in places where my old phone dropped out. "
    "Wi-Fi is fast, and the phone never gets warm during long video calls.",
    "Storage fills up fast because there is no memory card slot. The cloud backup works well, but the "
    "free plan is small and the upgrade is expensive.",
]

MAP_PROMPT = ChatPromptTemplate.from_messages([
    ("system", "You summarize customer reviews of a phone."),
    ("user", "Summarize this review in one short sentence.\n\nReview: {review}"),
])
REDUCE_PROMPT = ChatPromptTemplate.from_messages([
    ("system", "You write product verdicts from customer review summaries."),
    ("user", "Review summaries:\n{summaries}\n\nWrite a short overall verdict on the phone: "
             "its strengths and its weaknesses."),
])


def as_inputs(reviews: list[str]) -> list[dict[str, str]]:
    return [{"review": review} for review in reviews]


def as_bullets(summaries: list[str]) -> dict[str, str]:
    return {"summaries": "\n".join(f"- {summary.strip()}" for summary in summaries)}


def build_chain(llm: BaseChatModel) -> Runnable:
    """The map-reduce summary, the same for any chat model."""
    summarize = MAP_PROMPT | llm | StrOutputParser()
    return (RunnableLambda(as_inputs) | summarize.map() | RunnableLambda(as_bullets) | REDUCE_PROMPT | llm
            | StrOutputParser())


def timed(llm: BaseChatModel, chain: Runnable, reviews: list[str]) -> tuple[str, float]:
    """The chain's verdict and its wall time, after a short warm-up call on a prompt of its own."""
    llm.invoke("Say hello.", max_tokens=4)
    started = time.perf_counter()
    verdict = chain.invoke(reviews)
    return verdict, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Parrot service (default: start one in this process)")
    # More reviews than LangChain's thread pool has workers (6 on 2 cores), as in real map steps.
    parser.add_argument("--reviews", type=int, default=24, help="how many reviews to summarize (repeating)")
    parser.add_argument("--max-tokens", type=int, default=48, help="the longest summary or verdict")
    args = parser.parse_args()
    reviews = (REVIEWS * (args.reviews // len(REVIEWS) + 1))[:args.reviews]

    with service(args.url) as url:
        parrot = ChatParrot(base_url=url, temperature=0, max_tokens=args.max_tokens)
        swapped_verdict, swapped_s = timed(parrot, build_chain(parrot), reviews)  # only the class swapped
    with service(args.url) as url:
        parrot = ChatParrot(base_url=url, temperature=0, max_tokens=args.max_tokens)
        parrot_verdict, parrot_s = timed(parrot, compile(build_chain(parrot)), reviews)
    with service(args.url) as url:
        openai = ChatOpenAI(base_url=f"{url}/v1", api_key="none", model=served_model(url), temperature=0,
                            max_tokens=args.max_tokens)
        openai_verdict, openai_s = timed(openai, build_chain(openai), reviews)

    print(f"== verdict ({len(reviews)} reviews) ==\n{parrot_verdict.strip()}\n")
    print(f"ChatOpenAI (OpenAI routes) wall time: {openai_s:.2f} s")
    print(f"ChatParrot (same chain)    wall time: {swapped_s:.2f} s  speed-up: {openai_s / swapped_s:.2f}x")
    print(f"ChatParrot (compiled)      wall time: {parrot_s:.2f} s  speed-up: {openai_s / parrot_s:.2f}x")
    if args.url is not None:
        print("(one service for all runs: later runs find earlier prompts in the prefix cache)")
    same = openai_verdict == parrot_verdict == swapped_verdict
    print(f"identical outputs: {'yes' if same else 'no'}")
    if openai_verdict != parrot_verdict:
        print(f"== ChatOpenAI's verdict ==\n{openai_verdict.strip()}")


if __name__ == "__main__":
    main()
