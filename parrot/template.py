"""Prompt templates: text with ``{{input:name}}`` and ``{{output:name}}`` placeholders.

A template parses into segments (static text, inputs, outputs) that keep static
text and variables apart, so the service can see which prompt text is shared.
Plain ``{{name}}`` placeholders are accepted too; their kind then comes from the
function's parameter annotations (``P.Input`` / ``P.Output``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Kind = Literal["input", "output"]


class TemplateError(ValueError):
    """A template that cannot be parsed: the message names the bad placeholder."""


@dataclass(frozen=True)
class Placeholder:
    kind: Kind | None  # None for a plain {{name}}: resolved from annotations
    name: str


Piece = str | Placeholder


def parse_template(text: str) -> list[Piece]:
    """Split ``text`` into static strings and placeholders, in order."""
    pieces: list[Piece] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
        pieces.append(_placeholder(m.group(1).strip(), m.group(0)))
        pos = m.end()
    rest = text[pos:]
    if "{{" in rest or "}}" in rest:
        raise TemplateError(f"unbalanced braces in template near {rest[:40]!r}")
    if rest:
        pieces.append(rest)
    return pieces


def _placeholder(body: str, raw: str) -> Placeholder:
    kind: str | None = None
    name = body
    if ":" in body:
        kind, name = (s.strip() for s in body.split(":", 1))
        if kind not in ("input", "output"):
            raise TemplateError(f"placeholder {raw}: kind must be 'input' or 'output', not {kind!r}")
    if not _NAME.match(name):
        raise TemplateError(f"placeholder {raw}: {name!r} is not a valid variable name")
    return Placeholder(kind, name)  # type: ignore[arg-type]


def resolve_kinds(pieces: list[Piece], kinds: dict[str, Kind]) -> list[Piece]:
    """Fill in the kind of plain placeholders from ``kinds`` and check every name is known."""
    out: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, Placeholder):
            known = kinds.get(piece.name)
            if known is None:
                raise TemplateError(f"placeholder {{{{{piece.name}}}}} names no parameter")
            if piece.kind is not None and piece.kind != known:
                raise TemplateError(
                    f"placeholder {{{{{piece.kind}:{piece.name}}}}} but the parameter is an {known}"
                )
            piece = Placeholder(known, piece.name)
        out.append(piece)
    return out
