"""The builtin engine's C kernels (csrc/), built at first use: matmuls on quantized weight
blocks (quant_matmul.c), batch-1 decode attention (decode_attention.c), and the thread
pool both run on (thread_pool.c).

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
            for name in ("thread_pool.c", "quant_matmul.c", "decode_attention.c")]
_HEADERS = [Path(__file__).with_name("csrc") / "thread_pool.h"]
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-pthread", "-shared", "-fPIC"]
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None
_threads: int | None = None  # set while torch's own ops run on one thread (see few_rows)
_SPIN_NS = 300_000  # how long the kernels' idle workers spin then, before they sleep
FEW_ROWS = 16  # a step of at most this many tokens runs under few_rows


class KernelBuildError(RuntimeError):
    pass


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
    lib.parrot_decode_attention.argtypes = [p, p, p, i64, i64, i64, i64, p, i64, i64, ctypes.c_float, p, p,
                                            i32]
    lib.parrot_decode_attention.restype = None
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
    """How many threads the kernels split a matmul over: torch's count unless few_rows holds it."""
    return _threads or torch.get_num_threads()


@contextmanager
def few_rows() -> Iterator[None]:
    """A step of a few rows (a decode): torch's own ops on one thread, the kernels on all.

    Torch's ops in such a step (norms, rotary, attention over one query) are too small to
    gain from a second thread, and with torch on one thread the kernels' workers may spin
    between matmuls instead of sleeping, as the step's matmuls come every few dozen
    microseconds. Measured on 2 cores, a batch-1 step of the default model: 7.4 ms this
    way against 8.3 ms with torch on both threads.
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


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor | None,
                     first: int, length: int, scale: float) -> torch.Tensor:
    """One query token's attention over its keys in the pool, read in place (no gather).

    ``q`` [1, H, D] float32; pools [KV, S, D] float32, contiguous; the keys are the pool
    slots ``slots`` (int64 [L]) or, when None, ``first .. first + length``.
    """
    kv, pool_slots, d = k_pool.shape
    heads = q.shape[1]
    q = q.contiguous()
    out = torch.empty(1, heads, d)
    scratch = torch.empty(2 * heads * (d + 2))  # each head's partial sums, its keys split in at most two
    if slots is not None:
        slots = slots.contiguous()
    library().parrot_decode_attention(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), kv, pool_slots, d, heads,
        None if slots is None else slots.data_ptr(), first, length, scale, scratch.data_ptr(),
        out.data_ptr(), threads())
    return out
