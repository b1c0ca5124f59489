"""Weight-only quantized matmuls for the builtin engine's forward pass.

A batch-1 decode step reads every weight once, so its time is the bytes it reads: the
default model de-quantized to float32 reads 8x the bytes its 4-bit GGUF holds. Here the
weights stay small and the matmuls run on torch's packed CPU kernels:

- ``gguf``: a GGUF file's own Q4_0/Q4_1 blocks, kept as they are. A block is 32 weights
  with a float16 scale ``d`` (and in Q4_1 a minimum ``m``): ``w = d*q + m``, ``q`` in
  0..15. torch's int4 kernel computes ``(q - 8)*scale + zero`` per group of 32, so
  ``scale = d`` and ``zero = m + 8d`` (Q4_0: ``w = d*(q - 8)``, ``zero = 0``). The 4-bit
  codes are the file's; the kernel needs scale and zero in bfloat16, so those (and the
  activations it multiplies) are rounded to bfloat16.
- ``int4wo``: float weights quantized at load, group-wise with scale and zero (as
  torchao's int4 weight-only); ``int4wo-64`` etc. pick the group size (default 32).
- ``int8wo``: float weights quantized at load to int8 per output channel.

Everything else (embeddings, norms, the attention and the KV cache) keeps the model's
dtype; a quantized matmul takes bfloat16 in and gives the caller's dtype back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

QUANTIZATIONS = ("auto", "none", "gguf", "int4wo", "int8wo")
_INT4_GROUPS = (32, 64, 128, 256)
_COMPUTE = torch.bfloat16  # the packed CPU kernels are fast in bfloat16 only


class QuantizationError(ValueError):
    pass


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "none", "gguf", "int4wo" or "int8wo"
    group_size: int = 32  # int4wo

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def parse_quantization(name: str) -> tuple[str, int]:
    """Check a ``--quantization`` value; return (method, int4 group size)."""
    match = re.fullmatch(r"int4wo(?:-(\d+))?", name)
    if match:
        group = int(match.group(1) or 32)
        if group not in _INT4_GROUPS:
            raise QuantizationError(f"int4wo group size must be one of {_INT4_GROUPS}, not {group}")
        return "int4wo", group
    if name not in QUANTIZATIONS:
        raise QuantizationError(
            f"unknown quantization {name!r}; use auto, none, gguf, int4wo[-32|-64|-128|-256] or int8wo")
    return name, 32


def resolve_quantization(name: str, *, gguf: Path | None, device: torch.device) -> QuantConfig:
    """What ``name`` means for a model (``gguf`` when it comes from a GGUF file) on ``device``.

    "auto" keeps a GGUF file's 4-bit blocks on CPU and serves everything else as it is.
    """
    method, group = parse_quantization(name)
    if method == "auto":
        method = "gguf" if gguf is not None and device.type == "cpu" and gguf_has_int4(gguf) else "none"
    if method == "none":
        return QuantConfig("none")
    if device.type != "cpu":
        raise QuantizationError(
            f"quantization {method!r} runs on CPU only for now; use --quantization none on {device.type}")
    if not int4_kernels_available():
        raise QuantizationError("this torch build lacks the packed int4/int8 CPU kernels; "
                                "use --quantization none")
    if method == "gguf":
        if gguf is None:
            raise QuantizationError("quantization 'gguf' needs a .gguf model; use int4wo or int8wo")
        if not gguf_has_int4(gguf):
            raise QuantizationError(f"{gguf.name} has no Q4_0/Q4_1 weights to keep; "
                                    "use --quantization none, int4wo or int8wo")
    return QuantConfig(method, group)


def int4_kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_weight_int8pack_mm")


# ---- quantized weights ---------------------------------------------------------------
class Int4Weight:
    """``[N, K]`` weights as packed 4-bit codes with a scale and zero per group of K."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> None:
        # codes: int32 [N, K] in 0..15; scales, zeros: float32 [N, K // group_size]
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        self.scales_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(_COMPUTE)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(_COMPUTE), self.packed, self.group_size,
                                                          self.scales_zeros)
        return out.to(x.dtype)


class Int8Weight:
    """``[N, K]`` weights as int8 with one scale per output channel."""

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(_COMPUTE)
        self.out_features, self.in_features = w.shape

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return torch.ops.aten._weight_int8pack_mm(x.to(_COMPUTE), self.codes, self.scales).to(x.dtype)


class BFloat16Weight:
    """Float weights kept in bfloat16, multiplied in bfloat16 (half the bytes of float32)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.to(_COMPUTE).contiguous()

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(_COMPUTE), self.weight).to(x.dtype)


Weight = torch.Tensor | Int4Weight | Int8Weight | BFloat16Weight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    out = weight(x)
    return out if bias is None else out + bias


def weight_nbytes(weight: Weight) -> int:
    return weight.nbytes if not isinstance(weight, torch.Tensor) else weight.numel() * weight.element_size()


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
    """Group-wise asymmetric 4-bit quantization of float weights (min/max per group)."""
    n, k = weight.shape
    if k % group_size:
        raise QuantizationError(f"in_features {k} is not a multiple of the group size {group_size}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
    return Int4Weight(codes.to(torch.int32).reshape(n, k), scales, low + 8 * scales, group_size)


def quantize(weight: torch.Tensor, config: QuantConfig) -> Weight:
    """``weight`` as ``config`` asks for float weights (int4wo, int8wo); others stay as they are."""
    if config.method == "int4wo" and weight.shape[1] % config.group_size == 0:
        return quantize_int4(weight, config.group_size)
    if config.method == "int8wo":
        return Int8Weight(weight)
    return weight


# ---- GGUF blocks -------------------------------------------------------------------------
_BLOCK = 32
_Q4_BYTES = {"Q4_0": 18, "Q4_1": 20}


@dataclass
class GgufInt4:
    """One GGUF tensor's Q4_0/Q4_1 blocks, unpacked: codes [N, K], scale d and minimum m [N, K/32]."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None  # None for Q4_0 (whose weights are d*(q - 8))

    def dequantize(self) -> torch.Tensor:
        """float32 weights, with the arithmetic of gguf-py's (and so transformers') de-quantizer."""
        q = self.codes.float().reshape(self.d.shape[0], -1, _BLOCK)
        if self.m is None:
            w = self.d[..., None] * (q - 8)
        else:
            w = self.d[..., None] * q + self.m[..., None]
        return w.reshape(self.codes.shape)

    def rows(self, order: torch.Tensor) -> GgufInt4:
        return GgufInt4(self.codes[order], self.d[order], None if self.m is None else self.m[order])

    def to_weight(self) -> Int4Weight:
        zeros = torch.zeros_like(self.d) if self.m is None else self.m + 8 * self.d
        return Int4Weight(self.codes, self.d, zeros, _BLOCK)


def concat(parts: list[GgufInt4]) -> GgufInt4:
    """Stack tensors' rows (q, k and v into one qkv matrix); a mix of Q4_0 and Q4_1 becomes Q4_1."""
    codes = torch.cat([p.codes for p in parts])
    d = torch.cat([p.d for p in parts])
    if all(p.m is None for p in parts):
        return GgufInt4(codes, d, None)
    return GgufInt4(codes, d, torch.cat([p.m if p.m is not None else -8 * p.d for p in parts]))


def read_gguf_int4(tensor) -> GgufInt4 | None:
    """A ``gguf.GGUFReader`` tensor's Q4_0/Q4_1 blocks; None when it is of another type."""
    if tensor.tensor_type.name not in _Q4_BYTES:
        return None
    block_bytes = _Q4_BYTES[tensor.tensor_type.name]
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = None
    start = 2
    if block_bytes == 20:
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        start = 4
    qs = blocks[..., start:start + 16]
    # Byte j of a block holds weight j in its low nibble and weight j + 16 in its high one.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
    return GgufInt4(torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(d), m)


def gguf_has_int4(path: Path) -> bool:
    from gguf import GGUFReader

    return any(t.tensor_type.name in _Q4_BYTES for t in GGUFReader(str(path)).tensors)


def llama_rope_row_order(num_rows: int, num_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation, as transformers' GGUF loader does."""
    dim = num_rows // num_heads // 2
    return torch.arange(num_rows).reshape(num_heads, dim, 2).transpose(1, 2).reshape(-1)


class GgufInt4Source:
    """A GGUF file's 4-bit matrices for a llama-family model, matched to its transformers weights.

    Each matrix is checked against the de-quantized weight transformers loaded from the same
    file: the codes must give exactly those values, or loading stops (the file's layout is
    not what this reader expects, and serving from it would compute something else).
    """

    def __init__(self, path: Path, config) -> None:
        from gguf import GGUFReader

        self.tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
        self.config = config
        # transformers undoes llama.cpp's q/k row permutation for llama models only.
        self.permutes_qk = config.model_type in ("llama", "mistral")

    def matrix(self, names: list[str], reference: torch.Tensor) -> Int4Weight | None:
        """The rows of GGUF tensors ``names`` stacked, as int4; None when one is not Q4_0/Q4_1."""
        parts = []
        for name in names:
            tensor = self.tensors.get(name + ".weight")
            part = None if tensor is None else read_gguf_int4(tensor)
            if part is None:
                return None
            if self.permutes_qk and (".attn_q" in name or ".attn_k" in name):
                config = self.config
                heads = config.num_attention_heads if ".attn_q" in name else config.num_key_value_heads
                part = part.rows(llama_rope_row_order(part.codes.shape[0], heads))
            parts.append(part)
        blocks = parts[0] if len(parts) == 1 else concat(parts)
        if not torch.equal(blocks.dequantize(), reference.detach().float().cpu()):
            raise QuantizationError(
                f"the 4-bit blocks of {', '.join(names)} do not reproduce the weights transformers "
                "loaded from the same file; serve it with --quantization none")
        return blocks.to_weight()
