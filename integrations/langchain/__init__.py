"""LangChain models served by Parrot: ``ChatParrot`` (chat) and ``ParrotLLM`` (text completion).

    from parrot.integrations.langchain import ChatParrot

    model = ChatParrot(base_url="http://127.0.0.1:8000")   # instead of ChatOpenAI(base_url=...)
    model = ChatParrot()                                    # embedded: the default model in-process

How calls reach the service: through the native API, not the OpenAI routes. Each
invocation opens a Parrot session, submits its chat call (LangChain messages become
the call's messages; the service renders them with the model's chat template, the same
prompt tokens as ``/v1/chat/completions`` sends), waits for the reply variable (or
streams it), reads the call's token counts, and deletes the session. ``batch`` /
``abatch`` put every input's call into one session and one graph submission, while
each input still runs through LangChain's own invoke path (its config, callbacks,
``return_exceptions``); ``max_concurrency`` does not limit how many of the batch's
calls the service runs at once. ``ParrotLLM`` gets a batch's prompts in one
``_generate`` and submits them the same way.

Chains: when an LCEL chain that uses ``ChatParrot`` runs, a reply that only flows into
other ``ChatParrot`` calls through verbatim steps is sent ahead as a placeholder, so its
consumers' calls reach the service at once, as one graph with edges (``auto.py``);
``compile(chain)`` defers every reply and resolves placeholders before any step that reads
text (``compiler.py``). Either way the chain's result is the one it gives without Parrot.

LangGraph: the ``ChatParrot`` calls that the tasks of one superstep make in parallel (the
nodes of a step, a ``Send`` fan-out) share that step's session and reach the service as
one graph submission; each call waits for its reply only once the step's calls have
gathered (a few tens of milliseconds, at most 0.2 s; ``langgraph.py``). Calls outside
LangGraph are not held back.

Fields (both models): ``base_url`` (env ``PARROT_BASE_URL``; ``None`` embeds the
service), ``model`` / ``model_name`` (``None``: the service's default; native calls
run on that model only), ``api_key`` (env ``PARROT_API_KEY``), ``temperature`` (``None``
is greedy, Parrot's default: the same reply every run), ``max_tokens`` /
``max_completion_tokens`` (``None``: 256), ``top_p``, ``top_k``, ``seed``, ``stop`` /
``stop_sequences``, ``timeout`` / ``request_timeout`` (the longest wait for a reply;
``None``: as long as generation takes), ``max_retries`` (tries to reach the service).
Per-call keywords override the sampling fields; an unknown keyword is a ``ValueError``.

Replies: ``usage_metadata`` (``input_tokens``, ``output_tokens``, ``total_tokens``, and
``input_token_details["cache_read"]``: prompt tokens served from the prefix cache) and
``response_metadata`` (``model_name``, ``finish_reason`` "stop" or "length"). Streams
yield text deltas; the last chunk carries the usage and metadata.

Messages: text only (images, audio, files are refused). ``system``, ``human``, ``ai``
(with its tool calls written as JSON), ``tool`` (as a ``user`` message
``Tool <name> returned: ...``) and ``ChatMessage`` with those roles.

Tool calling (``bind_tools``) and structured output (``with_structured_output``) use
JSON-schema constrained decoding, so replies are always well-formed:

- ``tool_choice`` ``"any"`` / ``"required"`` / ``True``: the reply calls one or more of the
  tools; a tool's name: a call of that tool; ``"auto"`` / ``None``: calls, or a text answer
  (the reply is constrained to either ``{"tool_calls": [{"name", "arguments"}, ...]}`` or
  ``{"content": "<text>"}``, and the model picks); ``"none"``: plain text. The envelope is
  ``parrot.tool_calls``, the one the OpenAI routes use too.
- The tools are described to the model in a system message (the schema the sampler
  enforces is invisible to it).
- One tool call per reply unless ``bind_tools(..., parallel_tool_calls=True)``; with tools
  bound, a stream yields the whole reply as one chunk once it is complete.
- A reply cut short by ``max_tokens`` or a stop string is an ``invalid_tool_calls`` entry
  (or, for an answer, the text so far), never an exception.
- ``with_structured_output(schema, method=...)``: ``"json_schema"`` (default: the reply
  follows the schema), ``"function_calling"`` (a forced tool call), ``"json_mode"`` (any JSON
  object); pydantic classes (v1 or v2), TypedDicts and JSON schemas; ``include_raw``.

Not supported: images and other non-text inputs, logprobs, ``n`` > 1,
choosing a model other than the service's default per call.
"""

from parrot.integrations.langchain.chat_models import ChatParrot
from parrot.integrations.langchain.compiler import compile
from parrot.integrations.langchain.llms import ParrotLLM

__all__ = ["ChatParrot", "ParrotLLM", "compile"]
