"""What the service received from a chain run: its graph submissions, calls and edges."""

from __future__ import annotations

from langchain_core.prompts import ChatPromptTemplate


def posted_graphs(service) -> list[list[dict]]:
    """The calls of each ``POST /v1/graphs`` since recording started (all in one session)."""
    posts = [r.body for r in service.requests("POST", "/v1/graphs") if r.body["calls"]]
    assert len({p["session_id"] for p in posts}) <= 1
    return [p["calls"] for p in posts]


def posted_calls(service) -> list[dict]:
    return [c for g in posted_graphs(service) for c in g]


def inputs(call: dict) -> list[str]:
    segments = [s for m in call.get("messages") or [] for s in m["content"]] + call.get("segments", [])
    return [s["var"] for s in segments if s["type"] == "input"]


def output(call: dict) -> str:
    return call["output"]["var"]


def ask(text: str) -> ChatPromptTemplate:
    return ChatPromptTemplate.from_messages([("system", "You are terse."), ("user", text)])
