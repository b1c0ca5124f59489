"""Engine throughput on a shared-system-prompt workload, side by side in one process.

N requests share a ~1,000-token system prompt and differ in a short user turn; each
generates exactly M tokens greedily (EOS ignored). Systems, run one after another:

  builtin      Parrot's builtin engine (continuous batching, radix prefix cache)
  hf-cb        transformers' continuous batching (``generate_batch``, block sharing on)
  hf-generate  transformers' ``generate`` on one left-padded batch of all N
  llamacpp     llama.cpp (llama-cpp-python) on the shipped GGUF, requests one after
               another with its prefix reuse, as its server would

Besides the table it measures the machine's memory bandwidth and the builtin
engine's decode step time at batch N against its bandwidth floor, and prints the
ratios the project tracks: builtin vs hf-cb (>= 5x), builtin vs llama.cpp (>= 1x),
decode step / floor (<= 3x).

    python benchmarks/engine_throughput.py            # full run (32 x 64 tokens)
    python benchmarks/engine_throughput.py --quick    # smoke run (8 x 16 tokens)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from parrot.service.engine.base import GenerateRequest, SamplingParams
from parrot.service.engine.builtin import loader

SYSTEMS = ("builtin", "hf-cb", "hf-generate", "llamacpp")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The shared-prompt workload (many requests) against transformers and llama.cpp; one
# request decodes at least as fast as llama.cpp, its step within 2x of its floor.
TARGET_VS_HF_CB = 10.0
TARGET_VS_LLAMACPP = 3.0
TARGET_STEP_OVER_FLOOR = 3.0
TARGET_VS_LLAMACPP_BATCH_1 = 1.0
TARGET_STEP_OVER_FLOOR_BATCH_1 = 2.0

console = Console(width=None if sys.stdout.isatty() else 150)


# ---- workload ----------------------------------------------------------------------

_TOPICS = (
    "billing and invoices", "password resets", "two-factor authentication", "data exports",
    "API rate limits", "storage quotas", "team permissions", "webhook failures",
    "scheduled backups", "region migration", "audit logs", "single sign-on",
    "deleted projects", "usage dashboards", "refund requests", "service outages",
)
_GUIDELINES = (
    "first restate the question in one short sentence, then answer it",
    "link to the matching help-center article and summarise it in two lines",
    "never guess account details; ask the user to confirm their workspace name",
    "give numbered steps and keep each step under fifteen words",
    "mention the relevant plan limits and how to check the current usage",
    "escalate to a human agent when the user reports losing data",
)
_QUESTIONS = (
    "How do I download last month's invoice as a PDF?",
    "I forgot my password and the reset email never arrives.",
    "Can I turn on two-factor login for my whole team at once?",
    "What is the fastest way to export all my project data?",
    "Why am I getting error 429 from the REST API today?",
    "How much storage is left on the starter plan?",
    "Can a read-only member create new API keys?",
    "My webhook keeps failing with a timeout; what should I check?",
    "How often are backups taken and can I restore one myself?",
    "Is it possible to move my workspace to the EU region?",
    "Where can I see who deleted a file yesterday?",
    "Does the business plan support Okta single sign-on?",
    "I deleted a project by mistake, can it be recovered?",
    "The usage dashboard shows zero requests; is it broken?",
    "How do I ask for a refund for an annual subscription?",
    "Is there an outage right now in the US-East region?",
    "Can I pay invoices by bank transfer instead of card?",
    "How do I rotate my API key without downtime?",
    "What happens to my data when my trial ends?",
    "Can I limit which IP addresses may access the dashboard?",
    "How do I add a second billing contact to my account?",
    "Why does single sign-on log me out every hour?",
    "Can I schedule exports to run every night automatically?",
    "How do I invite a contractor with access to one project only?",
    "What is the maximum file size I can upload?",
    "My audit log export is empty; what did I do wrong?",
    "How do I change the owner of a workspace?",
    "Can webhooks be signed so I can verify them?",
    "Do you offer discounts for nonprofits or schools?",
    "How long do deleted files stay in the trash?",
    "Why was my card declined when upgrading my plan?",
    "Can I get an alert when storage reaches ninety percent?",
)


@dataclass
class Workload:
    prompts: list[list[int]]  # chat-templated token ids (the HF tokenizer)
    texts: list[str]  # the same prompts as text (for llama.cpp's own tokenizer)
    new_tokens: int
    system_tokens: int
    eos_ids: frozenset[int] = frozenset()

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def total_new_tokens(self) -> int:
        return self.num_requests * self.new_tokens


def system_prompt(tokenizer, target: int = 1000) -> tuple[str, int]:
    """Deterministic numbered rules, grown until the text is about ``target`` tokens."""
    lines = ["You are the support assistant of Acme Cloud. Follow every rule below."]
    i = 0
    while len(tokenizer.encode("\n".join(lines), add_special_tokens=False)) < target:
        topic, guideline = _TOPICS[i % len(_TOPICS)], _GUIDELINES[i % len(_GUIDELINES)]
        lines.append(f"Rule {i + 1}: when a user asks about {topic}, {guideline}.")
        i += 1
    text = "\n".join(lines)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    if not target <= n < target + 50:  # one rule line overshoots by at most ~30 tokens
        raise RuntimeError(f"system prompt has {n} tokens, not about {target}")
    return text, n


def user_turn(i: int) -> str:
    question = _QUESTIONS[i % len(_QUESTIONS)]
    return question if i < len(_QUESTIONS) else f"{question} (ticket {i})"


def build_workload(tokenizer, num_requests: int, new_tokens: int, prefix_tokens: int = 1000) -> Workload:
    system, n_system = system_prompt(tokenizer, prefix_tokens)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user_turn(i)}],
            tokenize=False, add_generation_prompt=True,
        )
        for i in range(num_requests)
    ]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return Workload(prompts, texts, new_tokens, n_system, frozenset({tokenizer.eos_token_id}))


# ---- results -----------------------------------------------------------------------


@dataclass
class Result:
    system: str
    seconds: float  # wall time from first submission to last token
    new_tokens: int  # tokens generated in total
    ttft: list[float] | None = None  # per request, from its submission (None: not measurable)
    ttft_own: list[float] | None = None  # llama.cpp: from the request's own start
    outputs: list[list[int]] | None = None
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


@dataclass
class Skipped:
    system: str
    note: str


@dataclass
class StepRecord:
    forward_s: float
    num_decode: int
    num_prefill: int
    context_lens: list[int]  # decode rows' key counts
    groups: list[tuple[int, int]]  # decode attention groups: (rows, shared prefix; 0 = plain)
    step_s: float | None = None  # the whole engine step (schedule + forward + sample)


@dataclass
class StepStats:
    records: list[StepRecord] = field(default_factory=list)
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0


def mean(xs: list[float] | None) -> float | None:
    return statistics.fmean(xs) if xs else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- machine -----------------------------------------------------------------------


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Best-of read bandwidth of a dot product over two randn-filled float32 tensors (GB/s).

    randn, not empty: untouched pages all map the shared zero page and read too fast.
    """
    n = mib * 2**20 // 4
    a, b = torch.randn(n), torch.randn(n)
    torch.dot(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.dot(a, b)
        best = min(best, time.perf_counter() - t0)
    nbytes = a.nbytes + b.nbytes
    del a, b
    return nbytes / best / 1e9


# ---- (a) builtin engine ------------------------------------------------------------


def _num_decode(batch) -> int:
    """Decode rows lead the batch; older runners count them, newer ones group them."""
    if hasattr(batch, "num_decode"):
        return batch.num_decode
    return sum(group.num_rows for group in batch.decode_groups)


def _groups(batch) -> list[tuple[int, int]]:
    groups = getattr(batch, "decode_groups", None)
    if groups is None:
        return [(batch.num_decode, 0)] if batch.num_decode else []
    return [(g.num_rows, 0 if g.prefix_slots is None else len(g.prefix_slots)) for g in groups]


def instrument(engine) -> StepStats:
    """Time every runner.forward and engine.step (both run on the engine's thread)."""
    runner = engine.runner
    stats = StepStats(weight_bytes=runner_weight_bytes(runner),
                      kv_bytes_per_token=runner.kv_bytes_per_token)
    forward, step = runner.forward, engine.step

    def timed_forward(batch):
        t0 = time.perf_counter()
        out = forward(batch)
        elapsed = time.perf_counter() - t0
        n = _num_decode(batch)
        lengths = (batch.positions[:n] + 1).tolist()  # a decode row's keys: its position + 1
        stats.records.append(StepRecord(elapsed, n, len(batch.prefills), lengths, _groups(batch)))
        return out

    def timed_step():
        n = len(stats.records)
        t0 = time.perf_counter()
        step()
        if len(stats.records) > n:
            stats.records[-1].step_s = time.perf_counter() - t0

    runner.forward = timed_forward
    engine.step = timed_step
    return stats


def runner_weight_bytes(runner) -> int:
    """Bytes of weights one step reads: every layer's tensors, the final norm and lm_head."""
    from parrot.service.engine.builtin.quant import weight_nbytes

    total = weight_nbytes(runner.lm_head) + runner.final_norm.nbytes
    for layer in runner.layers:  # packed 4-bit matrices count their codes, scales and zeros
        total += sum(weight_nbytes(t) for t in vars(layer).values() if t is not None)
    return total


async def _consume(engine, request: GenerateRequest, t_submit: float) -> tuple[float, list[int]]:
    ttft, tokens = None, []
    async for out in engine.generate(request):
        if out.error:
            raise RuntimeError(f"{request.request_id}: {out.error}")
        if out.token_ids and ttft is None:
            ttft = time.perf_counter() - t_submit
        tokens.extend(out.token_ids)
    return ttft if ttft is not None else float("nan"), tokens


async def _builtin(wl: Workload, dtype: str, quantization: str) -> tuple[Result, StepStats]:
    from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig

    engine = BuiltinEngine(BuiltinEngineConfig(kv_cache_gib=3.0, dtype=dtype, quantization=quantization))
    await engine.start()
    try:
        warm = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
        await _consume(engine, GenerateRequest("warmup", wl.prompts[0][-16:], warm), 0.0)
        stats = instrument(engine)
        steps_before = engine.num_steps
        sampling = SamplingParams(max_new_tokens=wl.new_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        done = await asyncio.gather(*(
            _consume(engine, GenerateRequest(f"req-{i}", p, sampling), t0)
            for i, p in enumerate(wl.prompts)
        ))
        seconds = time.perf_counter() - t0
        steps = engine.num_steps - steps_before
    finally:
        await engine.shutdown()
    outputs = [tokens for _, tokens in done]
    result = Result("builtin", seconds, sum(map(len, outputs)), [t for t, _ in done], None,
                    outputs, note=f"{steps} steps")
    return result, stats


def run_builtin(wl: Workload, args) -> tuple[Result, StepStats]:
    return asyncio.run(_builtin(wl, args.dtype, args.quantization))


# ---- transformers helpers ----------------------------------------------------------


def load_hf_model(path: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_DTYPES[dtype], attn_implementation="sdpa"
    )
    return model.eval()


def _warm_forward(model, prompt: list[int]) -> None:
    with torch.inference_mode():
        model(torch.tensor([prompt[-16:]]))


# ---- (b) transformers continuous batching -----------------------------------------


def run_hf_cb(wl: Workload, args, path: Path) -> Result:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = load_hf_model(path, args.dtype)
    _warm_forward(model, wl.prompts[0])
    page = 32  # small pages: a prefix is shared in whole pages only
    longest = max(map(len, wl.prompts)) + wl.new_tokens
    cb_config = ContinuousBatchingConfig(
        page_size=page,
        # Sized for the workload without sharing: on CPU the default takes 60% of RAM.
        num_blocks=wl.num_requests * (-(-longest // page) + 1) + 8,
        max_batch_tokens=512,  # the builtin engine's step budget
        # None: transformers' default, every request in one batch. Its CPU attention is
        # O(batch^2) per step (one packed, block-diagonal mask), so a cap runs faster.
        max_requests_per_batch=args.hf_cb_max_requests or None,
        allow_block_sharing=True,
        auto_switch_to_flash=False,
    )
    gen_config = GenerationConfig(
        max_new_tokens=wl.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0,
    )
    t0 = time.perf_counter()
    out = model.generate_batch(
        inputs=wl.prompts, generation_config=gen_config,
        continuous_batching_config=cb_config, record_timestamps=True,
    )
    seconds = time.perf_counter() - t0
    results = list(out.values())
    errors = [r.error for r in results if r.error]
    if errors or len(results) != wl.num_requests:
        raise RuntimeError(f"generate_batch returned {len(results)} results; errors: {errors[:3]}")
    ttft = [r.timestamps[0] - r.created_time for r in results if r.timestamps]
    outputs = [list(r.generated_tokens) for r in results]
    del model, out
    cap = args.hf_cb_max_requests or "all"
    return Result("hf-cb", seconds, sum(map(len, outputs)), ttft or None, None, outputs,
                  note=f"sdpa, block sharing, page {page}, <= {cap} requests per batch")


# ---- (c) transformers generate, one padded batch -----------------------------------


class _FirstTokenClock:
    """A logits processor that notes when the first token's logits are ready."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def run_hf_generate(wl: Workload, args, path: Path) -> Result:
    from transformers import GenerationConfig, LogitsProcessorList

    model = load_hf_model(path, args.dtype)
    _warm_forward(model, wl.prompts[0])
    pad = model.config.pad_token_id
    pad = model.config.eos_token_id if pad is None else pad
    input_ids, mask = left_pad(wl.prompts, pad)
    gen_config = GenerationConfig(
        max_new_tokens=wl.new_tokens, min_new_tokens=wl.new_tokens, do_sample=False,
        pad_token_id=pad, eos_token_id=model.config.eos_token_id,
    )
    clock = _FirstTokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_config,
                             logits_processor=LogitsProcessorList([clock]))
    seconds = time.perf_counter() - t0
    outputs = out[:, input_ids.shape[1]:].tolist()
    ttft = [clock.first - t0] * wl.num_requests if clock.first else None
    del model, out
    return Result("hf-generate", seconds, sum(map(len, outputs)), ttft, None, outputs,
                  note=f"one batch, padded to {input_ids.shape[1]}")


# ---- (d) llama.cpp -----------------------------------------------------------------


def run_llamacpp(wl: Workload, args) -> Result | Skipped:
    try:
        from llama_cpp import Llama
    except ImportError:
        return Skipped("llamacpp", "llama-cpp-python is not installed (pip install -e '.[bench]')")
    gguf = loader.default_gguf_path()
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, n_threads_batch=2, n_batch=512,
                verbose=False)
    prompts = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in wl.texts]
    _llamacpp_generate(llm, llm.tokenize(b"Hello there", add_bos=False), 2)  # warm-up
    mismatched = sum(p != q for p, q in zip(prompts, wl.prompts, strict=True))
    outputs, ttft_own, ttft_queued = [], [], []
    t0 = time.perf_counter()
    for prompt in prompts:
        start = time.perf_counter()
        first, tokens = _llamacpp_generate(llm, prompt, wl.new_tokens)
        ttft_own.append(first - start)
        ttft_queued.append(first - t0)
        outputs.append(tokens)
    seconds = time.perf_counter() - t0
    llm.close()
    del llm
    note = f"{gguf.name.split('.')[-2]} weights, sequential, prefix reuse"
    if mismatched:
        note += f"; {mismatched} prompts tokenize differently"
    return Result("llamacpp", seconds, sum(map(len, outputs)), ttft_queued, ttft_own, outputs, note)


def _llamacpp_generate(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:
    first, tokens = 0.0, []
    gen = llm.generate(prompt, temp=0.0, top_k=1)
    for token in gen:
        if not tokens:
            first = time.perf_counter()
        tokens.append(token)
        if len(tokens) == n:
            break
    gen.close()
    return first, tokens


# ---- report ------------------------------------------------------------------------


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def agreement(ref: Result | None, res: Result, eos_ids: frozenset[int]) -> str:
    """Requests whose output equals the builtin's up to the builtin's first EOS.

    Past an EOS the systems legitimately differ: hf-generate suppresses EOS
    (min_new_tokens), the others emit it and go on.
    """
    if ref is None or ref.outputs is None or res.outputs is None:
        return "-"
    same = 0
    for a, b in zip(ref.outputs, res.outputs, strict=True):
        end = next((i for i, t in enumerate(a) if t in eos_ids), len(a))
        same += a[:end] == b[:end]
    return f"{same}/{len(ref.outputs)}"


def results_table(wl: Workload, results: list[Result | Skipped]) -> Table:
    ref = next((r for r in results if isinstance(r, Result) and r.system == "builtin"), None)
    table = Table(
        title=f"{wl.num_requests} requests x {wl.new_tokens} new tokens, "
              f"{wl.system_tokens}-token shared system prompt",
        caption="builtin speed-up: builtin tokens/s over this row's.  * requests whose greedy "
                "output equals the builtin's up to its first EOS (hf-generate suppresses EOS, "
                "the others generate past it)",
    )
    for col in ("system", "tokens/s", "mean TTFT s", "total s", "builtin speed-up",
                "same tokens as builtin*", "notes"):
        table.add_column(col, justify="left" if col in ("system", "notes") else "right")
    for r in results:
        if isinstance(r, Skipped):
            table.add_row(r.system, "-", "-", "-", "-", "-", f"skipped: {r.note}")
            continue
        speedup = f"{ref.tokens_per_s / r.tokens_per_s:.2f}x" if ref else "-"
        ttft = _fmt_s(mean(r.ttft))
        if r.ttft_own:
            ttft = f"{_fmt_s(mean(r.ttft_own))} own / {ttft} queued"
        table.add_row(r.system, f"{r.tokens_per_s:.1f}", ttft, f"{r.seconds:.2f}", speedup,
                      agreement(ref, r, wl.eos_ids), r.note)
    return table


@dataclass
class FloorReport:
    step_s: float
    full_step_s: float | None
    floor_s: float
    shared_floor_s: float
    weight_bytes: int
    kv_bytes: int
    num_steps: int
    groups: list[tuple[int, int]]  # the median step's decode attention groups

    @property
    def ratio(self) -> float:
        return self.step_s / self.floor_s


def decode_floor(stats: StepStats, wl: Workload, bandwidth_gbs: float) -> FloorReport | None:
    """Median forward time of pure decode steps at full batch vs the bytes it must read."""
    full = [r for r in stats.records if r.num_decode == wl.num_requests and r.num_prefill == 0]
    if not full:
        return None
    ordered = sorted(full, key=lambda r: r.forward_s)
    median = ordered[len(ordered) // 2]
    kv_tokens = sum(median.context_lens)
    kv_bytes = kv_tokens * stats.kv_bytes_per_token
    # What a shared-prefix kernel could read instead: the common prefix once.
    shared_prefix = _common_prefix(wl.prompts) if wl.num_requests > 1 else 0
    unique_tokens = kv_tokens - (wl.num_requests - 1) * shared_prefix
    bw = bandwidth_gbs * 1e9
    steps = [r.step_s for r in full if r.step_s is not None]
    return FloorReport(
        step_s=median.forward_s,
        full_step_s=statistics.median(steps) if steps else None,
        floor_s=(stats.weight_bytes + kv_bytes) / bw,
        shared_floor_s=(stats.weight_bytes + unique_tokens * stats.kv_bytes_per_token) / bw,
        weight_bytes=stats.weight_bytes,
        kv_bytes=kv_bytes,
        num_steps=len(full),
        groups=median.groups,
    )


def _common_prefix(prompts: list[list[int]]) -> int:
    n = 0
    for column in zip(*prompts, strict=False):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def _describe_groups(groups: list[tuple[int, int]]) -> str:
    parts = [f"{rows} rows sharing a {prefix}-token prefix (two-phase)" if prefix
             else f"{rows} rows plain" for rows, prefix in groups]
    return ", ".join(parts) or "none"


def print_floor(report: FloorReport | None, wl: Workload, bandwidth_gbs: float) -> None:
    if report is None:
        console.print(f"[yellow]no builtin step ran {wl.num_requests} decodes without prefill[/]")
        return
    mb = 1e6
    full = f", whole engine step {report.full_step_s * 1e3:.1f} ms" if report.full_step_s else ""
    console.print(
        f"builtin decode step at batch {wl.num_requests}: median forward "
        f"{report.step_s * 1e3:.1f} ms over {report.num_steps} steps{full}\n"
        f"  decode attention groups: {_describe_groups(report.groups)}\n"
        f"  bandwidth floor: ({report.weight_bytes / mb:.0f} MB weights + "
        f"{report.kv_bytes / mb:.0f} MB KV, every request's whole context) / "
        f"{bandwidth_gbs:.1f} GB/s = {report.floor_s * 1e3:.1f} ms  ->  "
        f"step / floor = {report.ratio:.2f}x\n"
        f"  reading the shared prefix's KV once: floor {report.shared_floor_s * 1e3:.1f} ms  ->  "
        f"step / that floor = {report.step_s / report.shared_floor_s:.2f}x"
    )


def print_targets(results: list[Result | Skipped], floor: FloorReport | None, wl: Workload) -> None:
    by_name = {r.system: r for r in results if isinstance(r, Result)}
    builtin = by_name.get("builtin")
    rows = []
    lone = wl.num_requests == 1
    vs_llamacpp = TARGET_VS_LLAMACPP_BATCH_1 if lone else TARGET_VS_LLAMACPP
    step_over_floor = TARGET_STEP_OVER_FLOOR_BATCH_1 if lone else TARGET_STEP_OVER_FLOOR
    for name, target in (("hf-cb", TARGET_VS_HF_CB), ("llamacpp", vs_llamacpp)):
        other = by_name.get(name)
        if builtin and other:
            ratio = builtin.tokens_per_s / other.tokens_per_s
            rows.append((f"builtin vs {name} (tokens/s)", ratio, ratio >= target,
                         f">= {target:g}x"))
    if floor:
        rows.append(("decode step / floor", floor.ratio, floor.ratio <= step_over_floor,
                     f"<= {step_over_floor:g}x"))
    table = Table(title="Targets")
    for col in ("ratio", "measured", "target", "met"):
        table.add_column(col)
    for label, value, met, target in rows:
        table.add_row(label, f"{value:.2f}x", target, "[green]yes[/]" if met else "[red]no[/]")
    console.print(table)


# ---- main --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--num-requests", type=int, help="default 32 (8 with --quick)")
    parser.add_argument("--new-tokens", type=int, help="default 64 (16 with --quick)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--quantization", default="auto",
                        help="the builtin engine's weights: auto (its default: the GGUF's own blocks), "
                             "none (de-quantized float), gguf, int4wo, int8wo")
    parser.add_argument("--hf-cb-max-requests", type=int, default=8,
                        help="hf-cb: max requests per batch (0: all, transformers' default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 requests x 16 tokens")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.num_requests is None:
        args.num_requests = 8 if args.quick else 32
    if args.new_tokens is None:
        args.new_tokens = 16 if args.quick else 64
    return args


def run_system(
    name: str, wl: Workload, args, path: Path
) -> tuple[Result | Skipped, StepStats | None]:
    runners: dict[str, Callable[[], Result | Skipped]] = {
        "hf-cb": lambda: run_hf_cb(wl, args, path),
        "hf-generate": lambda: run_hf_generate(wl, args, path),
        "llamacpp": lambda: run_llamacpp(wl, args),
    }
    console.print(f"[bold]running {name}[/] ...")
    t0 = time.perf_counter()
    stats = None
    if name == "builtin":
        result, stats = run_builtin(wl, args)
    else:
        result = runners[name]()
    free_memory()
    console.print(f"  done in {time.perf_counter() - t0:.1f} s (with loading)")
    return result, stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    hf_logging.disable_progress_bar()
    name, path = loader.resolve_model(None)
    wl = build_workload(loader.load_tokenizer(path), args.num_requests, args.new_tokens)
    lengths = [len(p) for p in wl.prompts]
    console.print(
        f"model {name} ({args.dtype}), {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; prompts {min(lengths)}-{max(lengths)} tokens, common "
        f"prefix {_common_prefix(wl.prompts)}; timings are noisy if other work shares the cores"
    )
    bandwidth = memory_bandwidth_gbs()
    console.print(
        f"memory bandwidth (dot over 2 x 512 MiB float32, best of 5): {bandwidth:.1f} GB/s"
    )
    free_memory()

    results: list[Result | Skipped] = []
    stats = None
    for system in SYSTEMS:
        if system not in args.systems:
            continue
        result, system_stats = run_system(system, wl, args, path)
        results.append(result)
        stats = system_stats or stats

    console.print(results_table(wl, results))
    floor = decode_floor(stats, wl, bandwidth) if stats else None
    if stats:
        print_floor(floor, wl, bandwidth)
    print_targets(results, floor, wl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
