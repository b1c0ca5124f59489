"""Wire schemas of the OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models.

Requests forbid unknown fields, so a parameter this server does not implement is a
400 that names it instead of being silently ignored. ``n``, ``presence_penalty``,
``frequency_penalty``, ``logit_bias`` (token id -> -100..100), ``logprobs`` /
``top_logprobs`` (chat, up to 20) and ``logprobs`` / ``echo`` (completions) work as in
OpenAI's API; vLLM's extra sampling fields ``top_k``, ``stop_token_ids``, ``ignore_eos``,
``repetition_penalty`` and ``min_tokens`` are accepted too.

``response_format`` is ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON
object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
(JSON valid against the schema), on both completion routes; the engine enforces it
while sampling and rejects a schema it cannot use.

Chat takes function ``tools`` with ``tool_choice`` (``none``, ``auto``, ``required`` or a
named function) and ``parallel_tool_calls``, ``tool`` messages and assistant ``tool_calls``
in history; a reply that may call tools is constrained JSON (``parrot.tool_calls``,
``tools.py``). ``user``, ``metadata`` and ``store: false`` are accepted (nothing is kept);
``store: true`` and the deprecated ``functions`` / ``function_call`` are a 400.

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
from parrot.tool_calls import AUTO, FunctionTool, ToolUse

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
    n: int | None = Field(1, ge=1, le=limits.MAX_CHOICES, description="choices per prompt")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=limits.MAX_STOP_STRINGS)
    ignore_eos: bool | None = False
    seed: int | None = Field(None, ge=limits.MIN_SEED, le=limits.MAX_SEED)  # 64 bits, signed or not
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, max_length=limits.MAX_LOGIT_BIAS)
    # vLLM's extras: a penalty over prompt and output tokens (1: off), and the fewest tokens
    # to generate before EOS or a stop may end the output.
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0, allow_inf_nan=False)
    min_tokens: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    user: str | None = None
    # OpenAI keeps completions made with store=true for its dashboard; nothing is kept here,
    # so only false (or absent) is accepted. metadata only labels a stored completion.
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError(f"store=true {_NOT_SUPPORTED}: completions are not kept (only false)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids (got {key!r})")
            if not -100.0 <= bias <= 100.0:  # also refuses NaN
                raise ValueError(f"logit_bias values must lie in [-100, 100] (got {bias} for {key})")
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
    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): b for k, b in (self.logit_bias or {}).items()}

    @property
    def num_choices(self) -> int:
        return self.n or 1

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
    # Log probabilities of the output tokens and this many alternatives each (OpenAI allows
    # 0..5, vLLM up to 20); with echo, of the prompt's tokens too.
    logprobs: int | None = Field(None, ge=0, le=limits.MAX_LOGPROBS)
    echo: bool | None = False  # the prompt is sent back before each choice's text
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

    @model_validator(mode="after")
    def _bounded_choices(self):
        # Each prompt's n choices are separate generations: bound them all together.
        p = self.prompt
        num_prompts = 1 if isinstance(p, str) or isinstance(p[0], int) else len(p)
        if num_prompts * self.num_choices > limits.MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"n ({self.num_choices}) times the number of prompts ({num_prompts}) must be "
                             f"at most {limits.MAX_PROMPTS_PER_REQUEST}")
        return self


# ---- /v1/chat/completions -----------------------------------------------------------


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCallParam(_Request):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCallParam(_Request):
    """A call an earlier assistant message made."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None

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
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template_dict(self) -> dict[str, str]:
        """The message as a chat template expects it; ``developer`` is OpenAI's new ``system``.
        (Tool calls and tool results are rendered by ``tools.chat_template_messages``.)"""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name:
            out["name"] = self.name
        return out


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: no arguments
    strict: bool | None = None  # arguments always follow the schema, strict or not


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=limits.MAX_SEGMENTS_PER_CALL)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=limits.MAX_LOGPROBS)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs is only allowed when logprobs is true")
        if self.logprobs and self.stream and self.tool_use is not None:
            # Streamed tool calls arrive as pieces of JSON, not token by token.
            raise ValueError(f"logprobs with tools {_NOT_SUPPORTED} when streaming; leave out stream")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per output token, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError(f"functions (the deprecated form of tools) {_NOT_SUPPORTED}; use tools")
        return v

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v is not None and v != "none":
            raise ValueError(f"function_call (the deprecated form of tool_choice) {_NOT_SUPPORTED}; "
                             "use tool_choice")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if "tools" not in info.data:  # the tools were invalid: that is the error to report
            return choice
        tools = info.data["tools"]  # validated first: declared before tool_choice
        if (choice == "required" or isinstance(choice, NamedToolChoice)) and not tools:
            raise ValueError("only allowed when tools are specified")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in tools]
            if choice.function.name not in names:
                raise ValueError(f"names the function {choice.function.name!r}, which is not one of the "
                                 f"tools ({', '.join(names)})")
        return choice

    @model_validator(mode="after")
    def _tools_usable(self):
        use = self.tool_use
        if use is not None:
            if not isinstance(self.response_format, (ResponseFormatText, type(None))):
                raise ValueError("response_format cannot be combined with tools in one request")
            use.json_schema()  # a tool schema that cannot be used (a recursive $ref) is a 400 now
        return self

    @property
    def tool_use(self) -> ToolUse | None:
        """The tools the reply may (or must) call; ``None``: a plain text reply."""
        if not self.tools or self.tool_choice == "none":
            return None
        choice = self.tool_choice
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice or AUTO
        tools = tuple(FunctionTool(t.function.name, t.function.description or "", t.function.parameters)
                      for t in self.tools)
        return ToolUse(tools, name, parallel=self.parallel_tool_calls is not False)

    @property
    def json_schema(self) -> dict[str, Any] | None:
        use = self.tool_use
        return use.json_schema() if use is not None else super().json_schema

    @property
    def max_output_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's current name; max_tokens its deprecated alias.
        return self.max_completion_tokens or self.max_tokens


# ---- responses ------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    """Legacy completions' logprobs: per token its text, logprob (None for the first prompt
    token when echoed), alternatives by text, and character offset in the choice's text."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes (a token may hold part of a character)


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer
    def _only_set(self) -> dict[str, str]:
        return {k: v for k, v in (("name", self.name), ("arguments", self.arguments)) if v is not None}


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first carries its id, type and name, the
    next ones pieces of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"], out["type"] = self.id, self.type or "function"
        out["function"] = self.function.model_dump()
        return out


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        # A delta carries only what changed: ``{}`` on the closing chunk.
        out: dict[str, Any] = {k: v for k, v in (("role", self.role), ("content", self.content))
                               if v is not None}
        if self.tool_calls is not None:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return out


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
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
