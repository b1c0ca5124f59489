"""The builtin engine's C kernels (csrc/), built at first use: matmuls on quantized weight
blocks (quant_matmul.c), decode attention (decode_attention.c), the rest of the decoder
layers, a step's whole stack in one call (decoder_layer.c), and the thread pool they run on
(thread_pool.c).

The sources are compiled once per machine with the system C compiler for the machine's own
instruction set (``-march=native``) and cached by a hash of the source, the compiler and
the CPU, so a second process (or a second engine) loads the built library at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from parrot.service.engine.builtin import model_cache

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("thread_pool.c", "quant_matmul.c", "decode_attention.c", "decoder_layer.c")]
_HEADERS = [Path(__file__).with_name("csrc") / name
            for name in ("thread_pool.h", "quant_matmul.h", "decode_attention.h", "vector_exp.h")]
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-pthread", "-shared", "-fPIC"]
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None
_threads: int | None = None  # set while torch's own ops run on one thread (see torch_on_one_thread)
_SPIN_NS = 300_000  # how long the kernels' idle workers spin then, before they sleep
FEW_ROWS = 16  # a step of at most this many tokens holds torch to one thread even with its layers in torch


class KernelBuildError(RuntimeError):
    pass


class WeightRef(ctypes.Structure):
    """A matrix of 4- or 8-bit blocks as the C kernels take it (``parrot_weight``)."""

    _fields_ = [("bits", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("off", ctypes.c_void_p)]


class LayerRef(ctypes.Structure):
    """One decoder layer's weights and KV pools as ``parrot_decoder_layers`` takes them
    (``parrot_layer``); ``qkv_bias`` may be None."""

    _fields_ = [*((name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "qkv_bias")),
                *((name, ctypes.POINTER(WeightRef)) for name in ("qkv", "o", "gate_up", "down")),
                ("k_pool", ctypes.c_void_p), ("v_pool", ctypes.c_void_p)]


class AttentionPlanRef(ctypes.Structure):
    """A DecodeAttention over the step's rows ``row .. row + rows`` (``parrot_attention_plan``)."""

    _fields_ = [("row", ctypes.c_int64), ("rows", ctypes.c_int64), ("prefix", ctypes.c_void_p),
                ("prefix_len", ctypes.c_int64), ("table", ctypes.c_void_p), ("ldt", ctypes.c_int64),
                ("first", ctypes.c_int64), ("lengths", ctypes.c_void_p), ("scratch", ctypes.c_void_p)]


def cache_dir() -> Path:
    """Where built libraries are kept: ``kernels`` in Parrot's cache (see model_cache)."""
    return model_cache.cache_dir() / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def build(directory: Path, march: str = "native") -> ctypes.CDLL:
    """The library built for ``march`` (cached in ``directory``), loaded and declared."""
    cc = _compiler()
    if cc is None:
        raise KernelBuildError("no C compiler (cc or gcc) to build the CPU kernels")
    flags = [*_FLAGS, f"-march={march}"]
    source = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + version.encode() + " ".join(flags).encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    target = directory / f"parrot_kernels-{key}.so"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: processes starting together never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        command = [cc, *flags, "-o", tmp, *map(str, _SOURCES), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise KernelBuildError(f"building the CPU kernels failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    return _declare(ctypes.CDLL(str(target)))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.parrot_q4_matmul.argtypes = [p, i64, i64, i64, p, p, p, p, p, i64, i64, i32]
    lib.parrot_q8_matmul.argtypes = [p, i64, i64, i64, p, p, p, i64, i64, i32]
    lib.parrot_q4_matmul.restype = lib.parrot_q8_matmul.restype = None
    lib.parrot_quant_simd.restype = ctypes.c_int
    lib.parrot_pool_spin.argtypes = [i64]
    lib.parrot_pool_spin.restype = None
    lib.parrot_decode_attention.argtypes = [p, i64, p, p, i64, i64, i64, i64, i64, p, i64, p, i64, i64, p,
                                            ctypes.c_float, p, p, i32]
    lib.parrot_decode_attention.restype = None
    lib.parrot_decode_attention_scratch.argtypes = [i64, i64, i64, i32]
    lib.parrot_decode_attention_scratch.restype = i64
    f32, weight = ctypes.c_float, ctypes.POINTER(WeightRef)
    lib.parrot_attention_input.argtypes = [p, i64, i64, p, f32, weight, p, i64, i64, i64, p, p, p, p, i64, p,
                                           p, p, i32]
    lib.parrot_mlp_block.argtypes = [p, i64, i64, i64, p, weight, p, f32, weight, weight, p, i32]
    lib.parrot_attention_input.restype = lib.parrot_mlp_block.restype = None
    lib.parrot_weight_matmul.argtypes = [weight, p, i64, p, i32]
    lib.parrot_weight_matmul.restype = None
    layers, plans = ctypes.POINTER(LayerRef), ctypes.POINTER(AttentionPlanRef)
    lib.parrot_decoder_layers.argtypes = [p, i64, i64, i64, layers, i64, f32, i64, i64, i64, p, p, i64, p,
                                          plans, i64, f32, p, p, p, p, i32]
    lib.parrot_decoder_layers.restype = None
    return lib


def library() -> ctypes.CDLL:
    """The built library; raises KernelBuildError (every time) when it cannot be built."""
    global _library, _error
    with _lock:
        if _library is None and _error is None:
            try:
                _library = build(cache_dir())
            except (KernelBuildError, OSError) as exc:
                _error = str(exc)
        if _library is None:
            raise KernelBuildError(_error)
        return _library


def available() -> bool:
    try:
        library()
    except KernelBuildError:
        return False
    return True


def threads() -> int:
    """How many threads the kernels split a matmul over: torch's count, also while
    torch_on_one_thread holds torch to one."""
    return _threads or torch.get_num_threads()


@contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """A step whose heavy work is in the kernels: torch's own ops on one thread, the kernels on all.

    Torch's ops in such a step (embedding, rotary tables, the glue between kernels) are too
    small to gain from a second thread, and its idle threads spin after each op, taking the
    cores from the kernels' workers; with torch on one thread those workers may spin between
    kernels instead of sleeping, as a step's kernels come every few dozen microseconds.
    Measured on 2 cores with the default model: a batch-1 decode step 7.4 ms this way against
    8.3 ms with torch on both threads; a 256-token prefill 247 against 265 ms. Nested, the inner
    one does nothing.
    """
    global _threads
    count = torch.get_num_threads()
    if count == 1 or _threads is not None:
        yield
        return
    _threads = count
    torch.set_num_threads(1)
    lib = library()
    lib.parrot_pool_spin(_SPIN_NS)
    try:
        yield
    finally:
        lib.parrot_pool_spin(0)
        torch.set_num_threads(count)
        _threads = None


class DecodeAttention:
    """Decode attention, one query token a row, over keys read in place in the pool; set up
    once for a step's group of rows and run in every layer.

    Row b attends to the shared ``prefix`` slots (int64 [P], optional) and then to its own
    keys: ``table[b, :lengths[b]]`` (int64), or for a lone row without a table the
    consecutive slots ``first .. first + lengths[0]``.
    """

    def __init__(self, rows: int, heads: int, head_dim: int, scale: float, *, table: torch.Tensor | None,
                 lengths: torch.Tensor, first: int = 0, prefix: torch.Tensor | None = None) -> None:
        if table is None and rows != 1:
            raise ValueError("consecutive keys (no table) serve a lone row only")
        self._lib = library()
        self._threads = threads()
        self._shape = (rows, heads, head_dim)
        # kept here: the kernel reads them through raw pointers
        self._lengths = lengths.to(torch.long).contiguous()
        self._table = None if table is None else table.to(torch.long).contiguous()
        self._prefix = None if prefix is None else prefix.to(torch.long).contiguous()
        self._scratch = torch.empty(self._lib.parrot_decode_attention_scratch(rows, heads, head_dim,
                                                                             self._threads))
        self._args = (
            rows, None if self._prefix is None else self._prefix.data_ptr(),
            0 if self._prefix is None else self._prefix.numel(),
            None if self._table is None else self._table.data_ptr(),
            0 if self._table is None else self._table.stride(0), first, self._lengths.data_ptr(),
            scale, self._scratch.data_ptr())

    def plan(self, row: int) -> AttentionPlanRef:
        """This attention over a step's rows from ``row`` on, for ``parrot_decoder_layers``
        (valid while this object lives)."""
        rows, prefix, prefix_len, table, ldt, first, lengths, _, scratch = self._args
        return AttentionPlanRef(row, rows, prefix, prefix_len, table, ldt, first, lengths, scratch)

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """``q`` [B, H, D] float32 (each row's H x D values contiguous, rows may be strided);
        pools [KV, S, D] float32, contiguous."""
        kv, pool_slots, d = k_pool.shape
        if q.shape != self._shape:
            raise ValueError(f"q has shape {tuple(q.shape)}, the attention was set up for {self._shape}")
        if q.stride(2) != 1 or q.stride(1) != d:
            q = q.contiguous()
        out = torch.empty(self._shape)
        self._lib.parrot_decode_attention(q.data_ptr(), q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(),
                                          kv, pool_slots, d, q.shape[1], *self._args, out.data_ptr(),
                                          self._threads)
        return out


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float, *,
                     table: torch.Tensor | None, lengths: torch.Tensor, first: int = 0,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
    """DecodeAttention set up and run once."""
    rows, heads, d = q.shape
    return DecodeAttention(rows, heads, d, scale, table=table, lengths=lengths, first=first,
                           prefix=prefix)(q, k_pool, v_pool)
