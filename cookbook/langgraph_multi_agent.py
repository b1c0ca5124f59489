"""A multi-agent LangGraph workflow, with ChatOpenAI and with ChatParrot.

A planner drafts a plan; a ``Send`` fan-out then asks several specialists for advice in
parallel, in rounds: every agent sees the team's system prompt and the whole conversation
so far (the task, the plan, the earlier rounds' advice), so their prompts share a long,
growing prefix. A writer turns it all into the final brief. The same graph code runs
twice on the same model: with ``ChatOpenAI`` on the service's OpenAI routes (LangGraph's
threads send one request per agent) and with ``ChatParrot``, whose calls of one step
(the specialists of a round) reach the service as one graph in one session.

    pip install -e ".[client]"                          # what it imports (and serve, to run embedded)
    python cookbook/langgraph_multi_agent.py            # embedded service, default model
    python cookbook/langgraph_multi_agent.py --url http://127.0.0.1:8000 --rounds 1
"""

from __future__ import annotations

import argparse
import operator
import re
import time
from collections.abc import Mapping
from typing import Annotated, Any, TypedDict

from _services import served_model, service
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from parrot.integrations.langchain import ChatParrot

TEAM = """\
You are part of a small team that plans product features for a note-taking app used by students and
small companies. The app runs on phones, tablets and the web; notes sync through the company's cloud.
The team works in one shared conversation: a planner writes a plan, specialists advise on it, and a
writer turns the discussion into a brief for the engineers. Everyone answers in two or three short,
concrete sentences, speaks only for their own role, and builds on what the others said before.
The roles:
- Planner: decides what users need, what is in scope for the first release, and what is not.
- Engineer: explains how to build it on the existing sync service and what it costs in weeks.
- Designer: describes the screens, the words on the buttons, and what users see when things fail.
- Security reviewer: points out privacy, security and abuse risks and asks for changes.
- Support lead: says what customers will ask about and what the help page must explain.
- Writer: summarizes the decisions, the open questions and the next steps.
"""

TASK = "Plan a feature that lets a user share a notebook with other people through a link."
SPECIALISTS = ["Engineer", "Designer", "Security reviewer", "Support lead"]
ROLES = ["Planner", *SPECIALISTS, "Writer"]
# Labels a reply may start with: "Writer:", "**Engineer:**", "Engineer: Engineer:" ...
_ROLE_NAMES = "|".join(map(re.escape, ROLES))
_LABELS = re.compile(rf"^(?:[\s*_]*(?:{_ROLE_NAMES})[\s*_]*:[\s*_]*)+", re.IGNORECASE)


def unlabeled(reply: str) -> str:
    """A reply without the role labels it starts with. The conversation labels every message
    itself ("Engineer: ..."), and models imitate that, so a reply kept with its own label would be
    shown as "Engineer: Engineer: ...", and the labels would pile up round after round."""
    return _LABELS.sub("", reply.strip(), count=1).strip()


class Advice(TypedDict):
    """What one specialist's task gets: the conversation so far and its role."""

    task: str
    plan: str
    notes: list[tuple[str, str]]
    role: str


class Meeting(TypedDict):
    task: str
    rounds: int
    round: int
    plan: str
    notes: Annotated[list[tuple[str, str]], operator.add]  # (role, message), in speaking order
    brief: str


def conversation(state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The messages every agent sees: the team's prompt, the task, and everything said so far."""
    messages = [("system", TEAM), ("user", f"Task: {state['task']}")]
    if state.get("plan"):
        messages.append(("assistant", f"Planner: {state['plan']}"))
    for role, text in state.get("notes", []):
        messages += [("user", f"{role}, your advice?"), ("assistant", f"{role}: {text}")]
    return messages


def build_graph(llm: BaseChatModel) -> Any:
    """The workflow, the same for any chat model."""

    def ask(state: Mapping[str, Any], request: str) -> str:
        reply = llm.invoke([*conversation(state), ("user", request)])
        return unlabeled(str(reply.content))

    def planner(state: Meeting) -> dict:
        return {"plan": ask(state, "Planner, write the plan for the first release."), "round": 0}

    def advise(state: Advice) -> dict:
        role = state["role"]
        return {"notes": [(role, ask(state, f"{role}, your advice?"))]}

    def next_round(state: Meeting) -> dict:
        return {"round": state["round"] + 1}

    def writer(state: Meeting) -> dict:
        return {"brief": ask(state, "Writer, write the brief: decisions, open questions, next steps.")}

    def to_specialists(state: Meeting) -> list[Send] | str:
        if state["round"] >= state["rounds"]:
            return "writer"
        shared = {"task": state["task"], "plan": state["plan"], "notes": state["notes"]}
        return [Send("advise", {**shared, "role": role}) for role in SPECIALISTS]

    builder = StateGraph(Meeting)
    builder.add_node("planner", planner)
    builder.add_node("advise", advise, input_schema=Advice)
    builder.add_node("next_round", next_round)
    builder.add_node("writer", writer)
    builder.add_edge(START, "planner")
    builder.add_conditional_edges("planner", to_specialists, ["advise", "writer"])
    builder.add_edge("advise", "next_round")
    builder.add_conditional_edges("next_round", to_specialists, ["advise", "writer"])
    builder.add_edge("writer", END)
    return builder.compile()


def run(llm: BaseChatModel, rounds: int) -> tuple[dict, float]:
    """The meeting's final state and its wall time, after a short warm-up call of its own."""
    llm.invoke("Say hello.", max_tokens=4)
    started = time.perf_counter()
    state = build_graph(llm).invoke({"task": TASK, "rounds": rounds, "notes": []})
    return state, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Parrot service (default: start one in this process)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of advice from the specialists")
    parser.add_argument("--max-tokens", type=int, default=40, help="the longest message")
    args = parser.parse_args()

    with service(args.url) as url:
        parrot = ChatParrot(base_url=url, temperature=0, max_tokens=args.max_tokens)
        parrot_state, parrot_s = run(parrot, args.rounds)
    with service(args.url) as url:
        openai = ChatOpenAI(base_url=f"{url}/v1", api_key="none", model=served_model(url), temperature=0,
                            max_tokens=args.max_tokens)
        openai_state, openai_s = run(openai, args.rounds)

    print(f"Planner: {parrot_state['plan']}")
    for role, text in parrot_state["notes"]:
        print(f"{role}: {text}")
    print(f"\n== brief ==\n{parrot_state['brief']}\n")
    calls = 2 + args.rounds * len(SPECIALISTS)
    print(f"ChatOpenAI (OpenAI routes) wall time: {openai_s:.2f} s")
    print(f"ChatParrot (step graphs)   wall time: {parrot_s:.2f} s")
    print(f"speed-up: {openai_s / parrot_s:.2f}x ({calls} LLM calls, {args.rounds} rounds of "
          f"{len(SPECIALISTS)} specialists in parallel)")
    if args.url is not None:
        print("(one service for both runs: ChatOpenAI ran second, its prompts already in the prefix cache)")
    same = (parrot_state["plan"], parrot_state["notes"], parrot_state["brief"]) == (
        openai_state["plan"], openai_state["notes"], openai_state["brief"])
    print(f"identical outputs: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
