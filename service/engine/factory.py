"""Build engines from specs: ``--engine KIND=URL`` on the command line, or ``[[engines]]`` tables
in a TOML config file (which also take per-engine options).

    [[engines]]
    kind = "sglang"                     # an SGLang server (native API), one per GPU or TP group
    url = "http://gpu-1:30000"
    tokenizer = "/models/Llama-3.1-8B-Instruct"   # where the service finds the model's tokenizer

    [[engines]]
    kind = "openai"                     # any OpenAI-compatible server
    url = "http://vllm-1:8000/v1"
    model = "meta-llama/Llama-3.1-8B-Instruct"
    api_key_env = "VLLM_API_KEY"        # or api_key = "..."
    max_concurrency = 32

The service builds every prompt as token ids, so it needs each served model's tokenizer.
For a server, the tokenizer is found, in order: the spec's ``tokenizer`` (a local Hugging
Face folder, a ``.gguf`` file or the default model's name); the model the server reports,
when that is the default model or a folder on this host; the tokenizer of an engine of
this service that serves a model of the same name. Otherwise start-up stops and says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from parrot.service.config_files import first_error, read_toml
from parrot.service.engine.base import Engine
from parrot.service.engine.tokenizer import ModelTokenizer

ServerKind = Literal["sglang", "openai"]


class EngineSpecError(ValueError):
    """A spec or config file that cannot be used, or a server that cannot be reached at start-up;
    its message says which and why, in one line."""


class EngineSpec(BaseModel):
    """One engine server behind the service, with its options."""

    model_config = ConfigDict(extra="forbid")

    kind: ServerKind
    url: str = Field(description="SGLang: http://HOST:PORT; OpenAI-compatible: the base URL ending in /v1")
    model: str | None = Field(None, description="openai: the upstream model to use; sglang: the name to "
                                                "serve it as [default: what the server reports]")
    tokenizer: str | None = Field(None, description="a local HF folder, a .gguf file or the default model")
    max_context_len: int | None = Field(None, gt=0)
    api_key: str | None = None
    api_key_env: str | None = Field(None, description="read the API key from this environment variable")
    max_concurrency: int = Field(16, gt=0, description="openai: requests in flight at once")
    max_retries: int = Field(3, ge=0, description="openai: retries on 429, 5xx and connection errors")
    timeout_s: float = Field(600.0, gt=0, description="openai: read timeout of one request")
    prompt_format: Literal["auto", "tokens", "text", "chat"] = "auto"

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url.rstrip("/")

    def resolved_api_key(self) -> str | None:
        if self.api_key_env is None:
            return self.api_key
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EngineSpecError(f"the environment variable {self.api_key_env} (the API key of "
                                  f"{self.url}) is not set")
        return key


class ServiceConfig(BaseModel):
    """A ``--config`` TOML file: the engines, and whether to run the builtin engine too."""

    model_config = ConfigDict(extra="forbid")

    local_engine: bool | None = Field(None, description="run the builtin engine in this process too")
    engines: list[EngineSpec] = Field(default_factory=list)


def parse_engine_spec(text: str) -> EngineSpec:
    """``sglang=http://HOST:PORT`` or ``openai=http://HOST:PORT/v1``."""
    kind, sep, url = text.partition("=")
    if not sep or not url:
        raise EngineSpecError(f"--engine {text!r}: expected KIND=URL, e.g. sglang=http://127.0.0.1:30000 "
                              f"or openai=http://127.0.0.1:8000/v1")
    return _validated({"kind": kind.strip(), "url": url.strip()}, f"--engine {text!r}")


def load_config(path: str | Path) -> ServiceConfig:
    data = read_toml(path, "config file", EngineSpecError)
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        raise EngineSpecError(f"{path}: {_first_error(exc)}") from None


def _validated(data: dict[str, Any], where: str) -> EngineSpec:
    try:
        return EngineSpec.model_validate(data)
    except ValidationError as exc:
        raise EngineSpecError(f"{where}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    loc, msg, err = first_error(exc)
    if err["type"] == "literal_error" and loc.endswith("kind"):
        msg = f"unknown engine kind {err['input']!r}; use sglang or openai"
    return f"{loc}: {msg}" if loc else msg


# ---- what a server serves ------------------------------------------------------------------
def probe(spec: EngineSpec, timeout_s: float = 5.0) -> tuple[str, str | None]:
    """(model name, model path if the server says) of the server behind ``spec``; an
    unreachable server or one that does not answer as its kind does is an ``EngineSpecError``."""
    headers = {"Authorization": f"Bearer {key}"} if (key := spec.resolved_api_key()) else {}
    path = "/server_info" if spec.kind == "sglang" else "/models"
    try:
        resp = httpx.get(spec.url + path, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise EngineSpecError(f"the {spec.kind} engine at {spec.url} is unreachable: "
                              f"{type(exc).__name__}") from None
    if resp.status_code in (401, 403):
        raise EngineSpecError(f"the {spec.kind} engine at {spec.url} refused the API key "
                              f"(HTTP {resp.status_code})")
    try:
        if resp.status_code != 200:
            raise ValueError(f"HTTP {resp.status_code}")
        body = resp.json()
        if spec.kind == "sglang":
            model_path = body.get("model_path") or body.get("tokenizer_path")
            name = body.get("served_model_name")
            if not name or name == model_path:  # SGLang's default name is the model's path
                name = Path(str(model_path)).name
            return spec.model or str(name), model_path and str(model_path)
        listed = [m["id"] for m in body["data"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EngineSpecError(f"{spec.url}{path} did not answer as an {spec.kind} server does "
                              f"({exc})") from None
    if spec.model is not None:
        if spec.model not in listed:
            raise EngineSpecError(f"the openai engine at {spec.url} does not serve {spec.model!r}; it "
                                  f"serves {', '.join(map(repr, listed)) or 'nothing'}")
        return spec.model, None
    if not listed:
        raise EngineSpecError(f"the openai engine at {spec.url} lists no models")
    return listed[0], None


def load_tokenizer(model: str, name: str) -> ModelTokenizer:
    """The tokenizer of a model argument (the default model, a HF folder or a .gguf file)."""
    from parrot.service.engine.builtin import loader

    folder = Path(model).expanduser()
    try:
        if not folder.is_dir():  # the default model or a .gguf file: from its converted folder
            _, folder = loader.resolve_model(model)
        return ModelTokenizer.from_path(folder, name)
    except (OSError, ValueError) as exc:  # FileNotFoundError, or a folder without tokenizer files
        raise EngineSpecError(f"tokenizer {model!r}: {str(exc).splitlines()[0]}") from None


def find_tokenizer(spec: EngineSpec, served: str, model_path: str | None,
                   engines: Sequence[Engine] = ()) -> ModelTokenizer:
    from parrot.service.engine.builtin.loader import DEFAULT_MODEL

    if spec.tokenizer is not None:
        return load_tokenizer(spec.tokenizer, served)
    for candidate in (served, model_path):
        if candidate and (candidate == DEFAULT_MODEL or Path(candidate).expanduser().is_dir()):
            return load_tokenizer(candidate, served)
    for engine in engines:
        if engine.model_name == served:
            return engine.tokenizer
    raise EngineSpecError(f"the {spec.kind} engine at {spec.url} serves {served!r}, whose tokenizer is "
                          f"not on this host: give its engine a tokenizer (a local folder with the "
                          f"model's tokenizer files) in a --config file")


def build_engine(spec: EngineSpec, engines: Sequence[Engine] = ()) -> Engine:
    """An engine for ``spec`` (not started yet), after checking that its server answers; its
    tokenizer comes from ``spec``, the server's model, or one of ``engines`` (see above)."""
    served, model_path = probe(spec)
    tokenizer = find_tokenizer(spec, served, model_path, engines)
    if spec.kind == "sglang":
        from parrot.service.engine.sglang import SGLangEngine

        return SGLangEngine(spec.url, tokenizer=tokenizer, model_name=served,
                            max_context_len=spec.max_context_len)
    from parrot.service.engine.openai import OpenAIEngine

    return OpenAIEngine(spec.url, tokenizer=tokenizer, model=served, api_key=spec.resolved_api_key(),
                        max_concurrency=spec.max_concurrency, max_retries=spec.max_retries,
                        timeout_s=spec.timeout_s, prompt_format=spec.prompt_format,
                        max_context_len=spec.max_context_len)
