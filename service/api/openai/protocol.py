"""Wire schemas of the OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models.

Requests forbid unknown fields, so a parameter this server does not implement is a
400 that names it instead of being silently ignored. Parameters the official clients
(``openai``, ``langchain-openai``, Semantic Kernel) send with neutral values are
accepted when neutral (``n=1``, ``presence_penalty=0``, ``logit_bias={}``,
``logprobs=false``, ``tool_choice="none"``) and rejected otherwise. vLLM's extra
sampling fields ``top_k``, ``stop_token_ids`` and ``ignore_eos`` are accepted too.

``response_format`` is ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON
object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
(JSON valid against the schema), on both completion routes; the engine enforces it
while sampling and rejects a schema it cannot use.

``max_tokens`` left out means "the rest of the context window, at most
``DEFAULT_MAX_TOKENS``" (see ``serving.py``).

Edge checks (``parrot.limits``): ``seed`` is any 64-bit value, signed or unsigned (vLLM
takes signed, some clients send unsigned); ``temperature`` below 1e-5 is greedy, as
vLLM's ``_SAMPLING_EPS``; at most 256 prompts per completion request and 16 stop
strings; bodies over 8 MiB are a 413 (``service/api/limits.py``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from parrot import limits

_NOT_SUPPORTED = "is not supported yet"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError(f"continuous_usage_stats {_NOT_SUPPORTED}")
        return v


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJSONObject(_Request):
    type: Literal["json_object"]


class JSONSchemaSpec(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # ``schema`` would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormatJSONSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="served model name; default: the served model")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1.0; below 1e-5 greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 keeps every token")
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=limits.MAX_STOP_STRINGS)
    ignore_eos: bool | None = False
    seed: int | None = Field(None, ge=limits.MIN_SEED, le=limits.MAX_SEED)  # 64 bits, signed or not
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v:
            raise ValueError(f"{info.field_name} {_NOT_SUPPORTED} (only 0 is accepted)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError(f"logit_bias {_NOT_SUPPORTED}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must be non-empty")
        if isinstance(v, list) and len(v) > limits.MAX_STOP_STRINGS:
            raise ValueError(f"at most {limits.MAX_STOP_STRINGS} stop strings are allowed")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the output must follow, if any."""
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJSONSchema):
            return fmt.json_schema.schema_
        if isinstance(fmt, ResponseFormatJSONObject):
            return {"type": "object"}
        return None


# ---- /v1/completions --------------------------------------------------------------

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        # One clear message instead of one error per member of the union.
        def is_ids(xs: Any) -> bool:
            return isinstance(xs, list) and len(xs) > 0 and all(
                isinstance(t, int) and not isinstance(t, bool) for t in xs)

        ok = isinstance(v, str) or is_ids(v) or (
            isinstance(v, list) and len(v) > 0
            and (all(isinstance(x, str) for x in v) or all(is_ids(x) for x in v))
        )
        if not ok:
            raise ValueError("prompt must be a string, a non-empty list of strings, a list of "
                             "token ids, or a list of non-empty token-id lists")
        if isinstance(v, list) and not is_ids(v) and len(v) > limits.MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"at most {limits.MAX_PROMPTS_PER_REQUEST} prompts are allowed in one "
                             f"request (got {len(v)})")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError(f"logprobs {_NOT_SUPPORTED}")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError(f"echo {_NOT_SUPPORTED}")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError(f"suffix {_NOT_SUPPORTED}")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only best_of=1 is supported")
        return v


# ---- /v1/chat/completions -----------------------------------------------------------


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"only text content parts are supported (got {kind!r})")
        return v

    @model_validator(mode="after")
    def _content_unless_assistant(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError(f"tool calls {_NOT_SUPPORTED}")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template_dict(self) -> dict[str, str]:
        """The message as a chat template expects it; ``developer`` is OpenAI's new ``system``."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name:
            out["name"] = self.name
        return out


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=limits.MAX_SEGMENTS_PER_CALL)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # meaningless without tools, so harmless
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError(f"logprobs {_NOT_SUPPORTED}")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError(f"top_logprobs {_NOT_SUPPORTED}")
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError(f"tools / function calling {_NOT_SUPPORTED}")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v is not None and v != "none":
            raise ValueError(f"tool choice {_NOT_SUPPORTED}; only 'none'")
        return v

    @property
    def max_output_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's current name; max_tokens its deprecated alias.
        return self.max_completion_tokens or self.max_tokens


# ---- responses ------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort"]


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _only_set(self) -> dict[str, str]:
        # A delta carries only what changed: ``{}`` on the closing chunk.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---- /v1/models -----------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "parrot"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
