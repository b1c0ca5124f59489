"""Prompt execution settings of the Parrot connectors, and how they become a call's sampling.

Sampling is greedy unless ``temperature`` says otherwise (Parrot's default, so runs repeat).
Structured output (``response_format``) and function calling are constrained decoding: the
service samples only replies that follow a JSON schema (``parrot.tool_calls`` for tools,
``parrot.integrations.common.json_schemas`` for ``response_format``).

Function calling: SK's function-choice configuration fills ``tools`` (the kernel functions
offered, in OpenAI's function format, named ``plugin-function``) and ``tool_choice``:

- ``"auto"`` (``FunctionChoiceBehavior.Auto()``): the reply is a call of one of the tools,
  ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``, or an answer,
  ``{"content": "<text>"}`` (``parrot.tool_calls.ToolUse``, the envelope every face uses);
- ``"required"`` (``Required()``): a call of one of the tools;
- ``"none"`` (``NoneInvoke()``): the tools are described, the reply is plain text.

A model cannot see the schema its sampler enforces, so the tools and the reply format are
described to it in a system message (``tool_instructions``). One call per reply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError
from semantic_kernel.connectors.ai.function_call_choice_configuration import FunctionCallChoiceConfiguration
from semantic_kernel.connectors.ai.function_calling_utils import (
    kernel_function_metadata_to_function_call_format as function_call_format,
)
from semantic_kernel.connectors.ai.function_choice_type import FunctionChoiceType
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.exceptions import ServiceInvalidExecutionSettingsError

from parrot.integrations.common.json_schemas import response_format_schema
from parrot.schemas import SamplingConfig
from parrot.tool_calls import FunctionTool, ToolUse, describe_tools

ToolChoice = Literal["auto", "required", "none"]
SET_BY_CONNECTOR = "Do not set this: the connector sets it from the function choice behavior."
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
# Settings of other connectors (OpenAI's, converted) that change nothing here: a Parrot request
# streams or not by the method called, keeps no stored completions, users or tags, and knows
# structured output from response_format alone.
IGNORED_KEYS = frozenset({"stream", "stream_options", "user", "store", "metadata", "messages",
                          "structured_json_response"})
# Settings taken only with the value that means what a Parrot request does anyway.
ONLY_VALUES = {"number_of_responses": 1, "n": 1, "parallel_tool_calls": False}


class ParrotPromptExecutionSettings(PromptExecutionSettings):
    """Settings of a request to a Parrot connector.

    Any other setting (in ``extension_data``, as SK keeps settings meant for other services) is
    refused when the request is made, so a setting never silently does nothing; the exceptions
    are ``IGNORED_KEYS``, ``ONLY_VALUES`` with their one value, and ``max_completion_tokens``
    (taken as ``max_tokens``).
    """

    ai_model_id: Annotated[str | None, Field(serialization_alias="model")] = None
    """The model; ``None``: the connector's. A service runs native calls on its default model only."""
    temperature: Annotated[float | None, Field(ge=0.0)] = None
    """``None`` and ``0`` are greedy."""
    max_tokens: Annotated[int | None, Field(gt=0)] = None
    """The most tokens a reply has; ``None``: the service's default (256)."""
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    top_k: Annotated[int | None, Field(ge=-1)] = None
    seed: int | None = None
    stop: str | list[str] | None = None
    """Stop strings: the reply ends before the first one it would contain."""
    response_format: dict[str, Any] | type[BaseModel] | type | None = None
    """Structured output: a pydantic class (or another type pydantic can describe), a JSON schema,
    or OpenAI's ``{"type": "json_object"}`` / ``{"type": "json_schema", "json_schema": {...}}``."""
    tools: Annotated[list[dict[str, Any]] | None, Field(description=SET_BY_CONNECTOR)] = None
    tool_choice: Annotated[ToolChoice | None, Field(description=SET_BY_CONNECTOR)] = None


def update_settings_from_function_choice(configuration: FunctionCallChoiceConfiguration,
                                         settings: PromptExecutionSettings,
                                         choice: FunctionChoiceType) -> None:
    """Offer the configured kernel functions as tools (SK calls this while it configures a request)."""
    if configuration.available_functions and isinstance(settings, ParrotPromptExecutionSettings):
        settings.tools = [function_call_format(f) for f in configuration.available_functions]
        settings.tool_choice = choice.value


def tool_use(settings: ParrotPromptExecutionSettings) -> ToolUse | None:
    """The tools that constrain the reply (``"auto"`` or ``"required"``); ``None`` when the
    reply is plain text. One call per reply. ``ServiceInvalidExecutionSettingsError`` for tools
    that cannot be used."""
    if not settings.tools or settings.tool_choice in (None, "none"):
        return None
    try:
        return ToolUse.from_openai(settings.tools, settings.tool_choice, parallel=False)
    except ValueError as exc:
        raise ServiceInvalidExecutionSettingsError(f"invalid tools for a Parrot request: {exc}") from exc


def tool_instructions(settings: ParrotPromptExecutionSettings) -> str | None:
    """The tools and the reply format in words, for the system message; ``None`` without tools.
    With ``"none"`` the tools are described and the model told to answer in plain text."""
    if not settings.tools or settings.tool_choice is None:
        return None
    if settings.tool_choice == "none":
        tools = [FunctionTool.from_openai(t) for t in settings.tools]
        return "\n".join([*describe_tools(tools), "Do not call a tool now: answer in plain text."])
    use = tool_use(settings)
    assert use is not None  # tools offered with a choice that constrains the reply
    return use.instructions()


def check_supported(settings: ParrotPromptExecutionSettings) -> None:
    """Refuse settings a Parrot request cannot honour, naming them."""
    known = {*settings.keys, *IGNORED_KEYS, *ONLY_VALUES, "max_completion_tokens"}
    unknown = sorted(key for key, value in settings.extension_data.items()
                     if value is not None and key not in known)
    if unknown:
        raise ServiceInvalidExecutionSettingsError(
            f"unsupported settings for a Parrot connector: {', '.join(unknown)} (supported: "
            f"{', '.join([*SAMPLING_KEYS, 'stop', 'response_format', 'function_choice_behavior'])})")
    for key, only in ONLY_VALUES.items():
        value = settings.extension_data.get(key)
        if value is not None and value != only:
            raise ServiceInvalidExecutionSettingsError(
                f"{key}={value!r} is not supported: a Parrot connector makes one reply, with at most one "
                "tool call, per request")
    if settings.tools and settings.tool_choice not in (None, "none") and settings.response_format is not None:
        raise ServiceInvalidExecutionSettingsError(
            "function calling and response_format cannot be combined in one Parrot request: both constrain "
            "the reply; use one of them")


def sampling_config(settings: ParrotPromptExecutionSettings) -> SamplingConfig:
    """The native sampling of a request: the sampling settings, stop strings, and the JSON schema
    its reply must follow (the tools' when they constrain it, else ``response_format``'s)."""
    check_supported(settings)
    fields: dict[str, Any] = {key: getattr(settings, key) for key in SAMPLING_KEYS}
    if fields["max_tokens"] is None:
        fields["max_tokens"] = settings.extension_data.get("max_completion_tokens")
    stop = settings.stop
    fields["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    try:
        tools = tool_use(settings)
        fields["json_schema"] = (tools.json_schema() if tools is not None
                                 else response_format_schema(settings.response_format))
        return SamplingConfig.model_validate({k: v for k, v in fields.items() if v is not None})
    except (ValueError, ValidationError) as exc:  # pydantic's ValidationError is a ValueError
        raise ServiceInvalidExecutionSettingsError(f"invalid settings for a Parrot request: {exc}") from exc
