"""What ``parrot generate`` and ``parrot chat`` send: to a running service over its OpenAI routes
(streamed), or to a builtin engine loaded in this process. Both stream text as it is generated."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TextIO

import httpx

if TYPE_CHECKING:
    from parrot.service.engine.builtin.engine import BuiltinEngine

Messages = list[dict[str, str]]
# A reply source: the conversation so far (or a plain prompt, for a chat template off) ->
# the reply's text pieces as they come.
ReplySource = Callable[[Messages | str], AsyncIterator[str]]

EXIT_COMMANDS = ("/exit", "/bye", "/quit")


class ClientError(RuntimeError):
    """The service could not be reached, or refused the request; the message is one line."""


class ServiceClient:
    """Streams replies from a running Parrot service's OpenAI-compatible routes."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 **sampling: Any) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):  # the OpenAI clients' base URL, accepted as well
            self.base_url = self.base_url[:-3]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.sampling = {k: v for k, v in sampling.items() if v is not None}

    def check(self) -> None:
        """The service answers (and accepts the key), or ClientError: before a chat, not at its first turn."""
        try:
            resp = httpx.get(f"{self.base_url}/v1/models", headers=self.headers, timeout=30)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code != 200:
            raise ClientError(f"the service at {self.base_url} answered {resp.status_code}: "
                              f"{_error_message(resp.text)}")

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        return ClientError(f"cannot reach a Parrot service at {self.base_url} ({_reason(exc)}); start "
                           "one with `parrot serve`, or leave out --url to run the model in this process")

    async def reply(self, conversation: Messages | str) -> AsyncIterator[str]:
        body: dict[str, Any] = {**self.sampling, "stream": True}
        if isinstance(conversation, str):
            route, body["prompt"] = "/v1/completions", conversation
        else:
            route, body["messages"] = "/v1/chat/completions", conversation
        if self.model is not None:
            body["model"] = self.model
        url = f"{self.base_url}{route}"
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as http:
                async with http.stream("POST", url, json=body, headers=self.headers) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise ClientError(f"the service at {self.base_url} answered {resp.status_code}: "
                                          f"{_error_message(resp.text)}")
                    async for line in resp.aiter_lines():
                        text = _delta(line)
                        if text:
                            yield text
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None


def engine_replies(engine: BuiltinEngine, **sampling: Any) -> ReplySource:
    """Replies from a builtin engine in this process (it must be started)."""
    from parrot.service.engine.base import GenerateRequest, InvalidRequestError, SamplingParams

    params = SamplingParams(**sampling)

    async def reply(conversation: Messages | str) -> AsyncIterator[str]:
        ids = (engine.tokenizer.encode(conversation) if isinstance(conversation, str)
               else engine.tokenizer.apply_chat_template(conversation))
        try:
            async for out in engine.generate(GenerateRequest(engine.new_request_id(), ids, params)):
                if out.error:
                    raise ClientError(out.error)
                if out.text:
                    yield out.text
        except InvalidRequestError as exc:  # e.g. a conversation longer than the model's context
            raise ClientError(str(exc)) from None

    return reply


async def print_reply(source: ReplySource, conversation: Messages | str, out: TextIO) -> str:
    """Stream one reply to ``out`` as it comes, ending with a newline; return its text."""
    pieces = []
    async for text in source(conversation):
        pieces.append(text)
        out.write(text)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(pieces)


async def chat_loop(source: ReplySource, system: str | None, inp: TextIO, out: TextIO,
                    err: TextIO) -> int:
    """A conversation: each line read is a user turn, answered in a stream and kept in the history.

    ``/exit`` (or ``/bye``) or the end of input ends it; ``/clear`` forgets the history. Returns the
    number of turns answered."""
    interactive = inp.isatty()
    history: Messages = [{"role": "system", "content": system}] if system else []
    if interactive:
        err.write("Chatting; /exit or Ctrl-D ends, /clear forgets the conversation.\n")
    turns = 0
    while True:
        if interactive:
            err.write(">>> ")
            err.flush()
        line = await _read_line(inp)
        if not line:  # end of input
            if interactive:
                err.write("\n")
            return turns
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return turns
        if text == "/clear":
            history = history[:1] if system else []
            continue
        if text.startswith("/"):
            err.write(f"unknown command {text.split()[0]}; use /exit or /clear\n")
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": await print_reply(source, history, out)})
        turns += 1


async def _read_line(inp: TextIO) -> str:
    """The next line of ``inp``, read in a daemon thread: a thread of asyncio's executor blocked in
    readline would hold the process after Ctrl-C until Enter is pressed."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def read() -> None:
        error: BaseException | None = None
        try:
            text = inp.readline()
        except (OSError, ValueError) as exc:  # closed under us
            text, error = "", exc
        try:
            loop.call_soon_threadsafe(_settle, line, text, error)
        except RuntimeError:  # the loop is gone: the chat ended meanwhile
            pass

    threading.Thread(target=read, name="parrot-chat-input", daemon=True).start()
    return await line


def _settle(future: Any, text: str, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(text)


def _delta(line: str) -> str:
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return ""
    chunk = json.loads(data)
    if "error" in chunk:
        raise ClientError(_error_message(data))
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


def _error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body.strip()[:300] or "no details"
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or body)


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else "no answer"

