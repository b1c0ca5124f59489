"""``ParrotTextCompletion``: a Semantic Kernel text connector whose prompts run as Parrot template calls.

The prompt is sent as it is (no chat template): one call of the prompt's text, then one
generated output (``prepare_text_call``).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator
from html import unescape
from typing import Any

from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.connectors.ai.text_completion_client_base import TextCompletionClientBase
from semantic_kernel.contents import StreamingTextContent, TextContent
from semantic_kernel.utils.telemetry.model_diagnostics.decorators import (
    trace_streaming_text_completion,
    trace_text_completion,
)

from parrot.integrations.common.calls import CallOutcome, prepare_completion
from parrot.integrations.common.placeholders import Placeholders
from parrot.integrations.semantic_kernel.connector import ParrotServiceBase, completion_usage
from parrot.integrations.semantic_kernel.settings import sampling_config
from parrot.sdk import PreparedCall

if sys.version_info >= (3, 12):
    from typing import override  # pragma: no cover
else:
    from typing_extensions import override  # pragma: no cover


class ParrotTextCompletion(ParrotServiceBase, TextCompletionClientBase):
    """A text-completion model served by Parrot. Swap it in for ``OpenAITextCompletion``::

        kernel.add_service(ParrotTextCompletion(base_url="http://127.0.0.1:8000"))

    Contents carry ``ai_model_id`` and ``metadata["usage"]`` (a ``CompletionUsage`` with
    ``prompt_tokens_details.cached_tokens``) and ``metadata["finish_reason"]``; a stream's last
    chunk carries them, with no text. ``response_format`` constrains the output to a JSON
    schema; there is no function calling.
    """

    def prepare_text_call(self, prompt: str, settings: PromptExecutionSettings,
                          placeholders: Placeholders | None = None) -> PreparedCall:
        """The native template call for ``prompt`` under ``settings``, not submitted: the prompt's
        text, placeholders that ``placeholders`` knows as input segments, then the output."""
        sampling = sampling_config(self.parrot_settings(settings))
        parts = placeholders.split(prompt) if placeholders is not None else [prompt]
        return prepare_completion(parts, sampling, name="completion")

    @override
    @trace_text_completion(ParrotServiceBase.MODEL_PROVIDER_NAME)
    async def _inner_get_text_contents(self, prompt: str,
                                       settings: PromptExecutionSettings) -> list[TextContent]:
        parrot_settings = self.parrot_settings(settings)

        def build(placeholders: Placeholders | None) -> PreparedCall:
            return self.prepare_text_call(prompt, parrot_settings, placeholders)

        result, model_name = await self.run_call(build, parrot_settings)
        return [TextContent(text=result.text, ai_model_id=model_name, inner_content=result,
                            metadata=_metadata(result))]

    @override
    @trace_streaming_text_completion(ParrotServiceBase.MODEL_PROVIDER_NAME)
    async def _inner_get_streaming_text_contents(
            self, prompt: str,
            settings: PromptExecutionSettings) -> AsyncGenerator[list[StreamingTextContent], Any]:
        parrot_settings = self.parrot_settings(settings)
        # A prompt function hands a streaming text connector its rendered prompt still
        # HTML-escaped (SK's kernel_function_from_prompt unescapes it only on the non-streaming
        # path), so it is unescaped here: both paths then send the model the same prompt.
        prompt = unescape(prompt)

        def build(placeholders: Placeholders | None) -> PreparedCall:
            return self.prepare_text_call(prompt, parrot_settings, placeholders)

        async for model_name, item in self.stream_call(build, parrot_settings):
            if isinstance(item, str):
                yield [StreamingTextContent(choice_index=0, text=item, ai_model_id=model_name)]
            else:  # the last chunk: no text, the usage and finish reason
                yield [StreamingTextContent(choice_index=0, text="", ai_model_id=model_name,
                                            inner_content=item, metadata=_metadata(item))]


def _metadata(result: CallOutcome) -> dict[str, Any]:
    return {"usage": completion_usage(result), "finish_reason": result.finish_reason}
