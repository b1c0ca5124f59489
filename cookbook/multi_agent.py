"""Multi-agent: a product manager, an engineer and a reviewer plan a feature together.

Each turn is one LLM call whose prompt is the shared brief plus the whole
conversation so far, so consecutive prompts share a growing prefix: the service
feeds earlier replies in as the tokens that were generated, and its radix prefix
cache serves that prefix instead of recomputing it. All turns are issued at once;
each reads the replies before it, so the service runs them back to back with no
client round trip. The table at the end shows how much of each prompt was cached.

    pip install -e .                                 # what it imports (embedded: serve too)
    python cookbook/multi_agent.py                   # embedded service, default model
    python cookbook/multi_agent.py --url http://127.0.0.1:8000 --rounds 3
"""

from __future__ import annotations

import argparse
import time

import parrot as P

BRIEF = """\
A small team is planning a new feature for a note-taking app: sharing a notebook with other people \
through a link. Three people take turns in the discussion, one short message each:
- Product manager: decides what users need and what is in scope.
- Engineer: explains how to build it and what it costs.
- Reviewer: points out risks (privacy, security, abuse) and asks for changes.
Each message is one or two sentences.

Conversation:
"""

AGENTS = ["Product manager", "Engineer", "Reviewer"]


def take_turn(agent: str, history: list[tuple[str, P.SemanticVariable]]) -> P.SemanticVariable:
    """Issue ``agent``'s next message; its prompt is the brief and every message so far."""
    names = [f"message_{i}" for i in range(len(history))]
    # No space after the colon: the model's words carry their leading space themselves.
    lines = [f"{who}:{{{{input:{name}}}}}\n" for (who, _), name in zip(history, names, strict=True)]
    speak = P.SemanticFunction.from_template(
        BRIEF + "".join(lines) + f"{agent}:{{{{output:message}}}}",
        name=agent.lower().replace(" ", "_"), inputs=names,
        outputs={"message": P.Output(max_tokens=48, stop=["\n"])},
    )
    return speak(*(message for _, message in history))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Parrot service (default: start one in this process)")
    parser.add_argument("--rounds", type=int, default=2, help="turns per agent")
    args = parser.parse_args()

    with P.Parrot(args.url) as vm:
        started = time.perf_counter()
        history: list[tuple[str, P.SemanticVariable]] = []
        for _ in range(args.rounds):
            for agent in AGENTS:
                history.append((agent, take_turn(agent, history)))
        history[-1][1].get(perf=P.LATENCY)  # the last turn depends on every earlier one
        elapsed = time.perf_counter() - started
        for agent, message in history:
            print(f"{agent}: {message.get().strip()}")
        calls = {c.outputs[0]: c for c in vm.graph().calls}
        print(f"\n{'turn':>4}  {'agent':<16}{'prompt tokens':>14}{'cached':>8}")
        for i, (agent, message) in enumerate(history, start=1):
            call = calls[message.id]
            print(f"{i:>4}  {agent:<16}{call.prompt_tokens:>14}{call.cached_tokens:>8}")
        print(f"\nwall time: {elapsed:.2f} s")


if __name__ == "__main__":
    main()
