"""The converted-model cache: GGUF files de-quantized once into safetensors folders.

An entry is keyed by the GGUF file's *content* (sha256), not its path, so every
environment that installs the same file (each virtualenv has its own copy of the
default model's package) shares one entry under one cache directory. An entry appears
only whole: it is written into a temporary folder and renamed into place; a per-entry
lock makes a second converter of the same file wait for the first rather than
convert again. Hashes are remembered by (path, size, mtime), so a start reads a large
GGUF file once, not at every start.

Layout under ``cache_dir() / "models"``::

    <name>-<sha256[:16]>/            a converted model (config.json, safetensors, tokenizer)
        parrot-source.json          what it was converted from: file, size, sha256
    .<entry>.lock                   held while that entry is being written
    .<entry>.tmp-<random>/          an entry being written (left by a crash: removed later)
    hashes.json                     path -> {size, mtime_ns, sha256}

No torch here: ``parrot cache ls`` must be quick.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SOURCE_FILE = "parrot-source.json"
_INDEX_FILE = "hashes.json"
_HASH_CHUNK_BYTES = 8 << 20
_KEY_LEN = 16  # hex digits of the sha256 in an entry's name
_TMP_MARK = ".tmp-"


class CacheError(OSError):
    """A cache operation that cannot be done as asked (an unknown entry, say)."""


def cache_dir() -> Path:
    """Parrot's cache: ``$PARROT_CACHE_DIR``, else ``$XDG_CACHE_HOME/parrot``, else ``~/.cache/parrot``.

    It depends on the user, never on the Python environment, so virtualenvs share it."""
    root = os.environ.get("PARROT_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "parrot"


def models_dir() -> Path:
    return cache_dir() / "models"


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``'s content, read in chunks; remembered by (path, size, mtime)."""
    resolved = path.resolve()
    stat = resolved.stat()
    index_path = models_dir() / _INDEX_FILE
    index = _read_json(index_path)
    known = index.get(str(resolved))
    if isinstance(known, dict) and known.get("size") == stat.st_size \
            and known.get("mtime_ns") == stat.st_mtime_ns and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = hashlib.sha256()
    with open(resolved, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    sha = digest.hexdigest()
    # A lost update between two writers only costs a re-hash later. Files gone (an old
    # environment) are dropped, so the index stays as small as what is installed.
    index = {path: entry for path, entry in _read_json(index_path).items() if Path(path).is_file()}
    index[str(resolved)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    _write_json_atomically(index_path, index)
    return sha


def cached_conversion(source: Path, name: str, convert: Callable[[Path], None],
                      legacy_names: tuple[str, ...] = ()) -> Path:
    """The cache entry for ``source`` converted under ``name``: made by ``convert(folder)`` (which
    writes the converted model into an empty folder) unless the entry exists already.

    ``legacy_names``: entries an older cache layout may hold for this very file; one found is
    adopted (renamed to its content key) instead of converting again."""
    sha = file_sha256(source)
    root = models_dir()
    out = root / f"{name}-{sha[:_KEY_LEN]}"
    if _is_entry(out):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with _entry_lock(root, out.name):
        if _is_entry(out):  # another process converted it while this one waited
            return out
        for tmp in root.glob(f".{out.name}{_TMP_MARK}*"):  # left by a converter that died: the lock was free
            shutil.rmtree(tmp, ignore_errors=True)
        record = {"source": str(source.resolve()), "size": source.stat().st_size, "sha256": sha}
        for legacy in legacy_names:
            old = root / legacy
            if _is_entry(old) and not (old / SOURCE_FILE).exists():
                _write_json_atomically(old / SOURCE_FILE, record)
                os.rename(old, out)
                return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_MARK}", dir=root))
        try:
            convert(tmp)
            _write_json_atomically(tmp / SOURCE_FILE, record)
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the entry from the user's group
            try:
                os.rename(tmp, out)  # atomic: the entry appears whole or not at all
            except OSError:
                if not _is_entry(out):  # not a concurrent converter's win (after a cache clear)
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size_bytes: int
    source: str | None  # the file it was converted from; None for entries of an older layout
    in_progress: bool = False  # a conversion is writing it now (or died writing it)


def list_cached() -> list[CachedModel]:
    """Every entry of the model cache, complete ones first, by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith("."):
            if _TMP_MARK in path.name:
                entries.append(CachedModel(path.name, path, _size(path), None, in_progress=True))
            continue
        source = _read_json(path / SOURCE_FILE).get("source")
        entries.append(CachedModel(path.name, path, _size(path), source if isinstance(source, str) else None))
    return sorted(entries, key=lambda e: (e.in_progress, e.name))


def clear_cached(names: list[str] | None = None) -> list[CachedModel]:
    """Remove the named entries (all when ``names`` is None); return what was removed.

    An entry being converted right now is left alone. An unknown name is a CacheError,
    before anything is removed."""
    entries = [e for e in list_cached() if not e.in_progress]
    if names is not None:
        by_name = {e.name: e for e in entries}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise CacheError(f"no cached model named {', '.join(unknown)} in {models_dir()} "
                             "(parrot cache ls lists them)")
        entries = [by_name[n] for n in dict.fromkeys(names)]
    else:
        entries += _abandoned_temporaries()
    removed = []
    root = models_dir()
    for entry in entries:
        key = entry.name[1:].rsplit(_TMP_MARK, 1)[0] if entry.in_progress else entry.name
        with _entry_lock(root, key, blocking=False) as held:
            if held:
                shutil.rmtree(entry.path, ignore_errors=True)
                (root / f".{key}.lock").unlink(missing_ok=True)
                removed.append(entry)
    if names is None:
        (root / _INDEX_FILE).unlink(missing_ok=True)
    return removed


def _abandoned_temporaries() -> list[CachedModel]:
    return [e for e in list_cached() if e.in_progress]


def _is_entry(path: Path) -> bool:
    return (path / "config.json").is_file()


@contextmanager
def _entry_lock(root: Path, entry: str, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on one entry (released by the OS if the holder dies); yields whether
    it is held (always, when ``blocking``)."""
    with open(root / f".{entry}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
