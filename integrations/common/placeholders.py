"""Placeholders: text that stands for a reply not generated yet.

A framework integration that does not wait for a reply hands the framework the text
``⟦parrot:<variable id>⟧`` instead. Steps that only carry or splice text (templates,
parsers that pass text on) keep it as it is, so a later call finds it in its prompt and
the service gets an input segment there: an edge of the graph. The brackets are no
characters that HTML or XML escaping touches. Code that must read real text gets it
first (``Placeholders.values_for`` waits for the replies).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import parrot as P
from parrot.chat_call import Stripped
from parrot.variable import SemanticVariable

PATTERN = re.compile(r"⟦parrot:([0-9a-f]{32})⟧")

Part = str | SemanticVariable


def placeholder(var: SemanticVariable) -> str:
    return f"⟦parrot:{var.id}⟧"


@dataclass
class Placeholders:
    """The replies one run deferred, by variable id; placeholders of others are plain text."""

    criterion: P.Criterion = P.LATENCY  # how a value is fetched when code must read it
    replies: dict[str, SemanticVariable] = field(default_factory=dict)

    def defer(self, var: SemanticVariable) -> str:
        self.replies[var.id] = var
        return placeholder(var)

    def split(self, text: str, *, strip_edges: bool = False) -> list[Part | Stripped]:
        """``text`` as static pieces and the variables its placeholders stand for. With
        ``strip_edges``, a variable that starts or ends the text has its value's whitespace
        removed there: ``text`` was stripped, and the value would have been with it."""
        parts: list[Part | Stripped] = []
        last = 0
        for match in PATTERN.finditer(text):
            var = self.replies.get(match.group(1))
            if var is None:  # not ours (another run's, or typed by a user): plain text
                continue
            if match.start() > last:
                parts.append(text[last:match.start()])
            parts.append(var)
            last = match.end()
        if last < len(text):
            parts.append(text[last:])
        if strip_edges and parts:
            first_var = isinstance(parts[0], SemanticVariable)
            last_var = isinstance(parts[-1], SemanticVariable)
            if len(parts) == 1 and first_var:
                parts[0] = Stripped(parts[0], "both")  # type: ignore[arg-type]
            else:
                if first_var:
                    parts[0] = Stripped(parts[0], "start")  # type: ignore[arg-type]
                if last_var:
                    parts[-1] = Stripped(parts[-1], "end")  # type: ignore[arg-type]
        return parts

    def has_any(self, texts: Iterable[str]) -> bool:
        return bool(self.wanted(texts))

    def wanted(self, texts: Iterable[str]) -> dict[str, SemanticVariable]:
        """The variables whose placeholders occur in ``texts``."""
        found = {}
        for text in texts:
            for match in PATTERN.finditer(text):
                var = self.replies.get(match.group(1))
                if var is not None:
                    found[var.id] = var
        return found

    def values_for(self, texts: Iterable[str]) -> dict[str, str]:
        """The real values of the placeholders in ``texts`` (waits for their calls)."""
        wanted = self.wanted(texts)
        for var in wanted.values():  # all before the first get: one post may bring every value
            var.will_get(self.criterion)
        return {vid: var.get(perf=self.criterion) for vid, var in wanted.items()}

    async def avalues_for(self, texts: Iterable[str]) -> dict[str, str]:
        wanted = self.wanted(texts)
        values = await asyncio.gather(*(var.aget(perf=self.criterion) for var in wanted.values()))
        return dict(zip(wanted, values, strict=True))


def substitute(text: str, values: dict[str, str]) -> str:
    """``text`` with each placeholder in ``values`` replaced by its value."""
    return PATTERN.sub(lambda m: values.get(m.group(1), m.group(0)), text) if values else text
