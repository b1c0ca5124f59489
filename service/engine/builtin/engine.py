"""The builtin engine: an embedded continuous-batching runner behind the async Engine API.

The model runs in its own thread, so the service's event loop never blocks on it.
The loop and the thread talk through a command queue (add, abort, priority, pins)
one way and ``call_soon_threadsafe`` into each request's asyncio queue the other way.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from parrot.service.engine.base import (
    Engine,
    EngineError,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    Load,
    Objective,
    SamplingParams,
)
from parrot.service.engine.builtin import loader
from parrot.service.engine.builtin.batch_builder import build_forward_batch
from parrot.service.engine.builtin.grammar import JsonSchemaGrammars, matcher_error
from parrot.service.engine.builtin.model import (
    AttentionBackendOption,
    LlamaRunner,
    kv_bytes_per_token,
    resolve_attention_backend,
)
from parrot.service.engine.builtin.prompt_logprobs import prompt_logprobs
from parrot.service.engine.builtin.quant import resolve_quantization
from parrot.service.engine.builtin.radix_cache import RadixCache
from parrot.service.engine.builtin.request import IncrementalDetokenizer, Request
from parrot.service.engine.builtin.sampler import (
    TokenHistory,
    apply_penalties,
    apply_token_bitmask,
    make_generator,
    sample,
    token_logprobs,
)
from parrot.service.engine.builtin.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from parrot.service.engine.builtin.slots import SlotAllocator
from parrot.service.engine.tokenizer import ModelTokenizer

if TYPE_CHECKING:
    from llguidance import LLMatcher

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltinEngineConfig:
    model: str | None = None  # None: the default model; else a HF folder or a .gguf file
    device: str = "auto"  # "auto" picks cuda when present
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on CUDA
    kv_cache_gib: float = 2.0  # memory for the KV pool
    max_running: int = 64
    max_step_tokens: int = 512
    max_context_len: int | None = None  # default: the model's own limit
    # Decoding requests that share a cached prefix attend to it together (two-phase) when
    # that saves at least this many prefix-token reads per layer: (members - 1) * prefix
    # length. Measured on CPU (benchmarks/attention.py): it pays from about 450 on, for
    # groups of 2 to 32. None turns two-phase attention off.
    two_phase_min_saved_tokens: int | None = 448
    # While latency requests run, throughput requests share this many tokens per step
    # with them (see scheduler.py). None: objective-blind batching.
    latency_step_tokens: int | None = 32
    # False: no compute is shared between requests (no radix cache, no two-phase attention);
    # for ablations, like vLLM without prefix caching.
    prefix_caching: bool = True
    # A request that shares this many not-yet-cached prompt tokens with one prefilling them
    # waits a step and reuses them (see scheduler.py); None never holds one back. "auto": 8 on
    # CPU, where every prefill token costs about as much compute as the next, so computing a
    # shared part twice costs more than any wait from about 8 tokens on (the fixed part of a
    # step); 64 on GPUs, where a step of a few dozen tokens more costs next to nothing.
    shared_prefill_min_tokens: int | Literal["auto"] | None = "auto"
    # Decode attention (plain and two-phase): "torch" (the reference), "triton" (the
    # kernels in parrot.service.kernels; CUDA, or CPU under TRITON_INTERPRET=1 for tests),
    # "auto": torch until the Triton kernels are verified on GPUs. Prefill always uses torch.
    attention_backend: AttentionBackendOption = "auto"
    # Weight-only quantization of the matmuls (see quant.py). "auto" (the default) serves a
    # GGUF model on CPU from the file's own 4- and 8-bit blocks (a fifth of the bytes a
    # step reads; float32 arithmetic on exactly the de-quantized values, so greedy output
    # follows transformers') and anything else as it is; "none" keeps the de-quantized
    # float matrices; "gguf", "int4wo[-G]", "int8wo" ask for one.
    quantization: str = "auto"


def _tune_cpu_allocator() -> None:
    # glibc serves big buffers with fresh mmaps, so every step's 10-30 MB KV gathers
    # would page-fault anew; keeping them in the heap makes the gathers ~3x faster.
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD, the maximum glibc accepts
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():  # the waiter may have been cancelled
        done.set_result(None)


class BuiltinEngine(Engine):
    kind = "builtin"
    supports_prefix_control = True
    computes_shared_prefix_once = True  # the scheduler's shared-prefill hold

    def __init__(self, config: BuiltinEngineConfig | None = None, *, hf_model=None, tokenizer=None,
                 model_name: str | None = None) -> None:
        """Load the model. ``hf_model``/``tokenizer`` may be given directly (tests do)."""
        self.config = config = config or BuiltinEngineConfig()
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # Checked before the model loads, so a bad choice fails at once.
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        if self.device.type == "cpu":
            _tune_cpu_allocator()
        gguf = loader.source_gguf(config.model) if hf_model is None else None
        quant = resolve_quantization(config.quantization, gguf=gguf, device=self.device)
        if hf_model is None:
            name, path = loader.resolve_model(config.model)
            dtype = self._pick_dtype(config.dtype)
            hf_model = loader.load_hf_model(path, dtype)
            tokenizer = loader.load_tokenizer(path)
            model_name = model_name or name
        if tokenizer is None:
            raise ValueError("a tokenizer is needed with hf_model")
        self.model_name = model_name or Path(str(hf_model.config.name_or_path)).name or "model"
        self.tokenizer = ModelTokenizer(tokenizer, self.model_name)
        hf_config = hf_model.config
        kv_bytes = kv_bytes_per_token(hf_config, hf_model.dtype)
        num_slots = max(int(config.kv_cache_gib * 2**30 // kv_bytes), 256)
        self.runner = LlamaRunner(hf_model, num_slots, self.device, self.attention_backend, quant, gguf)
        del hf_model
        limit = hf_config.max_position_embeddings
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True):
            limit = min(limit, window)  # no sliding-window attention here: cap instead
        self.max_context_len = min(config.max_context_len or limit, limit, num_slots)
        self.eos_token_ids = self._eos_ids(hf_config, tokenizer)
        self.grammars = JsonSchemaGrammars(tokenizer, self.runner.vocab_size, self.eos_token_ids)

        self.allocator = SlotAllocator(num_slots)
        self.cache = RadixCache(self.allocator.free)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_running=config.max_running,
                max_step_tokens=config.max_step_tokens,
                latency_step_tokens=config.latency_step_tokens,
                prefix_caching=config.prefix_caching,
                shared_prefill_min_tokens=self._shared_prefill_min_tokens(config.shared_prefill_min_tokens),
            ),
            self.allocator,
            self.cache,
        )
        # With no prefix caching no two requests share KV, so there is nothing to group.
        self._two_phase_min_saved = config.two_phase_min_saved_tokens if config.prefix_caching else None
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._requests: dict[str, Request] = {}
        self._group_seqs: dict[str, int] = {}  # group id -> arrival of its first request
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.num_steps = 0
        self.busy_s = 0.0  # time in steps, for the load's counter
        self._scratch_slot: int | None = None  # a KV slot written and never read (prompt_logprobs.py)

    def _shared_prefill_min_tokens(self, value: int | str | None) -> int | None:
        if value == "auto":
            return 8 if self.device.type == "cpu" else 64
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"shared_prefill_min_tokens must be a positive number of tokens, "
                             f"'auto' or None, not {value!r}")
        return value

    def _pick_dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[name]

    @staticmethod
    def _eos_ids(hf_config, tokenizer) -> frozenset[int]:
        ids = hf_config.eos_token_id
        out = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if tokenizer.eos_token_id is not None:
            out.add(tokenizer.eos_token_id)
        return frozenset(out)

    # ---- Engine API (event-loop side) -------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="parrot-builtin-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._commands.put(("stop", None))
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def alive(self) -> bool:
        # Not started yet (or shut down) counts as alive: ``generate`` starts the thread.
        return self._thread is None or self._thread.is_alive()

    async def health(self) -> bool:
        return self.alive

    def validate(self, request: GenerateRequest) -> None:
        n = len(request.prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        if n + request.sampling.max_new_tokens > self.max_context_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) plus max_new_tokens ({request.sampling.max_new_tokens}) "
                f"exceeds the context length of {self.max_context_len} tokens"
            )
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab})")
        if request.request_id in self._streams:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running")
        if request.sampling.resumed_output_len > n:
            raise InvalidRequestError("resumed_output_len exceeds the prompt length")
        bad_bias = [t for t in request.sampling.logit_bias if not 0 <= t < vocab]
        if bad_bias:
            raise InvalidRequestError(f"logit_bias token ids must lie in [0, {vocab}) (got {bad_bias[0]})")

    async def check(self, request: GenerateRequest) -> None:
        """``validate``, plus what takes work off the event loop: compiling a JSON schema."""
        self.validate(request)
        await self._grammar(request)

    async def _grammar(self, request: GenerateRequest) -> LLMatcher | None:
        """The request's own schema matcher (None when unconstrained), built in a worker thread."""
        sp = request.sampling
        if sp.json_schema is None:
            return None
        ids = request.prompt_token_ids
        return await asyncio.to_thread(self.grammars.matcher, sp.json_schema,
                                       ids[len(ids) - sp.resumed_output_len:])

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        self.validate(request)
        grammar = await self._grammar(request)
        if self._thread is None:
            await self.start()
        stream: asyncio.Queue[GenerateOutput] = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", (request, grammar)))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer went away: free the request's KV now
                self._commands.put(("abort", request.request_id))
            self._streams.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def set_priority(self, request_id: str, priority: int, objective: Objective) -> None:
        self._commands.put(("priority", (request_id, priority, objective)))

    async def pin_prefix(self, pin_id: str, token_ids: list[int]) -> None:
        await self._on_runner("pin", (pin_id, list(token_ids)))

    async def unpin_prefix(self, pin_id: str) -> None:
        await self._on_runner("unpin", pin_id)

    async def flush_cache(self) -> bool:
        """Drop the prefix cache's entries that no running request or pin holds (at any time:
        the entries in use stay)."""
        freed: list[int] = []
        await self._on_runner("flush", freed)
        if freed:
            logger.info("prefix cache flushed: %d tokens dropped", freed[0])
        return bool(freed) and self.config.prefix_caching

    async def prefill(self, token_ids: list[int], priority: int = 0) -> None:
        """Compute and cache the KV of ``token_ids`` as a prefill-only request (``max_new_tokens``
        0: nothing is generated); return once it is cached. It runs as throughput work of
        ``priority``, so latency work goes first and, while latency work runs, it gets only what
        that leaves of a step (``latency_step_tokens``). Without prefix caching nothing would stay
        cached: a no-op."""
        if not token_ids or not self.config.prefix_caching:
            return
        request = GenerateRequest(f"prefill-{next(self._ids)}", list(token_ids),
                                  SamplingParams(max_new_tokens=0), objective="throughput",
                                  priority=priority)
        async for out in self.generate(request):
            if out.error:
                raise EngineError(f"prefill failed: {out.error}")

    async def _on_runner(self, kind: str, arg: object) -> None:
        """Queue a command and wait until the runner thread has applied it."""
        if self._thread is None:
            await self.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._commands.put((kind, arg))
        self._commands.put(("sync", (loop, done)))
        await done

    def load(self) -> Load:
        sched = self.scheduler
        # Copies: the runner thread changes these lists while the event loop reads them.
        running, waiting = list(sched.running), list(sched.waiting)
        return Load(
            num_running=len(running),
            num_waiting=len(waiting),
            num_latency=sum(r.objective == "latency" for r in running + waiting),
            kv_tokens_used=self.allocator.num_slots - self.allocator.num_free,
            kv_tokens_total=self.allocator.num_slots,
            cached_tokens=self.cache.total_size,
            num_preemptions=sched.num_preemptions,
            num_steps=self.num_steps,
            busy_s=self.busy_s,
        )

    # ---- runner thread ---------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            block = not self.scheduler.has_work
            while True:
                try:
                    kind, arg = self._commands.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "stop":
                    return
                try:
                    self._command(kind, arg)
                except Exception:  # one bad command must not end the thread that serves everyone
                    logger.exception("engine command %r failed", kind)
            if self.scheduler.has_work:
                started = time.perf_counter()
                try:
                    self.step()
                except Exception as exc:  # never leave callers hanging on a dead thread
                    logger.exception("engine step failed")
                    self._fail_all(f"engine error: {exc}")
                self.busy_s += time.perf_counter() - started

    def _command(self, kind: str, arg: Any) -> None:  # each kind has its own argument
        if kind == "add":
            self._add(*arg)
        elif kind == "abort":
            self._abort(arg)
        elif kind == "priority":
            self._set_priority(*arg)
        elif kind == "pin":
            self.scheduler.pin_prefix(*arg)
        elif kind == "unpin":
            self.scheduler.unpin_prefix(arg)
        elif kind == "flush":
            arg.append(self.cache.reset())  # arg: where the caller finds how many tokens went
        elif kind == "sync":
            loop, done = arg
            try:
                loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:  # the waiter's loop is closed: nobody waits
                pass

    def _add(self, request: GenerateRequest, grammar: LLMatcher | None = None) -> None:
        try:
            self._admit(request, grammar)
        except Exception as exc:  # fail this request alone, with the cause
            logger.exception("engine could not add request %s", request.request_id)
            req = self._requests.pop(request.request_id, None)
            if req is not None:
                self.scheduler.finish(req)
            self._send_error(request.request_id, f"engine error: {type(exc).__name__}: {exc}",
                             len(request.prompt_token_ids))

    def _send_error(self, request_id: str, error: str, num_prompt_tokens: int,
                    num_cached_tokens: int = 0, num_output_tokens: int = 0) -> None:
        """The last output of a request that failed, built without its detokenizer (which may
        be what failed, or may not exist yet)."""
        target = self._streams.get(request_id)
        if target is None:
            return
        out = GenerateOutput(request_id=request_id, token_ids=[], text="",
                             num_prompt_tokens=num_prompt_tokens, num_cached_tokens=num_cached_tokens,
                             num_output_tokens=num_output_tokens, finished=True, finish_reason="abort",
                             error=error)
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, out)

    def _admit(self, request: GenerateRequest, grammar: LLMatcher | None) -> None:
        sp = request.sampling
        seq = next(self._arrivals)
        group_seq = seq
        if request.group_id is not None:
            group_seq = self._group_seqs.setdefault(request.group_id, seq)
        req = Request(
            request_id=request.request_id,
            token_ids=list(request.prompt_token_ids),
            num_prompt_tokens=len(request.prompt_token_ids),
            sampling=sp,
            generator=make_generator(sp, self.device),
            objective=request.objective,
            priority=request.priority,
            group_id=request.group_id,
            seq=seq,
            group_seq=group_seq,
            detokenizer=IncrementalDetokenizer(self.tokenizer.hf, sp.stop),
            grammar=grammar,
        )
        if sp.has_penalties:
            ids = request.prompt_token_ids
            req.history = TokenHistory(self.runner.vocab_size, ids, ids[len(ids) - sp.resumed_output_len:],
                                       self.device)
        self._requests[req.request_id] = req
        self.scheduler.add(req)

    def _set_priority(self, request_id: str, priority: int, objective: Objective) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            req.priority, req.objective = priority, objective
            self.scheduler.reprioritize(req)

    def _abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is None or req.finished:
            return
        req.finish_reason = "abort"
        self._finish(req)

    def _finish(self, req: Request, new_ids: list[int] | None = None, error: str | None = None) -> None:
        self.scheduler.finish(req)
        self._requests.pop(req.request_id, None)
        if req.group_id is not None and not any(
            r.group_id == req.group_id for r in self._requests.values()
        ):
            self._group_seqs.pop(req.group_id, None)
        self._emit(req, new_ids or [], error=error)

    def _fail_all(self, message: str) -> None:
        for req in list(self._requests.values()):
            req.finish_reason = "abort"
            self.scheduler.finish(req)
            self._emit(req, [], error=message)
        self._requests.clear()
        self._group_seqs.clear()

    def _emit(self, req: Request, new_ids: list[int], error: str | None = None) -> None:
        target = self._streams.get(req.request_id)
        if target is None:
            return
        assert req.detokenizer is not None
        logprobs = None
        if req.sampling.logprobs is not None:
            logprobs, req.pending_logprobs = req.pending_logprobs, []
        prompt = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            prompt, req.prompt_logprobs_sent = req.prompt_logprobs, True
        out = GenerateOutput(
            request_id=req.request_id,
            token_ids=new_ids,
            text=req.detokenizer.take(final=req.finished),
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            num_output_tokens=req.num_output_tokens,
            finished=req.finished,
            finish_reason=req.finish_reason,
            error=error,
            logprobs=logprobs,
            prompt_logprobs=prompt,
        )
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, out)

    def step(self) -> None:
        """Schedule, run the model once, sample, and deliver outputs."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return
        # The whole step runs under the forward's threads, batch building and sampling too:
        # torch's ops on a second thread there would leave it spinning into the next kernels
        # (a sampled batch-1 decode step 9.2 ms instead of 4.4 on 2 cores).
        with self.runner.step_threads(batch.num_rows):
            self._run_batch(batch)

    def _run_batch(self, batch: ScheduledBatch) -> None:
        forward, samplers = build_forward_batch(
            batch, self.device, self.runner.dtype, self._two_phase_min_saved
        )
        logits = self.runner.forward(forward)
        self.scheduler.commit(batch)
        self.num_steps += 1
        if not samplers:
            return
        for req in samplers:
            if req.sampling.prompt_logprobs is not None and req.prompt_logprobs is None:
                self._compute_prompt_logprobs(req)
        params = [r.sampling for r in samplers]
        # Penalties, bias and min_tokens first, then the grammar: a masked token stays masked.
        # min_tokens leaves a constrained row alone: its grammar decides where the JSON ends.
        logits = apply_penalties(
            logits, params, [r.history for r in samplers], [r.num_generated for r in samplers],
            [() if r.grammar is not None else self._end_ids(r.sampling) for r in samplers])
        constrained = [i for i, r in enumerate(samplers) if r.grammar is not None]
        if constrained:
            bitmask = self.grammars.fill_bitmask([samplers[i].grammar for i in constrained])
            logits = apply_token_bitmask(logits, constrained, bitmask)
        try:
            tokens: list[int | None] = list(
                sample(logits, params, [r.generator for r in samplers]))
        except Exception:  # find the rows that fail, and fail only their requests
            logger.exception("sampling a batch failed; sampling its rows one by one")
            tokens = [self._sample_row(logits, i, req) for i, req in enumerate(samplers)]
        wanted = [i for i, (r, t) in enumerate(zip(samplers, tokens, strict=True))
                  if r.sampling.logprobs is not None and t is not None and r.sampling.max_new_tokens > 0]
        if wanted:
            entries = token_logprobs(logits, wanted, [params[i].logprobs or 0 for i in wanted],
                                     [tokens[i] or 0 for i in wanted])
            for i, entry in zip(wanted, entries, strict=True):
                samplers[i].pending_logprobs.append(entry)
        for req, token in zip(samplers, tokens, strict=True):
            if token is None or req.finished:  # finished: failed in this step (its prompt logprobs)
                continue
            try:
                self._append_token(req, token)
            except Exception as exc:  # e.g. a detokenizer or grammar failure: this request's own
                logger.exception("request %s failed after a step", req.request_id)
                self._fail(req, f"engine error: {type(exc).__name__}: {exc}")

    def _end_ids(self, sp: SamplingParams) -> tuple[int, ...]:
        """The tokens that would end an output now; ``min_tokens`` holds them back."""
        if sp.min_tokens == 0:
            return ()
        return tuple(sp.stop_token_ids) + (() if sp.ignore_eos else tuple(self.eos_token_ids))

    def _compute_prompt_logprobs(self, req: Request) -> None:
        """Fill ``req.prompt_logprobs`` (its prompt KV is computed by now); a failure fails the
        request alone."""
        if self._scratch_slot is None:
            slots = self.allocator.alloc(1)
            if slots is None and self.cache.evict(1) >= 1:
                slots = self.allocator.alloc(1)
            if slots is None:
                self._fail(req, "no KV slot is free to compute the prompt's logprobs; try again")
                return
            self._scratch_slot = slots[0]  # kept for good: one slot, reused by every such request
        n = req.num_prompt_tokens
        try:
            req.prompt_logprobs = prompt_logprobs(self.runner, req.token_ids[:n], req.slots[:n],
                                                  self._scratch_slot, req.sampling.prompt_logprobs or 0,
                                                  self.config.max_step_tokens)
        except Exception as exc:
            logger.exception("prompt logprobs of request %s failed", req.request_id)
            self._fail(req, f"computing the prompt's logprobs failed: {type(exc).__name__}: {exc}")

    def _sample_row(self, logits: torch.Tensor, row: int, req: Request) -> int | None:
        """One row's token, or None after failing its request with the cause."""
        try:
            return sample(logits[row:row + 1], [req.sampling], [req.generator])[0]
        except Exception as exc:
            self._fail(req, f"sampling failed: {type(exc).__name__}: {exc}")
            return None

    def _fail(self, req: Request, error: str) -> None:
        """End one request with ``error``; the others in its batch go on."""
        if self._requests.pop(req.request_id, None) is None:
            return  # already ended
        req.finish_reason = "abort"
        self.scheduler.finish(req)
        if req.group_id is not None and not any(
            r.group_id == req.group_id for r in self._requests.values()
        ):
            self._group_seqs.pop(req.group_id, None)
        self._send_error(req.request_id, error, req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                         req.num_output_tokens)

    def _append_token(self, req: Request, token: int) -> None:
        sp = req.sampling
        if sp.max_new_tokens == 0:  # prefill only: the prompt is now cached
            req.finish_reason = "length"
            self._finish(req)
            return
        req.token_ids.append(token)
        if req.history is not None:
            req.history.add(token)
        assert req.detokenizer is not None
        if req.grammar is not None and not req.grammar.consume_token(token):
            req.finish_reason = "abort"  # cannot happen with the mask applied; never end silently
            error = f"the JSON schema constraint failed: {matcher_error(req.grammar)}"
            self._finish(req, [token], error=error)
            return
        # A stop token ends the output without adding its text (as in vLLM). Until min_tokens,
        # stop tokens are masked (see apply_penalties) and stop strings not looked for.
        if token in sp.stop_token_ids or (token in self.eos_token_ids and not sp.ignore_eos):
            req.finish_reason = "stop"
        elif req.detokenizer.add(req.output_ids, find_stop=req.num_generated >= sp.min_tokens):
            req.finish_reason = "stop"
        elif req.grammar is not None and req.grammar.is_stopped():  # the JSON is complete
            req.finish_reason = "stop"
        elif req.num_output_tokens >= sp.max_new_tokens:
            req.finish_reason = "length"
        if req.finished:
            self._finish(req, [token])
        else:
            self._emit(req, [token])

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"
