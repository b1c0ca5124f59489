"""Triton versions of the paged decode attentions in ``attention`` (same arguments, same results).

Two kernels cover every decode group of a step, plain or sharing a prefix:

* ``prefix_partial_kernel`` — phase 1 of two-phase attention. One program takes a
  block of one prefix group's ``B * G`` query rows (request-major: row ``b * G + g``
  is query head ``kv * G + g`` of request ``b``), one KV head, and one split of the
  group's prefix slots; each prefix K/V block it loads serves the whole query block.
  It writes a partial output and log-sum-exp per (split, request, head).
* ``decode_kernel`` — one program per (request, KV head), the ``G`` query heads of
  that KV head as the rows of one tile (GQA without repeating K/V). Its online
  softmax starts from the request's prefix partials, if it has any, and goes on over
  the request's own keys: the suffix pass and the log-sum-exp merge in one.

Several prefix groups run in the same two launches: the prefix slots of all groups
lie back to back, each query block names its group, each request row names how many
prefix partials to merge (0 for a plain row)::

    prefix_slots  [ g0: P0 slots | g1: P1 slots ]      prefix_start [0, P0]  prefix_len [P0, P1]
    query blocks  (g0, rows 0..BLOCK_M) (g0, ...) (g1, rows B0*G..) ...
    table         [B, W] each row's keys after its prefix (all its keys for a plain row)

Use: ``plan = plan_decode(groups, H, KV, device)`` once per step (host work and small
copies), then ``decode_attention_triton(q, k_pool[i], v_pool[i], plan, scale)`` per
layer. ``paged_decode_attention_triton`` and ``shared_prefix_decode_attention_triton``
take the torch functions' arguments (one group, planned on every call).

The kernels run on CUDA tensors, or on CPU tensors when triton was imported under
``TRITON_INTERPRET=1`` (the tests do that, in a child process). Anywhere else, or
without triton, the wrappers call the torch references: callers need no check.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F

from parrot.service.kernels.attention import paged_decode_attention, shared_prefix_decode_attention

BLOCK_N = 64  # keys per inner-loop step
BLOCK_M = 64  # query rows per prefix program
MIN_SPLIT_KEYS = 256  # fewest prefix keys worth a split of their own
LOG2E = math.log2(math.e)  # the kernels work in exp2


class DecodeGroupLike(Protocol):
    """What the kernels need of a decode group (``engine.builtin.model.DecodeGroup`` fits)."""

    num_rows: int
    slot_table: torch.Tensor  # [B, L] keys after the prefix (all keys when no prefix)
    mask: torch.Tensor | None  # [B, 1, 1, L] additive key-prefix mask (``additive_mask``)
    prefix_slots: torch.Tensor | None  # [P] shared prefix slots, None for a plain group


@dataclass
class Group:
    """A ``DecodeGroupLike`` built from loose arguments."""

    num_rows: int
    slot_table: torch.Tensor
    mask: torch.Tensor | None
    prefix_slots: torch.Tensor | None = None


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (not whether it can run here: see ``can_use_triton``)."""
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def interpret_mode() -> bool:
    """Whether triton runs kernels in its CPU interpreter.

    That takes ``TRITON_INTERPRET=1`` in the environment when triton is first imported
    (its own library functions are wrapped then), not merely set later.
    """
    if not triton_available():
        return False
    from triton.language import standard

    return type(standard.max).__name__ == "InterpretedFunction"


def can_use_triton(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``."""
    if device.type == "cuda":
        return triton_available() and not interpret_mode()
    return device.type == "cpu" and interpret_mode()


def _kernels() -> ModuleType:
    # @triton.jit reads TRITON_INTERPRET when it runs: make our kernels match triton's own.
    module = importlib.import_module("parrot.service.kernels._triton_decode")
    interpreting = interpret_mode()
    if (type(module.decode_kernel).__name__ == "InterpretedFunction") != interpreting:
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpreting else "0"
        try:
            module = importlib.reload(module)
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
    return module


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def _lengths(group: DecodeGroupLike) -> torch.Tensor:
    table = group.slot_table
    if group.mask is None:
        return torch.full((table.shape[0],), table.shape[1], dtype=torch.int32, device=table.device)
    # additive_mask's layout: 0 for the first lengths[b] keys, -inf after.
    return (group.mask.reshape(table.shape[0], -1) == 0).sum(-1, dtype=torch.int32)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pick_splits(device: torch.device, num_programs: int, max_prefix: int) -> int:
    """Split the prefix so that the launch fills the GPU about twice over."""
    if device.type != "cuda":
        return 1
    wanted = math.ceil(2 * _num_sms(device.index or 0) / max(num_programs, 1))
    return max(1, min(wanted, math.ceil(max_prefix / MIN_SPLIT_KEYS)))


def _has_prefix(group: DecodeGroupLike) -> bool:
    return group.prefix_slots is not None and group.prefix_slots.numel() > 0


@dataclass
class PrefixArgs:
    """Phase-1 arguments: the prefix groups' slots back to back and their query blocks."""

    slots: torch.Tensor  # [sum P] int64
    start: torch.Tensor  # [num prefix groups] int32
    length: torch.Tensor  # [num prefix groups] int32
    blocks: torch.Tensor  # [3, num blocks] int32: group, first row, end row (b * G + g units)
    num_splits: int
    split_len: int  # keys per split, a multiple of block_n
    block_m: int


@dataclass
class DecodePlan:
    """A step's launch arguments, the same for every layer: build once with ``plan_decode``."""

    groups: Sequence[DecodeGroupLike]  # kept for the torch fallback
    num_rows: int
    group_size: int  # G, query heads per KV head
    use_triton: bool
    table: torch.Tensor  # [B, W] int64, the groups' tables padded to one width
    lengths: torch.Tensor  # [B] int32
    row_splits: torch.Tensor  # [B] int32, prefix partials to merge per row (0: plain)
    block_n: int
    prefix: PrefixArgs | None  # None: no group shares a prefix


def plan_decode(
    groups: Sequence[DecodeGroupLike],
    num_heads: int,
    num_kv_heads: int,
    device: torch.device,
    *,
    num_splits: int | None = None,  # prefix splits (None: picked for the device)
    block_n: int = BLOCK_N,
    block_m: int = BLOCK_M,
) -> DecodePlan:
    """Flatten a step's decode groups (plain or sharing a prefix) into kernel arguments."""
    g_size = num_heads // num_kv_heads
    num_rows = sum(g.num_rows for g in groups)
    if not can_use_triton(device):
        empty = torch.empty(0)
        return DecodePlan(groups, num_rows, g_size, False, empty, empty, empty, block_n, None)
    width = max(g.slot_table.shape[1] for g in groups)
    table = torch.cat([F.pad(g.slot_table, (0, width - g.slot_table.shape[1])) for g in groups])
    lengths = torch.cat([_lengths(g) for g in groups]).to(device)

    prefixes: list[torch.Tensor] = []
    starts: list[int] = []
    blocks: list[tuple[int, int, int]] = []
    row_has_prefix: list[bool] = []
    block_m = min(block_m, _pow2(max(g.num_rows for g in groups) * g_size))
    row, offset = 0, 0
    for group in groups:
        slots = group.prefix_slots
        shared = slots is not None and slots.numel() > 0
        row_has_prefix += [shared] * group.num_rows
        if slots is not None and shared:
            starts.append(offset)
            offset += slots.numel()
            lo, hi = row * g_size, (row + group.num_rows) * g_size
            blocks += [(len(prefixes), r, min(r + block_m, hi)) for r in range(lo, hi, block_m)]
            prefixes.append(slots)
        row += group.num_rows
    i32 = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    prefix = None
    if prefixes:
        lens = [p.numel() for p in prefixes]
        splits = num_splits or _pick_splits(device, num_kv_heads * len(blocks), max(lens))
        split_len = block_n * math.ceil(max(lens) / splits / block_n)
        prefix = PrefixArgs(
            slots=torch.cat(prefixes).to(device, torch.int64), start=i32(starts), length=i32(lens),
            blocks=i32(blocks).T.contiguous(), num_splits=math.ceil(max(lens) / split_len),
            split_len=split_len, block_m=block_m,
        )
    row_splits = i32([prefix.num_splits if prefix and p else 0 for p in row_has_prefix])
    return DecodePlan(groups, num_rows, g_size, True, table.to(device, torch.int64).contiguous(), lengths,
                      row_splits, block_n, prefix)


def decode_attention_triton(
    q: torch.Tensor,  # [B, H, D], the decode rows of all groups, group after group
    k_pool: torch.Tensor,  # [KV, S, D]
    v_pool: torch.Tensor,  # [KV, S, D]
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor:
    """Decode attention for every group of a step in two launches (one without prefix groups)."""
    if not plan.use_triton:
        return _grouped_torch(q, k_pool, v_pool, plan.groups, scale)
    if q.shape[0] != plan.num_rows:
        raise ValueError(f"q has {q.shape[0]} rows, the plan {plan.num_rows}")
    kernels = _kernels()
    num_rows, num_heads, d = q.shape
    num_kv = k_pool.shape[0]
    q = q.to(k_pool.dtype).contiguous()
    out = torch.empty_like(q)
    consts = dict(G=plan.group_size, D=d, BLOCK_D=_pow2(d), BLOCK_N=plan.block_n,
                  PRECISION="ieee" if k_pool.dtype == torch.float32 else "tf32")
    pool_strides = (k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1))
    pre = plan.prefix
    o_part = lse_part = out  # placeholders when no group shares a prefix
    if pre is not None:
        o_part = q.new_empty(pre.num_splits, num_rows, num_heads, d, dtype=torch.float32)
        lse_part = q.new_empty(pre.num_splits, num_rows, num_heads, dtype=torch.float32)
    part_strides = (o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0),
                    lse_part.stride(1))
    if pre is not None:
        kernels.prefix_partial_kernel[(num_kv, pre.blocks.shape[1], pre.num_splits)](
            q, k_pool, v_pool, pre.slots, pre.start, pre.length,
            pre.blocks[0], pre.blocks[1], pre.blocks[2], o_part, lse_part, pre.split_len,
            q.stride(0), q.stride(1), *pool_strides, *part_strides, scale * LOG2E,
            BLOCK_M=pre.block_m, **consts,
        )
    kernels.decode_kernel[(num_rows, num_kv)](
        q, k_pool, v_pool, out, plan.table, plan.lengths, plan.row_splits, o_part, lse_part,
        q.stride(0), q.stride(1), plan.table.stride(0), *pool_strides, out.stride(0), out.stride(1),
        *part_strides, scale * LOG2E,
        G_PAD=_pow2(plan.group_size), **consts,
    )
    return out


def grouped_decode_attention_triton(
    q: torch.Tensor,  # [B, H, D], the decode rows of all groups, group after group
    k_pool: torch.Tensor,  # [KV, S, D]
    v_pool: torch.Tensor,  # [KV, S, D]
    groups: Sequence[DecodeGroupLike],
    scale: float,
    **plan_options,  # num_splits, block_n, block_m: see ``plan_decode``
) -> torch.Tensor:
    """``plan_decode`` then ``decode_attention_triton``; ``[B, H, D]``."""
    plan = plan_decode(groups, q.shape[1], k_pool.shape[0], q.device, **plan_options)
    return decode_attention_triton(q, k_pool, v_pool, plan, scale)


def _grouped_torch(q, k_pool, v_pool, groups: Sequence[DecodeGroupLike], scale: float) -> torch.Tensor:
    parts, row = [], 0
    for g in groups:
        rows = q[row:row + g.num_rows]
        row += g.num_rows
        if not _has_prefix(g):
            parts.append(paged_decode_attention(rows, k_pool, v_pool, g.slot_table, g.mask, scale))
        else:
            parts.append(shared_prefix_decode_attention(
                rows, k_pool, v_pool, g.prefix_slots, g.slot_table, g.mask, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def paged_decode_attention_triton(
    q: torch.Tensor,  # [B, H, D]
    k_pool: torch.Tensor,  # [KV, S, D]
    v_pool: torch.Tensor,
    slot_table: torch.Tensor,  # [B, L]
    mask: torch.Tensor | None,  # [B, 1, 1, L] from ``additive_mask``; None = all valid
    scale: float,
) -> torch.Tensor:
    """``attention.paged_decode_attention`` as one Triton launch."""
    group = Group(q.shape[0], slot_table, mask)
    return grouped_decode_attention_triton(q, k_pool, v_pool, [group], scale)


def shared_prefix_decode_attention_triton(
    q: torch.Tensor,  # [B, H, D]; all B share the prefix
    k_pool: torch.Tensor,  # [KV, S, D]
    v_pool: torch.Tensor,
    prefix_slots: torch.Tensor,  # [P]
    suffix_table: torch.Tensor,  # [B, Ls]
    suffix_mask: torch.Tensor | None,  # [B, 1, 1, Ls] from ``additive_mask``; None = all valid
    scale: float,
) -> torch.Tensor:
    """``attention.shared_prefix_decode_attention`` as two Triton launches."""
    group = Group(q.shape[0], suffix_table, suffix_mask, prefix_slots)
    return grouped_decode_attention_triton(q, k_pool, v_pool, [group], scale)
