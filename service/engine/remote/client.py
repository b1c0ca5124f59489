"""An engine in another process (``parrot engine``), reached over HTTP.

The service tokenizes locally with the engine's own tokenizer (fetched once from
``/info``), so prompts are built from token ids exactly as for an in-process engine.
Any transport failure becomes ``EngineUnavailableError``: the caller may re-run the
work elsewhere, and the registry drops the engine.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from parrot.service.engine.base import (
    Engine,
    EngineUnavailableError,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    Load,
    Objective,
)
from parrot.service.engine.remote.protocol import (
    EngineInfo,
    Flushed,
    GenerateBody,
    LoadInfo,
    PinBody,
    PinRef,
    PrefillBody,
    PriorityBody,
    RequestRef,
)
from parrot.service.engine.tokenizer import ModelTokenizer

# An engine's /info carries its tokenizer files (base64): a few MB for common models.
MAX_INFO_BYTES = 64 * 2**20


def load_tokenizer_files(files: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="parrot-tokenizer-") as tmp:
        for name, content in files.items():
            target = Path(tmp) / Path(name).name  # never a path outside tmp
            target.write_bytes(base64.b64decode(content))
        return AutoTokenizer.from_pretrained(tmp)


class RemoteEngine(Engine):
    kind = "remote"
    supports_prefix_control = True
    computes_shared_prefix_once = True  # a builtin engine in another process

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(connect_timeout_s, read=None)
        )
        self._load = Load(0, 0, 0, 0, 0)
        self.model_name = ""
        self.max_context_len = 0
        self.closed = False

    async def start(self) -> None:
        """Fetch the engine's model, limits and tokenizer."""
        info = EngineInfo.model_validate_json(await self._get_capped("/info", MAX_INFO_BYTES))
        self.model_name, self.max_context_len = info.model, info.max_context_len
        hf = await asyncio.to_thread(load_tokenizer_files, info.tokenizer_files)
        self.tokenizer = ModelTokenizer(hf, self.model_name)

    async def shutdown(self) -> None:
        """Close the connection; streams still open fail with ``EngineUnavailableError``."""
        self.closed = True
        await self._client.aclose()

    def load(self) -> Load:
        return self._load

    async def health(self) -> bool:
        try:
            return (await self._client.get("/healthz")).status_code == 200
        except (httpx.TransportError, RuntimeError):
            return False

    def update_load(self, load: LoadInfo) -> None:
        self._load = Load(**load.model_dump())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        body = GenerateBody(
            rid=request.request_id, input_ids=request.prompt_token_ids, sampling_params=request.sampling,
            objective=request.objective, priority=request.priority, group_id=request.group_id,
        )
        finished = False
        try:
            async with self._client.stream("POST", "/generate", content=body.model_dump_json(),
                                           headers={"content-type": "application/json"}) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _http_error(resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    out = GenerateOutput(**json.loads(line[len("data: "):]))
                    finished = out.finished
                    yield out
        except (httpx.TransportError, RuntimeError) as exc:  # RuntimeError: the client was closed
            raise EngineUnavailableError(f"engine at {self.url} is unreachable: {exc}") from exc
        if not finished:
            raise EngineUnavailableError(f"engine at {self.url} ended a request without finishing it")

    async def abort(self, request_id: str) -> None:
        await self._quiet_post("/abort", RequestRef(rid=request_id).model_dump())

    async def set_priority(self, request_id: str, priority: int, objective: Objective) -> None:
        await self._quiet_post(
            "/priority", PriorityBody(rid=request_id, priority=priority, objective=objective).model_dump()
        )

    async def pin_prefix(self, pin_id: str, token_ids: list[int]) -> None:
        await self._quiet_post("/pin_prefix", PinBody(pin_id=pin_id, input_ids=token_ids).model_dump())

    async def unpin_prefix(self, pin_id: str) -> None:
        await self._quiet_post("/unpin_prefix", PinRef(pin_id=pin_id).model_dump())

    async def flush_cache(self) -> bool:
        try:
            resp = await self._client.post("/flush_cache")
        except (httpx.TransportError, RuntimeError) as exc:  # RuntimeError: the client was closed
            raise EngineUnavailableError(f"engine at {self.url} is unreachable: {exc}") from exc
        if resp.status_code != 200:
            raise _http_error(resp)
        return Flushed.model_validate_json(resp.content).flushed

    async def prefill(self, token_ids: list[int], priority: int = 0) -> None:
        if not token_ids:
            return
        body = PrefillBody(input_ids=token_ids, priority=priority)
        try:
            resp = await self._client.post("/prefill", json=body.model_dump())
        except (httpx.TransportError, RuntimeError) as exc:  # RuntimeError: the client was closed
            raise EngineUnavailableError(f"engine at {self.url} is unreachable: {exc}") from exc
        if resp.status_code != 200:
            raise _http_error(resp)

    async def _quiet_post(self, path: str, body: dict) -> None:
        # Hints and aborts: an engine that is gone has nothing left to abort or re-rank.
        if self.closed:
            return
        try:
            await self._client.post(path, json=body)
        except (httpx.TransportError, RuntimeError):
            pass

    async def _get_capped(self, path: str, max_bytes: int) -> bytes:
        """The body of a GET, read no further than ``max_bytes`` (the URL may be anything a
        client registered: a larger answer is refused, not held in memory)."""
        try:
            async with self._client.stream("GET", path) as resp:
                if resp.status_code != 200:
                    raise EngineUnavailableError(f"engine at {self.url} answered HTTP {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise EngineUnavailableError(f"engine at {self.url} answered more than "
                                                     f"{max_bytes} bytes")
                return bytes(body)
        except httpx.TransportError as exc:
            raise EngineUnavailableError(f"engine at {self.url} is unreachable: {exc}") from exc


def _http_error(resp: httpx.Response) -> Exception:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text or f"HTTP {resp.status_code}"
    if 400 <= resp.status_code < 500:
        return InvalidRequestError(message)
    return EngineUnavailableError(f"engine failed with HTTP {resp.status_code}: {message}")
