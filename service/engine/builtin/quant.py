"""Weight-only quantized matmuls for the builtin engine's forward pass.

A batch-1 decode step reads every weight once, so its time is the bytes it reads: the
default model de-quantized to float32 reads 7x the bytes its 4-bit GGUF holds. Here the
weights stay in blocks of 32 and the matmuls run on them (csrc/quant_matmul.c):

- ``gguf``: a GGUF file's own Q4_0/Q4_1 and Q8_0 blocks, kept as they are. A Q4 block is
  32 codes ``q`` in 0..15 with a scale ``d`` (and in Q4_1 a minimum ``m``); a weight is
  ``d*q + m`` (Q4_0: ``d*(q - 8)``). A Q8_0 block is 32 signed bytes and a scale.
- ``int4wo``: float weights quantized at load, group-wise with scale and minimum (as
  torchao's int4 weight-only); ``int4wo-64`` etc. pick the group size (default 32).
- ``int8wo``: float weights quantized at load to int8 per output channel.

The kernels turn a block into the exact float32 values the de-quantized model holds and
multiply them with float32 activations: the output differs from a float32 matmul on the
de-quantized weights only in the order of the sums, so the quantized model's greedy output
follows transformers' on those weights. Embeddings, norms, attention and the KV cache keep
the model's dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_kernels

QUANTIZATIONS = ("auto", "none", "gguf", "int4wo", "int8wo")
_INT4_GROUPS = (32, 64, 128, 256)
_BLOCK = 32


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
        method = ("gguf" if gguf is not None and device.type == "cpu" and gguf_has_int4(gguf)
                  and kernels_available() else "none")
    if method == "none":
        return QuantConfig("none")
    if device.type != "cpu":
        raise QuantizationError(
            f"quantization {method!r} runs on CPU only for now; use --quantization none on {device.type}")
    if not kernels_available():
        raise QuantizationError(f"the quantized matmuls are not built ({kernel_error()}); "
                                "use --quantization none")
    if method == "gguf":
        if gguf is None:
            raise QuantizationError("quantization 'gguf' needs a .gguf model; use int4wo or int8wo")
        if not gguf_has_int4(gguf):
            raise QuantizationError(f"{gguf.name} has no Q4_0/Q4_1 weights to keep; "
                                    "use --quantization none, int4wo or int8wo")
    return QuantConfig(method, group)


def kernels_available() -> bool:
    return cpu_kernels.available()


def kernel_error() -> str | None:
    try:
        cpu_kernels.library()
    except cpu_kernels.KernelBuildError as exc:
        return str(exc)
    return None


# ---- quantized weights ---------------------------------------------------------------
def _q4_values(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """float32 weights of Q4 codes ``q`` [N, K/32, 32]: ``(q + off)*d + m``, a product then a sum
    (two roundings), as gguf-py's de-quantizer computes them and the kernel does."""
    return ((q.float() + off[:, None, None]) * d[..., None] + m[..., None]).reshape(q.shape[0], -1)


def _block_matmul(weight: Q4Weight | Q8Weight, x: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` by the block kernels (csrc/quant_matmul.c), in float32.

    Any number of rows: on 2 cores the kernel keeps up with the BLAS on float32 weights up to
    a 512-token prefill (10.0 against 9.4 ms for a 3072x576 matrix), and de-quantizing first
    would cost more than that difference.
    """
    rows = x.reshape(-1, weight.in_features).to(torch.float32).contiguous()
    out = torch.empty(rows.shape[0], weight.out_features)
    cpu_kernels.library().parrot_weight_matmul(weight.ref(), rows.data_ptr(), rows.shape[0], out.data_ptr(),
                                               cpu_kernels.threads())
    return out.reshape(*x.shape[:-1], weight.out_features).to(x.dtype)


class Q4Weight:
    """``[N, K]`` weights in blocks of 32 four-bit codes: ``w = (q + off)*d + m``.

    ``codes`` holds a block in 16 bytes, weight j in byte j's low nibble and weight j + 16
    in its high one (GGUF's layout); ``d`` and ``m`` are float32 per block, ``off`` per row
    (-8 for Q4_0 rows, whose weights are ``d*(q - 8)``, else 0).
    """

    def __init__(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, off: torch.Tensor) -> None:
        # codes: int [N, K] in 0..15; d, m: float32 [N, K // 32]; off: float32 [N]
        self.out_features, self.in_features = codes.shape
        nibbles = codes.reshape(self.out_features, -1, _BLOCK).to(torch.uint8)
        self.codes = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).contiguous()
        self.d = d.to(torch.float32).contiguous()
        self.m = m.to(torch.float32).contiguous()
        self.off = off.to(torch.float32).contiguous()

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.d.nbytes + self.m.nbytes + self.off.nbytes

    def dequantize(self) -> torch.Tensor:
        """The float32 weights the packed blocks hold (for checks)."""
        q = torch.cat([self.codes & 0x0F, self.codes >> 4], dim=-1)
        return _q4_values(q, self.d, self.m, self.off)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _block_matmul(self, x)

    def ref(self) -> cpu_kernels.WeightRef:
        """This matrix as the C kernels take it (valid while this object lives)."""
        return cpu_kernels.WeightRef(4, self.out_features, self.in_features, self.codes.data_ptr(),
                                     self.d.data_ptr(), self.m.data_ptr(), self.off.data_ptr())


class Q8Weight:
    """``[N, K]`` weights in blocks of 32 signed bytes with a float32 scale: ``w = q*d``."""

    def __init__(self, codes: torch.Tensor, d: torch.Tensor) -> None:
        # codes: int8 [N, K]; d: float32 [N, K // 32]
        self.out_features, self.in_features = codes.shape
        self.codes = codes.to(torch.int8).contiguous()
        self.d = d.to(torch.float32).contiguous()

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.d.nbytes

    def dequantize(self) -> torch.Tensor:
        """The float32 weights ``q*d`` (for checks)."""
        q = self.codes.float().reshape(self.out_features, -1, _BLOCK)
        return (q * self.d[..., None]).reshape(self.out_features, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _block_matmul(self, x)

    def ref(self) -> cpu_kernels.WeightRef:
        """This matrix as the C kernels take it (valid while this object lives)."""
        return cpu_kernels.WeightRef(8, self.out_features, self.in_features, self.codes.data_ptr(),
                                     self.d.data_ptr(), None, None)


Weight = torch.Tensor | Q4Weight | Q8Weight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    out = weight(x)
    return out if bias is None else out + bias


def weight_nbytes(weight: Weight) -> int:
    return weight.nbytes if not isinstance(weight, torch.Tensor) else weight.numel() * weight.element_size()


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> Q4Weight:
    """Group-wise asymmetric 4-bit quantization of float weights (min/max per group)."""
    n, k = weight.shape
    if k % group_size:
        raise QuantizationError(f"in_features {k} is not a multiple of the group size {group_size}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
    per_block = group_size // _BLOCK  # a group of 64 is two blocks with the same scale and minimum
    return Q4Weight(codes.to(torch.int32).reshape(n, k), scales.repeat_interleave(per_block, 1),
                    low.repeat_interleave(per_block, 1), torch.zeros(n))


def quantize_int8(weight: torch.Tensor) -> Q8Weight:
    """int8 per output channel (symmetric), as blocks that all share their row's scale."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Q8Weight(codes, scales[:, None].expand(-1, w.shape[1] // _BLOCK))


def quantize(weight: torch.Tensor, config: QuantConfig) -> Weight:
    """``weight`` as ``config`` asks for float weights (int4wo, int8wo); others stay as they are."""
    if config.method == "int4wo" and weight.shape[1] % config.group_size == 0:
        return quantize_int4(weight, config.group_size)
    if config.method == "int8wo" and weight.shape[1] % _BLOCK == 0:
        return quantize_int8(weight)
    return weight


# ---- GGUF blocks -------------------------------------------------------------------------
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass
class GgufBlocks:
    """One GGUF tensor's Q4_0, Q4_1 or Q8_0 blocks, unpacked.

    ``codes`` [N, K]: 0..15 for Q4, -128..127 for Q8; ``d`` and ``m`` [N, K/32]; ``off`` [N].
    A Q4 weight is ``(q + off)*d + m`` (Q4_0: off -8 and m 0; Q4_1: off 0); a Q8 weight ``q*d``.
    """

    bits: int  # 4 or 8
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    off: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """float32 weights, with the arithmetic of gguf-py's (and so transformers') de-quantizer."""
        if self.bits == 8:
            return self.to_weight().dequantize()
        return _q4_values(self.codes.reshape(self.d.shape[0], -1, _BLOCK), self.d, self.m, self.off)

    def rows(self, order: torch.Tensor) -> GgufBlocks:
        return GgufBlocks(self.bits, self.codes[order], self.d[order], self.m[order], self.off[order])

    def to_weight(self) -> Q4Weight | Q8Weight:
        if self.bits == 8:
            return Q8Weight(self.codes, self.d)
        return Q4Weight(self.codes, self.d, self.m, self.off)


def concat(parts: list[GgufBlocks]) -> GgufBlocks | None:
    """Stack tensors' rows (q, k and v into one qkv matrix); None when their block sizes differ."""
    if len({p.bits for p in parts}) != 1:
        return None
    fields = (torch.cat([getattr(p, name) for p in parts]) for name in ("codes", "d", "m", "off"))
    return GgufBlocks(parts[0].bits, *fields)


def read_gguf_blocks(tensor) -> GgufBlocks | None:
    """A ``gguf.GGUFReader`` tensor's Q4_0/Q4_1/Q8_0 blocks; None when it is of another type."""
    kind = tensor.tensor_type.name
    if kind not in _BLOCK_BYTES:
        return None
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES[kind])

    def half(at: int) -> torch.Tensor:
        return torch.from_numpy(blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32))

    d = half(0)
    if kind == "Q8_0":
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, -1))
        return GgufBlocks(8, codes, d, torch.zeros_like(d), torch.zeros(rows))
    start = 4 if kind == "Q4_1" else 2
    qs = blocks[..., start:start + 16]
    # Byte j of a block holds weight j in its low nibble and weight j + 16 in its high one.
    codes = torch.from_numpy(np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1).astype(np.int32))
    if kind == "Q4_1":
        return GgufBlocks(4, codes, d, half(2), torch.zeros(rows))
    return GgufBlocks(4, codes, d, torch.zeros_like(d), torch.full((rows,), -8.0))


def gguf_has_int4(path: Path) -> bool:
    from gguf import GGUFReader

    return any(t.tensor_type.name in ("Q4_0", "Q4_1") for t in GGUFReader(str(path)).tensors)


def llama_rope_row_order(num_rows: int, num_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation, as transformers' GGUF loader does."""
    dim = num_rows // num_heads // 2
    return torch.arange(num_rows).reshape(num_heads, dim, 2).transpose(1, 2).reshape(-1)


class GgufBlockSource:
    """A GGUF file's 4- and 8-bit matrices for a llama-family model, matched to its transformers weights.

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

    def matrix(self, names: list[str], reference: torch.Tensor) -> Q4Weight | Q8Weight | None:
        """The rows of GGUF tensors ``names`` stacked, in their blocks; None when one is of
        another type (or they mix 4 and 8 bits)."""
        parts = []
        for name in names:
            tensor = self.tensors.get(name + ".weight")
            part = None if tensor is None else read_gguf_blocks(tensor)
            if part is None:
                return None
            if self.permutes_qk and (".attn_q" in name or ".attn_k" in name):
                config = self.config
                heads = config.num_attention_heads if ".attn_q" in name else config.num_key_value_heads
                part = part.rows(llama_rope_row_order(part.codes.shape[0], heads))
            parts.append(part)
        blocks = parts[0] if len(parts) == 1 else concat(parts)
        if blocks is None:
            return None
        if not torch.equal(blocks.dequantize(), reference.detach().float().cpu()):
            raise QuantizationError(
                f"the blocks of {', '.join(names)} do not reproduce the weights transformers "
                "loaded from the same file; serve it with --quantization none")
        return blocks.to_weight()
