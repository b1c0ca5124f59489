"""Forward pass of llama-family models (llama, mistral, qwen2, qwen3; GQA) over a paged KV pool.

The weights come from a ``transformers`` model, re-laid out for batched serving:
q/k/v and gate/up projections fused into one matrix each. The rotary embedding is
the model's own module, so every RoPE variant ``transformers`` knows works as-is.
A step runs the flattened new tokens of all scheduled requests at once: decode
tokens (one per request) first, then prefill chunks.
"""

from __future__ import annotations

import ctypes
import itertools
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from parrot.service.engine.builtin import cpu_kernels
from parrot.service.engine.builtin.quant import (
    GgufBlockSource,
    Q4Weight,
    Q8Weight,
    QuantConfig,
    Weight,
    linear,
    quantize,
    weight_nbytes,
)
from parrot.service.kernels import triton_attention
from parrot.service.kernels.attention import (
    contiguous_decode_attention,
    paged_decode_attention,
    prefill_attention,
    shared_prefix_decode_attention,
)

AttentionBackend = Literal["torch", "triton"]
AttentionBackendOption = Literal["auto", "torch", "triton"]


@dataclass
class DecodeGroup:
    """Consecutive decode rows attended together.

    With ``prefix_slots`` the rows share those cached prefix slots and run two-phase
    attention; ``slot_table`` then lists each row's keys after the prefix.
    """

    num_rows: int
    slot_table: torch.Tensor  # [B, L]
    mask: torch.Tensor | None  # [B, 1, 1, L] additive, None when no row is padded
    prefix_slots: torch.Tensor | None = None  # [P]
    # A lone row whose keys sit in consecutive slots [start, start + length): attention reads
    # them in place, with no gather (batch-1 decode on an unfragmented pool).
    slot_range: tuple[int, int] | None = None
    lengths: torch.Tensor | None = None  # [B] each row's keys in slot_table (None: all of them)


@dataclass
class ForwardBatch:
    """Tensors for one step: decode tokens (by group) first, then prefill chunks."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] KV slots the new tokens are written to
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (row, n, key slots)
    logit_rows: torch.Tensor | None = None  # [R] rows to compute logits for


@dataclass
class _CpuPlans:
    """A step's attention in the C kernel, set up once for all layers."""

    decode: list[cpu_kernels.DecodeAttention]  # one per decode group
    prefill: list[cpu_kernels.DecodeAttention]  # one per prefill chunk


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Weight
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: Weight
    post_norm: torch.Tensor
    gate_up: Weight
    down: Weight


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V one token takes in the pool, over all layers."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * dtype.itemsize


def resolve_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The decode attention backend ``name`` stands for on ``device``; ValueError if it cannot run.

    "auto" is torch for now: the Triton kernels are checked against torch in Triton's CPU
    interpreter, but have not yet run (nor been timed) on a GPU, so they are opt-in
    ("triton") until they have. On CPU they would run in the interpreter, which is for
    testing and far slower than torch.
    """
    if name not in get_args(AttentionBackendOption):
        raise ValueError(f"unknown attention backend {name!r}; use auto, torch or triton")
    if name == "auto":
        return "torch"
    if name == "triton" and not triton_attention.can_use_triton(device):
        if not triton_attention.triton_available():
            raise ValueError("attention backend 'triton' needs Triton, which is not installed; "
                             "use --attention-backend torch")
        raise ValueError(f"attention backend 'triton' cannot run on {device.type}: it needs a CUDA "
                         "device (or TRITON_INTERPRET=1 for CPU tests); use --attention-backend torch")
    return "triton" if name == "triton" else "torch"


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as transformers' LlamaRMSNorm, so greedy outputs agree; in float32
    # torch's own op computes exactly that in one call.
    if x.dtype == torch.float32:
        return torch.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, as transformers' ``apply_rotary_pos_emb`` computes it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LlamaRunner:
    def __init__(self, hf_model: PreTrainedModel, num_kv_slots: int, device: torch.device,
                 attention_backend: AttentionBackend = "torch", quant: QuantConfig | None = None,
                 gguf: Path | None = None) -> None:
        """``quant`` says how to keep the matmul weights (see quant.py); "gguf" reads the 4- and
        8-bit blocks from ``gguf``, the file ``hf_model`` was de-quantized from."""
        config = hf_model.config
        self.quant = quant or QuantConfig("none")
        self._gguf = GgufBlockSource(gguf, config) if self.quant.method == "gguf" and gguf else None
        self.config = config
        self.device = device
        self.attention_backend = attention_backend
        self.dtype = hf_model.dtype
        # With the quantized matmuls (float32, CPU) decode attention runs in C too: keys read
        # in place, a group's shared prefix once for all its rows, over the kernels' threads.
        self.cpu_decode_attention = (self.quant.enabled and device.type == "cpu"
                                     and self.dtype == torch.float32 and attention_backend != "triton")
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.vocab_size = config.vocab_size

        inner = hf_model.model
        self.embed = inner.embed_tokens.weight.detach().to(device)
        self.final_norm = inner.norm.weight.detach().to(device)
        tied = self._gguf is not None and "output.weight" not in self._gguf.tensors
        self.lm_head = self._matrix(hf_model.lm_head.weight, ["token_embd" if tied else "output"])
        self.rotary = inner.rotary_emb.to(device)
        self.layers = [self._fuse(i, layer) for i, layer in enumerate(inner.layers)]
        self._gguf = None  # the file's tensors are no longer needed
        # With every layer's matrices in blocks, each layer's work around the attention runs
        # in C too (csrc/decoder_layer.c).
        self._layer_refs: list[tuple[cpu_kernels.WeightRef, ...]] | None = None
        matrices = [(layer.qkv, layer.o_proj, layer.gate_up, layer.down) for layer in self.layers]
        if (self.cpu_decode_attention and self.head_dim % 2 == 0 and self.head_dim <= 512
                and all(layer.q_norm is None for layer in self.layers)
                and all(isinstance(m, Q4Weight | Q8Weight) for ms in matrices for m in ms)):
            self._layer_refs = [tuple(m.ref() for m in ms) for ms in matrices]  # type: ignore[union-attr]

        shape = (self.num_kv_heads, num_kv_slots, self.head_dim)  # head-major, see kernels
        self.k_pool = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.v_pool = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self._layer_stack = None if self._layer_refs is None else self._c_layer_stack(self._layer_refs)

    def _c_layer_stack(self, refs: list[tuple[cpu_kernels.WeightRef, ...]]) -> ctypes.Array:
        """Every layer's weights and pools as ``parrot_decoder_layers`` takes them (the array keeps
        the weight refs it points to alive)."""
        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        return (cpu_kernels.LayerRef * len(self.layers))(*(
            cpu_kernels.LayerRef(ptr(layer.input_norm), ptr(layer.post_norm), ptr(layer.qkv_bias),
                                 *(ctypes.pointer(ref) for ref in weights), ptr(k), ptr(v))
            for layer, weights, k, v in zip(self.layers, refs, self.k_pool, self.v_pool, strict=True)))

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the matmul weights one decode step reads (all layers and the LM head)."""
        mats = [m for layer in self.layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
        return sum(weight_nbytes(m) for m in [*mats, self.lm_head])

    def _matrix(self, weight: torch.Tensor, gguf_names: list[str]) -> Weight:
        """One matmul's weight as the quantization asks: the GGUF's own blocks where it has
        them in 4 or 8 bits, else quantized at load (int4wo, int8wo), else as it is (float,
        exactly what transformers holds)."""
        if self._gguf is not None:
            blocks = self._gguf.matrix(gguf_names, weight)
            if blocks is not None:
                return blocks
        return self._plain(weight)

    def _plain(self, weight: torch.Tensor) -> Weight:
        weight = weight.detach()
        if self.quant.method in ("int4wo", "int8wo"):
            return quantize(weight, self.quant)
        return weight.to(self.device)

    def _fuse(self, index: int, layer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        blk = f"blk.{index}."

        def to(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(self.device)

        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        return _Layer(
            input_norm=to(layer.input_layernorm.weight),
            qkv=self._matrix(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                             [blk + "attn_q", blk + "attn_k", blk + "attn_v"]),
            qkv_bias=None if biases[0] is None else to(torch.cat(biases)),
            q_norm=to(attn.q_norm.weight) if hasattr(attn, "q_norm") else None,
            k_norm=to(attn.k_norm.weight) if hasattr(attn, "k_norm") else None,
            o_proj=self._matrix(attn.o_proj.weight, [blk + "attn_output"]),
            post_norm=to(layer.post_attention_layernorm.weight),
            gate_up=self._matrix(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                                 [blk + "ffn_gate", blk + "ffn_up"]),
            down=self._matrix(mlp.down_proj.weight, [blk + "ffn_down"]),
        )

    def step_threads(self, num_rows: int) -> AbstractContextManager:
        """What a step of ``num_rows`` token rows runs under: torch on one thread, the C kernels
        on all (see ``cpu_kernels.torch_on_one_thread``), when the kernels do its heavy work:
        every step whose layers run in C, and a few rows' step of quantized matmuls."""
        if self._layer_refs is not None or (self.quant.enabled and num_rows <= cpu_kernels.FEW_ROWS):
            return cpu_kernels.torch_on_one_thread()
        return nullcontext()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one step; return float32 logits for ``batch.logit_rows``."""
        with self.step_threads(batch.input_ids.shape[0]):
            return self._forward(batch)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        h, kv = self.num_heads, self.num_kv_heads
        x = F.embedding(batch.input_ids, self.embed)
        cos, sin = self.rotary(x, batch.positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, D]
        # The decode groups are the same in every layer: plan the kernels' launch once a step.
        plan = None
        if self.attention_backend == "triton" and batch.decode_groups:
            plan = triton_attention.plan_decode(batch.decode_groups, h, kv, self.device)
        cpu_plans = self._cpu_attention_plans(batch) if self.cpu_decode_attention else None
        if self._layer_refs is not None and cpu_plans is not None:
            x = self._layers_in_c(x, cos, sin, batch, cpu_plans)
        else:
            x = self._layers_in_torch(x, cos, sin, batch, plan, cpu_plans)
        if batch.logit_rows is not None:
            x = x.index_select(0, batch.logit_rows)
        return linear(_rms_norm(x, self.final_norm, self.eps), self.lm_head).float()

    def _layers_in_c(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                     plans: _CpuPlans) -> torch.Tensor:
        """The decoder layers, attention included, in one C call (csrc/decoder_layer.c) instead
        of a dozen small torch ops a layer: fewer dispatches in a step of a few rows, the GIL
        handed over once a step, and every step size computes a row the same way."""
        assert self._layer_stack is not None
        n, hidden = x.shape
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        inter = self.layers[0].gate_up.out_features // 2
        x = x.contiguous()
        cos, sin = cos.reshape(n, d).contiguous(), sin.reshape(n, d).contiguous()
        qkv, normed, attn = torch.empty(n, (h + 2 * kv) * d), torch.empty(n, hidden), torch.empty(n, h * d)
        scratch = torch.empty(n * (2 * hidden + 3 * inter))
        # The attention plans in row order: the decode groups, then the prefill chunks.
        rows = list(itertools.accumulate((group.num_rows for group in batch.decode_groups), initial=0))[:-1]
        rows += [row for row, _, _ in batch.prefills]
        attention = [*plans.decode, *plans.prefill]
        refs = (cpu_kernels.AttentionPlanRef * len(attention))(
            *(plan.plan(row) for plan, row in zip(attention, rows, strict=True)))
        slots = batch.out_slots.contiguous()
        cpu_kernels.library().parrot_decoder_layers(
            x.data_ptr(), n, hidden, inter, self._layer_stack, len(self.layers), self.eps, h, kv, d,
            cos.data_ptr(), sin.data_ptr(), self.k_pool[0].shape[1], slots.data_ptr(), refs, len(attention),
            self.scale, normed.data_ptr(), qkv.data_ptr(), attn.data_ptr(), scratch.data_ptr(),
            cpu_kernels.threads())
        return x

    def _layers_in_torch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                         plan: triton_attention.DecodePlan | None,
                         cpu_plans: _CpuPlans | None) -> torch.Tensor:
        num_tokens = x.shape[0]
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qk = h + kv
        for i, layer in enumerate(self.layers):
            qkv = linear(_rms_norm(x, layer.input_norm, self.eps), layer.qkv, layer.qkv_bias)
            if layer.q_norm is None or layer.k_norm is None:
                # q and k sit side by side in qkv: one rotation for both (fewer small ops).
                rotated = _rope(qkv[:, :qk * d].view(num_tokens, qk, d), cos, sin)
                q, k = rotated[:, :h], rotated[:, h:]
            else:  # qwen3 normalizes each head of q and k first
                q = _rope(_rms_norm(qkv[:, :h * d].view(num_tokens, h, d), layer.q_norm, self.eps), cos, sin)
                k = _rope(_rms_norm(qkv[:, h * d:qk * d].view(num_tokens, kv, d), layer.k_norm, self.eps),
                          cos, sin)
            v = qkv[:, qk * d:].view(num_tokens, kv, d)
            self.k_pool[i].index_copy_(1, batch.out_slots, k.transpose(0, 1))
            self.v_pool[i].index_copy_(1, batch.out_slots, v.transpose(0, 1))
            attn = self._attention(q, i, batch, plan, cpu_plans)
            x = x + linear(attn.reshape(num_tokens, h * d), layer.o_proj)
            gate, up = linear(_rms_norm(x, layer.post_norm, self.eps), layer.gate_up).chunk(2, -1)
            x = x + linear(F.silu(gate) * up, layer.down)
        return x

    def _cpu_attention_plans(self, batch: ForwardBatch) -> _CpuPlans:
        """The C kernel set up for each decode group, and for each prefill chunk: its tokens
        are rows whose shared prefix is the request's cached keys and whose own keys run
        causally up to themselves. Every chunk size: on 2 cores it beats torch's flash attention
        from 65 to 2048 tokens (a 512-token prefill 0.62 against 0.85 s), whose threads spin
        after it and take the cores from the matmuls' workers."""
        prefills: list[cpu_kernels.DecodeAttention] = []
        for _, n, key_slots in batch.prefills:
            start = key_slots.shape[0] - n
            prefills.append(cpu_kernels.DecodeAttention(
                n, self.num_heads, self.head_dim, self.scale, table=key_slots[start:].expand(n, n),
                lengths=torch.arange(1, n + 1), prefix=key_slots[:start] if start else None))
        return _CpuPlans([self._cpu_decode_attention(group) for group in batch.decode_groups], prefills)

    def _cpu_decode_attention(self, group: DecodeGroup) -> cpu_kernels.DecodeAttention:
        """The C kernel set up for one decode group (see cpu_kernels.DecodeAttention)."""
        n, h, d = group.num_rows, self.num_heads, self.head_dim
        if group.slot_range is not None:
            first, length = group.slot_range
            return cpu_kernels.DecodeAttention(n, h, d, self.scale, table=None, first=first,
                                               lengths=torch.tensor([length]))
        lengths = group.lengths
        if lengths is None:
            lengths = torch.full((n,), group.slot_table.shape[1])
        return cpu_kernels.DecodeAttention(n, h, d, self.scale, table=group.slot_table, lengths=lengths,
                                           prefix=group.prefix_slots)

    def _attention(self, q: torch.Tensor, layer: int, batch: ForwardBatch,
                   plan: triton_attention.DecodePlan | None = None,
                   cpu_plans: _CpuPlans | None = None) -> torch.Tensor:
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]
        parts = []
        row = 0
        if plan is not None:
            # Every decode group, plain or two-phase, in the plan's two launches; the decode
            # rows come first in the batch, so they are q's first plan.num_rows rows.
            parts.append(triton_attention.decode_attention_triton(
                q[:plan.num_rows].contiguous(), k_pool, v_pool, plan, self.scale))
        for index, group in enumerate(batch.decode_groups if plan is None else ()):
            rows = q[row:row + group.num_rows]
            row += group.num_rows
            if cpu_plans is not None:
                # Keys read in place by the C kernel, the prefix once for a group (see cpu_kernels).
                parts.append(cpu_plans.decode[index](rows, k_pool, v_pool))
            elif group.slot_range is not None:
                start, length = group.slot_range
                parts.append(contiguous_decode_attention(
                    rows, k_pool[:, start:start + length], v_pool[:, start:start + length], self.scale))
            elif group.prefix_slots is None:
                parts.append(paged_decode_attention(
                    rows, k_pool, v_pool, group.slot_table, group.mask, self.scale))
            else:
                parts.append(shared_prefix_decode_attention(
                    rows, k_pool, v_pool, group.prefix_slots, group.slot_table, group.mask,
                    self.scale))
        for index, (row, n, key_slots) in enumerate(batch.prefills):
            if cpu_plans is not None:
                parts.append(cpu_plans.prefill[index](q[row:row + n], k_pool, v_pool))
                continue
            k = k_pool.index_select(1, key_slots)
            v = v_pool.index_select(1, key_slots)
            parts.append(prefill_attention(q[row:row + n], k, v, self.scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
