"""Prompt rendering for calls: a template call's static start, and chat calls (messages
whose contents mix static text and input variables).

The prompt is the model's chat template applied to the messages with every input's
value in place, tokenized whole: the same text, and so the same token ids, as
``/v1/chat/completions`` sends for those messages. (A template call instead splices
in the ids its producer generated; a chat template may trim or reshape contents,
and tokens can merge across a boundary, so only the whole rendering is exact.)

Which prompt text is static is still known before any input is: rendering once with
a unique marker in place of each input splits the prompt into template/message text
and inputs. The text before the first input is the call's static prefix, which the
service pins for pending calls and matches against engine caches.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from parrot.schemas import CallDecl, InputSegment, MessageDecl, TextSegment
from parrot.service.engine.base import InvalidRequestError
from parrot.service.engine.tokenizer import ModelTokenizer
from parrot.service.errors import BadRequestError

PromptPiece = str | InputSegment  # static prompt text, or an input whose value goes there

# A call's static prefix is computed on the event loop at submission, and only guides prefix
# pins and placement: beyond this many characters of static text, only this much of it is
# tokenized (a longer prefix would change nothing for pins, and a huge one would stall the loop).
STATIC_PREFIX_CHARS = 16_384


def _encode_head(tokenizer: ModelTokenizer, text: str,
                 limit: int = STATIC_PREFIX_CHARS) -> tuple[list[int], bool]:
    """Token ids of ``text``, or of its first ``limit`` characters less the last token (which
    may merge with what follows); and whether it was cut."""
    if len(text) <= limit:
        return tokenizer.encode(text), False
    return tokenizer.encode(text[:limit])[:-1], True


def template_messages(messages: list[MessageDecl],
                      fill: Callable[[InputSegment], str]) -> list[dict[str, str]]:
    """The messages as a chat template takes them, each input replaced by ``fill(input)``;
    ``developer`` is OpenAI's newer name for ``system``, as on the OpenAI routes."""
    out = []
    for message in messages:
        content = "".join(s.text if isinstance(s, TextSegment) else fill(s) for s in message.content)
        entry = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def render(tokenizer: ModelTokenizer, messages: list[dict[str, str]]) -> str:
    """The chat template's text; a template that raises (e.g. roles must alternate) is a 400."""
    try:
        return tokenizer.render_chat_template(messages)
    except InvalidRequestError:  # the model has no chat template
        raise
    except Exception as exc:
        raise BadRequestError(f"the chat template rejected these messages: {exc}",
                              param="messages") from exc


def chat_messages(messages: list[MessageDecl], values: dict[str, str]) -> list[dict[str, str]]:
    """The messages of a chat call whose inputs have ``values`` (by variable id)."""
    return template_messages(messages, lambda s: s.apply(values[s.var]))


def encode_chat(tokenizer: ModelTokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt of rendered chat messages, tokenized whole."""
    return tokenizer.encode(render(tokenizer, messages))


def layout(tokenizer: ModelTokenizer, messages: list[MessageDecl]) -> list[PromptPiece]:
    """The rendered prompt as static text and the inputs in it, in prompt order."""
    marker = f"@@parrot-input-{uuid.uuid4().hex}-"
    inputs: list[InputSegment] = []

    def place(segment: InputSegment) -> str:
        inputs.append(segment)
        return f"{marker}{len(inputs) - 1}@@"

    text = render(tokenizer, template_messages(messages, place))
    pieces: list[PromptPiece] = []
    for i, part in enumerate(re.split(f"{re.escape(marker)}(\\d+)@@", text)):
        if i % 2:
            pieces.append(inputs[int(part)])
        elif part:
            pieces.append(part)
    return pieces


def static_prefix(tokenizer: ModelTokenizer, decl: CallDecl) -> list[int]:
    """The prompt tokens of a call known before any input is set. A chat call's messages are
    rendered here, once per call, so a template that refuses them is a 400 at submission."""
    if decl.messages is not None:
        pieces = layout(tokenizer, decl.messages)
        static = [p for p in pieces if isinstance(p, str)]
        if len(static) == len(pieces):  # no inputs: the whole prompt is known
            return _encode_head(tokenizer, "".join(static))[0]
        head = pieces[0] if isinstance(pieces[0], str) else ""
        ids, cut = _encode_head(tokenizer, head)
        return ids if cut else ids[:-1]  # the last token may merge with the input's text
    tokens = list(tokenizer.prompt_prefix_ids)
    budget = STATIC_PREFIX_CHARS
    for segment in decl.segments:
        if not isinstance(segment, TextSegment) or budget <= 0:
            break
        ids, cut = _encode_head(tokenizer, segment.text, budget)  # segment by segment, as the
        tokens += ids                                             # prompt is built
        if cut:
            break
        budget -= len(segment.text)
    return tokens
