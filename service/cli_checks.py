"""Up-front checks of ``parrot`` command-line options: a user's mistake is one line naming the option,
found before anything slow (loading a model) starts, never a traceback from deep inside."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

# The default model's served name (loader.DEFAULT_MODEL; a test keeps them equal). Not imported
# from the loader: that imports torch and transformers, seconds before `parrot --help` answers.
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class OptionError(ValueError):
    """A bad command-line option; the message is one line and names it."""


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise OptionError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
        raise OptionError(f"--device {device}: CUDA is not available here ({build}); "
                          "use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise OptionError(f"--device {device}: this machine has {count} CUDA device(s), "
                          f"cuda:0 to cuda:{count - 1}")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype!r} is not supported; use {', '.join(DTYPES)}")


def check_attention_backend(name: str) -> None:
    # Whether "triton" can run on the chosen device is the engine's check, also before loading.
    if name not in ATTENTION_BACKENDS:
        raise OptionError(f"unknown attention backend {name!r}; use auto, torch or triton")


def check_quantization(name: str) -> None:
    # Whether it fits the model and device is the engine's check, also before loading.
    from parrot.service.engine.builtin.quant import QuantizationError, parse_quantization

    try:
        parse_quantization(name)
    except QuantizationError as exc:
        raise OptionError(f"--quantization: {exc}") from None


def check_model(model: str | None) -> None:
    if model is None or model == DEFAULT_MODEL:
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise OptionError(f"--model {model}: no such file or folder (give a Hugging Face model folder, "
                          f"a .gguf file, or {DEFAULT_MODEL})")
    if path.is_file() and path.suffix != ".gguf":
        raise OptionError(f"--model {model}: a model file must be a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise OptionError(f"--model {model}: no config.json in that folder, so it is not a Hugging Face "
                          "model folder")


def check_file(option: str, path: str | None) -> None:
    if path is None:
        return
    file = Path(path).expanduser()
    if not file.exists():
        raise OptionError(f"{option} {path}: no such file")
    if not file.is_file():
        raise OptionError(f"{option} {path}: not a file")


def check_positive(option: str, value: float) -> None:
    if not value > 0:
        raise OptionError(f"{option} must be more than 0 (got {value})")


def check_url(option: str, url: str | None) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OptionError(f"{option} {url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError as exc:
        raise OptionError(f"{option} {url!r}: {exc}") from None


def check_listen(host: str, port: int) -> None:
    """The address can be listened on now (free and local), so the model is not loaded in vain."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OptionError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            raise OptionError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def check_log_level(level: str) -> None:
    if level.lower() not in LOG_LEVELS:
        raise OptionError(f"--log-level {level!r} is not a level; use {', '.join(LOG_LEVELS)}")


def configure_logging(level: str) -> None:
    """Parrot's own log records at ``level`` and above, one line each, on stderr."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.WARNING)
    logging.getLogger("parrot").setLevel(level.upper())
