"""Wire schemas of the native API, shared by the SDK and the service (pydantic v2).

HTTP routes (JSON; errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx):

    POST   /v1/sessions                                   -> SessionInfo
    DELETE /v1/sessions/{sid}                             cancels pending calls, frees their KV
    POST   /v1/graphs                  GraphSubmit        -> GraphAccepted
           (``fetches`` announce the criteria the app will fetch with, before calls run;
           ``open_session`` opens ``session_id`` with it; ``stream``: SSE {"accepted": ...},
           then {"variable": VariableInfo, "call": CallInfo} for each fetch with ``wait``
           as it settles, ``call`` being its producer, if any)
    POST   /v1/sessions/{sid}/calls    CallDecl           -> CallInfo  (one call; creates its outputs)
    GET    /v1/sessions/{sid}/calls/{cid}                 -> CallInfo
    POST   /v1/sessions/{sid}/variables  VariableCreate   -> VariableInfo
    POST   /v1/sessions/{sid}/variables/{vid}  VariableSet -> VariableInfo   (client-set values)
    GET    /v1/sessions/{sid}/variables/{vid}?criterion=latency&timeout=30 -> VariableInfo
           long-poll: answers when the value is ready (or at the timeout with ready=false);
           424 when the producer failed; the criterion flows back to every ancestor call
    GET    /v1/sessions/{sid}/variables/{vid}/stream      SSE: {"delta": str} ..., then
           {"done": true, "value": str} or {"error": str}
    GET    /v1/sessions/{sid}/graph                       -> GraphInfo

Variable ids are chosen by the client (so calls can be issued without a round trip)
and are scoped to one session: another session's id is simply not found. A session id
may be chosen by the client too, to open the session with its first graph.

An ``llm`` call's prompt is either a template or a chat:

    {"id": "c1", "segments": [{"type": "text", "text": "Summarize: "}, {"type": "input", "var": "doc"},
                              {"type": "output", "var": "summary", "sampling": {"max_tokens": 64}}]}
    {"id": "c2", "messages": [{"role": "system", "content": "You are terse."},
                              {"role": "user", "content": [{"type": "text", "text": "Summarize: "},
                                                           {"type": "input", "var": "doc"}]}],
     "output": {"var": "short", "sampling": {"max_tokens": 64}}}

Template segments are tokenized piece by piece (an input reuses the token ids its
producer generated), and several outputs fill and generate in one sequence.

A chat call has ``messages`` (roles ``system``, ``developer``, ``user``, ``assistant``;
each ``content`` a list of text and input segments, or a plain string) and one
``output``, the variable its reply goes to; it has no ``segments``. Once every input
is set, the messages are rendered with the model's chat template (``developer`` as
``system``, the generation prompt appended) and tokenized whole: the same prompt
tokens as ``/v1/chat/completions`` sends for the same final text. A shape that breaks
these rules, or messages the chat template refuses, is a 400 naming the problem.

Sizes are capped (``parrot.limits``: calls, variables and fetches per submission and per
session, segments per call, characters per value, the session idle timeout); going over
is a 400 naming the limit. A ``seed`` is any 64-bit value, signed or unsigned; a
``temperature`` below ``limits.MIN_TEMPERATURE`` (1e-5) samples greedily, as in vLLM.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parrot import limits

ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
VarId = Annotated[str, Field(pattern=ID_PATTERN)]


class Criterion(StrEnum):
    """What the user waits for when fetching a variable."""

    LATENCY = "latency"  # this one answer, as soon as possible
    THROUGHPUT = "throughput"  # the whole batch; individual answers may wait
    TTFT = "ttft"  # the first token of a streamed answer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingConfig(_Strict):
    """How an output is generated. Greedy by default, so programs are reproducible."""

    max_tokens: int = Field(256, ge=1)
    # Below ``limits.MIN_TEMPERATURE`` is greedy; infinities and NaN are refused.
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = Field(None, ge=limits.MIN_SEED, le=limits.MAX_SEED)  # 64 bits, signed or not
    stop: list[str] = Field(default_factory=list, max_length=limits.MAX_STOP_STRINGS)
    ignore_eos: bool = False

    # Constrain the output to JSON that validates against this JSON Schema ({"type": "object"}
    # for any JSON object); the output ends when the JSON is complete.
    json_schema: dict[str, Any] | None = None

    # OpenAI's penalties over the output's tokens (presence: once a token occurs; frequency:
    # per occurrence), vLLM's repetition penalty over prompt and output (1 is off), a bias added
    # to given tokens' logits (token id -> -100..100), and the fewest tokens before EOS or a
    # stop string may end the output.
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=limits.MAX_LOGIT_BIAS)
    min_tokens: int = Field(0, ge=0)

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        for token, bias in v.items():
            if token < 0 or not -100.0 <= bias <= 100.0:  # also refuses NaN
                raise ValueError(f"logit_bias maps token ids (>= 0) to values in [-100, 100] "
                                 f"(got {token}: {bias})")
        return v

    @model_validator(mode="after")
    def _min_within_max(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        return dict(self.logit_bias)

class TextSegment(_Strict):
    type: Literal["text"] = "text"
    text: str = Field(max_length=limits.MAX_VALUE_CHARS)


class InputSegment(_Strict):
    type: Literal["input"] = "input"
    var: VarId
    # Whitespace removed from that end of the value where it stands, as a client that strips
    # the text around it (a framework trimming a rendered prompt) would have sent it.
    strip: Literal["start", "end", "both"] | None = None

    def apply(self, value: str) -> str:
        if self.strip == "start":
            return value.lstrip()
        if self.strip == "end":
            return value.rstrip()
        return value.strip() if self.strip == "both" else value


class OutputSegment(_Strict):
    type: Literal["output"] = "output"
    var: VarId
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


Segment = Annotated[TextSegment | InputSegment | OutputSegment, Field(discriminator="type")]


ContentSegment = Annotated[TextSegment | InputSegment, Field(discriminator="type")]


class MessageDecl(_Strict):
    """One message of a chat call. ``content`` is static text and input variables, joined
    as they are; a plain string is shorthand for one text segment."""

    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentSegment] = Field(max_length=limits.MAX_SEGMENTS_PER_CALL)
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_inputs(cls, v: object) -> object:
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if isinstance(v, list) and any(isinstance(s, dict) and s.get("type") == "output" for s in v):
            raise ValueError("a message holds text and input segments; a chat call's reply is "
                             "its `output`, not part of a message")
        return v


class VariableDecl(_Strict):
    """A variable introduced by a graph: a constant (with ``value``) or a future."""

    id: VarId
    name: str | None = None
    value: str | None = Field(None, max_length=limits.MAX_VALUE_CHARS)


class CallDecl(_Strict):
    """One call. ``llm`` calls run in the service, from template ``segments`` or from chat
    ``messages`` plus the ``output`` their reply goes to (one or the other, not both);
    ``native`` calls run in the client, which sets their outputs when done."""

    id: VarId
    name: str | None = None
    kind: Literal["llm", "native"] = "llm"
    segments: list[Segment] = Field(  # llm calls from a template
        default_factory=list, max_length=limits.MAX_SEGMENTS_PER_CALL)
    messages: list[MessageDecl] | None = Field(  # chat calls
        None, max_length=limits.MAX_SEGMENTS_PER_CALL)
    output: OutputSegment | None = None  # a chat call's reply
    inputs: list[VarId] = Field(default_factory=list, max_length=limits.MAX_SEGMENTS_PER_CALL)  # native
    outputs: list[VarId] = Field(default_factory=list, max_length=limits.MAX_SEGMENTS_PER_CALL)  # native

    @model_validator(mode="after")
    def _one_prompt_shape(self) -> CallDecl:
        if self.messages is None:
            if self.output is not None:
                raise ValueError("`output` is the reply of a chat call and needs `messages`; "
                                 "a template call puts its output segments in `segments`")
            return self
        if self.kind == "native":
            raise ValueError("a native call has no messages: it runs in the client")
        if self.segments:
            raise ValueError("a call has either `segments` (a template) or `messages` (a chat), not both")
        if not self.messages:
            raise ValueError("a chat call needs at least one message")
        if self.output is None:
            raise ValueError("a chat call needs an `output`: the variable its reply goes to")
        return self


class FetchDecl(_Strict):
    """The app will fetch ``var`` with ``criterion``; with ``wait``, a streamed submission's
    answer carries the value once it is set (``GraphSubmit.stream``), so no poll is needed."""

    var: VarId
    criterion: Criterion
    wait: bool = False


class SessionCreate(_Strict):
    idle_timeout_s: float | None = Field(None, gt=0, le=limits.MAX_IDLE_TIMEOUT_S)


class GraphSubmit(_Strict):
    """Part of a session's graph. Every variable a call reads or writes must be declared in
    ``variables``, here or in an earlier submission; a call's outputs without a value.

    Each of these saves the app a round trip to the service: ``open_session`` opens the
    session ``session_id`` (an id the client chose, not in use) with this submission, and
    ``stream`` answers with an event stream: the ``GraphAccepted`` first, then each waited
    fetch's variable (``VariableInfo``, with its producer's ``CallInfo``) as it settles, for
    up to ``limits.MAX_WAIT_S``."""

    session_id: VarId
    variables: list[VariableDecl] = Field(default_factory=list, max_length=limits.MAX_VARIABLES_PER_GRAPH)
    calls: list[CallDecl] = Field(default_factory=list, max_length=limits.MAX_CALLS_PER_GRAPH)
    # Fetches the app already makes, announced with the graph so that every call is
    # placed knowing its objective (a later GET with the same criterion changes nothing).
    fetches: list[FetchDecl] = Field(default_factory=list, max_length=limits.MAX_FETCHES_PER_GRAPH)
    open_session: SessionCreate | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _waits_need_a_stream(self) -> GraphSubmit:
        if not self.stream and any(f.wait for f in self.fetches):
            raise ValueError("a fetch with wait=true needs stream=true: the stream carries its value")
        return self


class GraphAccepted(BaseModel):
    session_id: str
    variables: list[str]
    calls: list[str]


class SessionInfo(BaseModel):
    id: str
    idle_timeout_s: float


class VariableCreate(_Strict):
    id: VarId
    name: str | None = None
    value: str | None = Field(None, max_length=limits.MAX_VALUE_CHARS)


class VariableSet(_Strict):
    """Set a client-owned variable: a value, or an error that fails its consumers."""

    value: str | None = Field(None, max_length=limits.MAX_VALUE_CHARS)
    error: str | None = Field(None, max_length=limits.MAX_VALUE_CHARS)


class VariableInfo(BaseModel):
    id: str
    name: str | None
    ready: bool
    value: str | None = None
    error: str | None = None
    producer: str | None = None


class CallTimings(BaseModel):
    created: float
    started: float | None = None  # its inputs were all set
    first_token: float | None = None  # its first output token arrived
    finished: float | None = None


class CallInfo(BaseModel):
    id: str
    name: str | None
    kind: str
    state: Literal["pending", "running", "done", "failed", "cancelled"]
    inputs: list[str]
    outputs: list[str]
    criterion: Criterion | None
    priority: int
    group: str | None
    error: str | None
    timings: CallTimings
    cached_tokens: int = 0
    prompt_tokens: int = 0
    # Tokens generated over all its outputs (a stop token counts, as in OpenAI's usage), and
    # why its last output ended; both are set before that output's variable is.
    output_tokens: int = 0
    finish_reason: Literal["stop", "length"] | None = None
    engine: str | None = None  # the engine that ran the call (see GET /v1/engines)


class EdgeInfo(BaseModel):
    source: str  # producing call
    target: str  # consuming call
    var: str


class GraphInfo(BaseModel):
    session_id: str
    calls: list[CallInfo]
    variables: list[VariableInfo]
    edges: list[EdgeInfo]
