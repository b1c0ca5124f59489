"""Plain (per-request) vs two-phase (shared-prefix) decode attention: kernels and engine.

Parts (``--parts``, comma-separated; default all):

  kernels    one decode step's attention for B requests sharing a P-token prefix, each
             with its own ~32-token suffix, SmolLM2-135M's head layout (9 query heads,
             3 KV heads, head dim 64): torch on CPU; Triton and torch on CUDA when
             present. Per layer and per step (30 layers), with speed-ups.
  threshold  torch, the same layout: group sizes 2/4/8/32 x prefixes 16..2048, the
             ratio plain / two-phase (> 1: two-phase pays). Picks ``two_phase_min_saved_tokens``.
  engine     the builtin engine on N requests sharing a ~2,048-token prompt (64 new
             tokens, greedy, EOS ignored) with two-phase attention on and off, in one
             run: throughput and the median decode step at batch N (target: >= 2x).

    python benchmarks/attention.py            # full run, a few minutes on 2 cores
    python benchmarks/attention.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from engine_throughput import (
    StepStats,
    Workload,
    _common_prefix,
    _consume,
    _describe_groups,
    build_workload,
    free_memory,
    instrument,
)
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from parrot.service.engine.base import GenerateRequest, SamplingParams
from parrot.service.engine.builtin import loader
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig, _tune_cpu_allocator
from parrot.service.kernels import triton_attention as ta
from parrot.service.kernels.attention import (
    additive_mask,
    paged_decode_attention,
    shared_prefix_decode_attention,
)

PARTS = ("kernels", "threshold", "engine")
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30  # SmolLM2-135M
SCALE = HEAD_DIM**-0.5
TARGET_STEP_SPEEDUP = 2.0

console = Console(width=None if sys.stdout.isatty() else 150)


# ---- one step's attention inputs ----------------------------------------------------


@dataclass
class Case:
    q: torch.Tensor  # [B, H, D]
    k_pool: torch.Tensor  # [KV, S, D]
    v_pool: torch.Tensor
    table: torch.Tensor  # [B, P + Ls] every request's keys (plain path)
    mask: torch.Tensor | None
    prefix: torch.Tensor  # [P]
    suffix_table: torch.Tensor  # [B, Ls]
    suffix_mask: torch.Tensor | None

    @property
    def groups(self) -> tuple[list[ta.Group], list[ta.Group]]:
        """(plain, two-phase) as the Triton planner takes them."""
        b = self.q.shape[0]
        return ([ta.Group(b, self.table, self.mask)],
                [ta.Group(b, self.suffix_table, self.suffix_mask, self.prefix)])


def make_case(batch: int, prefix: int, suffix: int, device: torch.device, dtype: torch.dtype) -> Case:
    """Prefix slots contiguous (one prefill); suffixes ragged (suffix +- 8) and interleaved,
    as lockstep decoding allocates them: request i's j-th token sits at P + j * B + i."""
    g = torch.Generator().manual_seed(batch * 10_007 + prefix)
    lengths = [max(1, suffix - 8 + (7 * i) % 17) for i in range(batch)]
    num_slots = prefix + batch * max(lengths) + 1
    k_pool = torch.randn(KV_HEADS, num_slots, HEAD_DIM, generator=g).to(device, dtype)
    v_pool = torch.randn(KV_HEADS, num_slots, HEAD_DIM, generator=g).to(device, dtype)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    suffixes = [[prefix + j * batch + i for j in range(n)] for i, n in enumerate(lengths)]
    prefix_slots = list(range(prefix))

    def table(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        width = max(map(len, rows))
        t = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        n = torch.tensor([len(r) for r in rows], device=device)
        return t, None if min(map(len, rows)) == width else additive_mask(n, width, dtype)

    full, mask = table([prefix_slots + s for s in suffixes])
    suffix_table, suffix_mask = table(suffixes)
    return Case(q, k_pool, v_pool, full, mask, torch.tensor(prefix_slots, device=device),
                suffix_table, suffix_mask)


def torch_paths(case: Case) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    c = case
    return (
        lambda: paged_decode_attention(c.q, c.k_pool, c.v_pool, c.table, c.mask, SCALE),
        lambda: shared_prefix_decode_attention(c.q, c.k_pool, c.v_pool, c.prefix, c.suffix_table,
                                               c.suffix_mask, SCALE),
    )


def triton_paths(case: Case) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Planned once (as once per engine step), run per call (as once per layer)."""
    c = case
    plain, shared = (ta.plan_decode(g, HEADS, KV_HEADS, c.q.device) for g in c.groups)
    return (
        lambda: ta.decode_attention_triton(c.q, c.k_pool, c.v_pool, plain, SCALE),
        lambda: ta.decode_attention_triton(c.q, c.k_pool, c.v_pool, shared, SCALE),
    )


def time_pair(a: Callable[[], object], b: Callable[[], object], device: torch.device,
              repeats: int) -> tuple[float, float]:
    """Median seconds per call of a and b, timed alternately so drift hits both alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = 20 if device.type == "cuda" else 1  # GPU calls are too short to time one by one
    times: tuple[list[float], list[float]] = ([], [])
    for fn in (a, b):  # warm-up (allocations, Triton compiles)
        fn()
    for _ in range(repeats):
        for fn, out in zip((a, b), times, strict=True):
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            out.append((time.perf_counter() - t0) / inner)
    return statistics.median(times[0]), statistics.median(times[1])


def check_close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- part: kernels -----------------------------------------------------------------


def kernels_part(args) -> None:
    backends: list[tuple[str, torch.device, torch.dtype, Callable]] = [
        ("torch", torch.device("cpu"), torch.float32, torch_paths)]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        backends.append(("torch", cuda, torch.bfloat16, torch_paths))
        if ta.can_use_triton(cuda):
            backends.append(("triton", cuda, torch.bfloat16, triton_paths))
        else:
            console.print("[yellow]triton missing: CUDA rows are torch only[/]")
    for name, device, dtype, paths in backends:
        table = Table(title=f"decode attention, {name} on {device.type} ({str(dtype)[6:]}): "
                            f"{HEADS} q / {KV_HEADS} KV heads, dim {HEAD_DIM}, suffix ~{args.suffix}, "
                            f"per step = {LAYERS} layers")
        for col in ("batch", "prefix", "plain ms/layer", "two-phase ms/layer", "plain ms/step",
                    "two-phase ms/step", "speed-up", "max |diff|"):
            table.add_column(col, justify="right")
        for batch in args.batches:
            for prefix in args.prefixes:
                case = make_case(batch, prefix, args.suffix, device, dtype)
                plain, shared = paths(case)
                diff = check_close(plain(), shared())
                tp, ts = time_pair(plain, shared, device, args.repeats)
                table.add_row(str(batch), str(prefix), f"{tp * 1e3:.3f}", f"{ts * 1e3:.3f}",
                              f"{tp * LAYERS * 1e3:.1f}", f"{ts * LAYERS * 1e3:.1f}", f"{tp / ts:.2f}x",
                              f"{diff:.1e}")
                del case, plain, shared
                free_memory()
        console.print(table)


# ---- part: threshold ---------------------------------------------------------------


def threshold_part(args) -> int | None:
    """Print plain / two-phase per (group size, prefix); return the smallest prefix from
    which two-phase is at least as fast for every group size >= 2 and every longer prefix."""
    device = torch.device("cpu")
    ratios: dict[tuple[int, int], float] = {}
    table = Table(title=f"plain / two-phase time, torch on CPU (> 1: two-phase pays); suffix ~{args.suffix}")
    table.add_column("prefix", justify="right")
    for size in args.group_sizes:
        table.add_column(f"group {size}", justify="right")
    for prefix in args.threshold_prefixes:
        cells = []
        for size in args.group_sizes:
            case = make_case(size, prefix, args.suffix, device, torch.float32)
            plain, shared = torch_paths(case)
            # Small cases take microseconds: more repeats to beat the noise.
            repeats = max(5, int(args.repeats * 4 * 256 / max(256, size * prefix) ** 0.5))
            tp, ts = time_pair(plain, shared, device, repeats)
            ratios[size, prefix] = tp / ts
            colour = "green" if tp / ts >= 1 else "red"
            cells.append(f"[{colour}]{tp / ts:.2f}[/] ({tp * 1e6:.0f}/{ts * 1e6:.0f} us)")
        table.add_row(str(prefix), *cells)
    console.print(table)
    pays = None
    for prefix in sorted(args.threshold_prefixes, reverse=True):
        if all(ratios[s, p] >= 1 for s in args.group_sizes for p in args.threshold_prefixes if p >= prefix):
            pays = prefix
    per_size = []
    for size in args.group_sizes:
        first = next((p for p in sorted(args.threshold_prefixes)
                      if all(ratios[size, q] >= 1 for q in args.threshold_prefixes if q >= p)), None)
        per_size.append(f"group {size}: {first if first is not None else 'never'}")
    console.print("two-phase is at least as fast from prefix: " + ", ".join(per_size)
                  + f"; for every group size: {pays if pays is not None else 'never'}")
    return pays


# ---- part: engine ------------------------------------------------------------------


@dataclass
class EngineRun:
    label: str
    min_saved_tokens: int | None  # BuiltinEngineConfig.two_phase_min_saved_tokens; None = off
    seconds: float
    new_tokens: int
    step_s: float | None  # median forward of the steps that decoded all N and prefilled nothing
    num_steps: int  # such steps
    groups: list[tuple[int, int]]  # the median step's decode groups
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


async def _engine_run(wl: Workload, label: str, min_saved_tokens: int | None,
                      kv_cache_gib: float) -> EngineRun:
    config = BuiltinEngineConfig(kv_cache_gib=kv_cache_gib, two_phase_min_saved_tokens=min_saved_tokens)
    engine = BuiltinEngine(config)
    await engine.start()
    try:
        warm = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
        await _consume(engine, GenerateRequest("warmup", wl.prompts[0][-16:], warm), 0.0)
        stats: StepStats = instrument(engine)
        sampling = SamplingParams(max_new_tokens=wl.new_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        done = await asyncio.gather(*(
            _consume(engine, GenerateRequest(f"req-{i}", p, sampling), t0) for i, p in enumerate(wl.prompts)
        ))
        seconds = time.perf_counter() - t0
    finally:
        await engine.shutdown()
    outputs = [tokens for _, tokens in done]
    full = sorted((r for r in stats.records if r.num_decode == wl.num_requests and r.num_prefill == 0),
                  key=lambda r: r.forward_s)
    median = full[len(full) // 2] if full else None
    return EngineRun(label, min_saved_tokens, seconds, sum(map(len, outputs)),
                     median.forward_s if median else None, len(full), median.groups if median else [],
                     outputs)


def engine_part(args) -> None:
    hf_logging.disable_progress_bar()
    name, path = loader.resolve_model(None)
    wl = build_workload(loader.load_tokenizer(path), args.num_requests, args.new_tokens, args.prefix_tokens)
    lengths = [len(p) for p in wl.prompts]
    console.print(f"engine: {name}, {wl.num_requests} requests x {wl.new_tokens} new tokens; prompts "
                  f"{min(lengths)}-{max(lengths)} tokens, common prefix {_common_prefix(wl.prompts)}")
    runs = []
    for label, value in (("two-phase on", args.min_saved_tokens), ("two-phase off", None)):
        console.print(f"[bold]running {label}[/] (two_phase_min_saved_tokens={value}) ...")
        runs.append(asyncio.run(_engine_run(wl, label, value, args.kv_cache_gib)))
        free_memory()
    on, off = runs
    table = Table(title=f"builtin engine, {wl.num_requests} requests sharing a "
                        f"{_common_prefix(wl.prompts)}-token prefix, {wl.new_tokens} new tokens each")
    for col in ("run", "min saved tokens", "tokens/s", "total s", f"decode step @ {wl.num_requests} ms",
                "steps timed", "decode groups (median step)", "same tokens as on"):
        table.add_column(col, justify="left" if col.startswith(("run", "decode groups")) else "right")
    for run in runs:
        same = sum(a == b for a, b in zip(on.outputs, run.outputs, strict=True))
        step = f"{run.step_s * 1e3:.1f}" if run.step_s else "-"
        shown = "off" if run.min_saved_tokens is None else run.min_saved_tokens
        table.add_row(run.label, str(shown), f"{run.tokens_per_s:.1f}", f"{run.seconds:.2f}", step,
                      str(run.num_steps), _describe_groups(run.groups), f"{same}/{len(on.outputs)}")
    console.print(table)
    if on.step_s and off.step_s:
        ratio = off.step_s / on.step_s
        line = (f"decode step speed-up (off / on): {ratio:.2f}x; throughput speed-up "
                f"{on.tokens_per_s / off.tokens_per_s:.2f}x")
        if args.num_requests == 32 and args.prefix_tokens == 2048:  # the workload the target is for
            met = "[green]met[/]" if ratio >= TARGET_STEP_SPEEDUP else "[red]not met[/]"
            line += f"; target: decode step >= {TARGET_STEP_SPEEDUP:g}x faster, {met}"
        console.print(line)


# ---- main --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--batches", type=ints, help="kernels: default 8,16,32,64")
    parser.add_argument("--prefixes", type=ints, help="kernels: default 512,1024,2048,4096")
    parser.add_argument("--suffix", type=int, default=32, help="mean suffix tokens per request")
    parser.add_argument("--group-sizes", type=ints, help="threshold: default 2,4,8,32")
    parser.add_argument("--threshold-prefixes", type=ints, help="threshold: default 16,32,...,2048")
    parser.add_argument("--repeats", type=int, help="timed calls per case (default 10, 3 with --quick)")
    parser.add_argument("--num-requests", type=int, help="engine: default 32 (8 with --quick)")
    parser.add_argument("--new-tokens", type=int, help="engine: default 64 (8 with --quick)")
    parser.add_argument("--prefix-tokens", type=int, help="engine: shared prompt tokens, default 2048")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--min-saved-tokens", type=int,
                        default=BuiltinEngineConfig.two_phase_min_saved_tokens,
                        help="engine: the 'on' run's two_phase_min_saved_tokens (default: the engine's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small shapes, few repeats")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(args.parts) - set(PARTS)):
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    quick = args.quick
    defaults = {
        "batches": [8, 32] if quick else [8, 16, 32, 64],
        "prefixes": [512, 2048] if quick else [512, 1024, 2048, 4096],
        "group_sizes": [2, 32] if quick else [2, 4, 8, 32],
        "threshold_prefixes": [16, 64, 256] if quick else [16, 32, 64, 128, 256, 512, 1024, 2048],
        "repeats": 3 if quick else 10,
        "num_requests": 8 if quick else 32,
        "new_tokens": 8 if quick else 64,
        "prefix_tokens": 512 if quick else 2048,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    _tune_cpu_allocator()  # as the engine does on CPU: kernel timings then match its gathers
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    triton = "yes" if ta.triton_available() else "no"
    console.print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                  f"CUDA: {cuda}, triton: {triton}; timings are noisy if other work shares the cores")
    t0 = time.perf_counter()
    if "kernels" in args.parts:
        kernels_part(args)
    if "threshold" in args.parts:
        threshold_part(args)
    if "engine" in args.parts:
        engine_part(args)
    console.print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
