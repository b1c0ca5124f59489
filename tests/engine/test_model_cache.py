"""The converted-model cache: keyed by content, shared, written atomically, listed and cleared."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from parrot.service.cli import app
from parrot.service.engine.builtin import loader, model_cache


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PARROT_CACHE_DIR", str(root))
    return root


def gguf_file(folder: Path, content: bytes = b"GGUF weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.gguf"
    path.write_bytes(content)
    return path


class Converter:
    """Writes a model folder the way the GGUF conversion does (a config and weights), counting runs."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, folder: Path) -> None:
        self.runs += 1
        assert folder.is_dir() and not any(folder.iterdir())
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)


def test_the_same_file_in_two_environments_converts_once(tmp_path, cache):
    first = gguf_file(tmp_path / "venv-a" / "site-packages")
    second = gguf_file(tmp_path / "venv-b" / "site-packages")
    os.utime(second, ns=(1, 1))  # another install: other path, other mtime, same bytes
    convert = Converter()
    a = model_cache.cached_conversion(first, "tiny", convert)
    b = model_cache.cached_conversion(second, "tiny", convert)
    assert a == b and convert.runs == 1
    assert a.parent == cache / "models" and a.name.startswith("tiny-")
    source = json.loads((a / model_cache.SOURCE_FILE).read_text())
    assert source["source"] == str(first.resolve()) and len(source["sha256"]) == 64
    other = gguf_file(tmp_path / "other", b"other weights")
    assert model_cache.cached_conversion(other, "tiny", convert) != a and convert.runs == 2


def test_the_hash_is_remembered_by_path_size_and_mtime(tmp_path):
    path = gguf_file(tmp_path, b"A" * 100)
    sha = model_cache.file_sha256(path)
    stat = path.stat()
    path.write_bytes(b"B" * 100)  # same size; the old mtime restored: the index answers
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_cache.file_sha256(path) == sha
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    assert model_cache.file_sha256(path) != sha


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, cache):
    path = gguf_file(tmp_path)

    def fail(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        model_cache.cached_conversion(path, "tiny", fail)
    assert [p for p in (cache / "models").iterdir() if p.is_dir()] == []
    assert model_cache.list_cached() == []


CONVERT_IN_A_PROCESS = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from parrot.service.engine.builtin import model_cache

    def convert(folder):
        with open(sys.argv[2], "a") as log:
            log.write("run\\n")
        (folder / "config.json").write_text("{}")
        time.sleep(float(sys.argv[3]))
        if sys.argv[4] == "crash":
            os._exit(9)  # killed mid-write: no clean-up runs
        (folder / "model.safetensors").write_bytes(b"w")

    print(model_cache.cached_conversion(Path(sys.argv[1]), "tiny", convert))
""")


def convert_in_a_process(gguf: Path, log: Path, sleep_s: float, mode: str = "ok") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CONVERT_IN_A_PROCESS, str(gguf), str(log), str(sleep_s),
                             mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())


def test_concurrent_converters_do_not_clash(tmp_path):
    path = gguf_file(tmp_path)
    log = tmp_path / "runs.log"
    procs = [convert_in_a_process(path, log, 0.5) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len({out.strip() for out, _ in outs}) == 1  # one folder for all
    assert log.read_text() == "run\n"  # converted once; the others waited and reused it
    folder = Path(outs[0][0].strip())
    assert (folder / "model.safetensors").read_bytes() == b"w"


def test_a_crash_mid_write_leaves_no_entry_and_the_next_start_cleans_up(tmp_path, cache):
    path = gguf_file(tmp_path)
    log = tmp_path / "runs.log"
    crashed = convert_in_a_process(path, log, 0.0, "crash")
    crashed.communicate(timeout=120)
    assert crashed.returncode == 9
    entries = model_cache.list_cached()
    assert [e.in_progress for e in entries] == [True]  # only the abandoned temporary folder
    listing = CliRunner().invoke(app, ["cache", "ls"])
    assert "being converted (or left by a crash)" in listing.stdout
    folder = model_cache.cached_conversion(path, "tiny", Converter())
    assert [e.path for e in model_cache.list_cached()] == [folder]  # the leftover is gone


def test_an_entry_of_the_older_path_keyed_layout_is_adopted(tmp_path, cache):
    path = gguf_file(tmp_path)
    stat = path.stat()
    legacy = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    old = cache / "models" / f"tiny-{legacy}"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    convert = Converter()  # the older layout's name, as convert_gguf passes it: no conversion at all
    folder = model_cache.cached_conversion(path, "tiny", convert, legacy_names=(old.name,))
    assert convert.runs == 0 and not old.exists() and (folder / "config.json").is_file()
    assert json.loads((folder / model_cache.SOURCE_FILE).read_text())["source"] == str(path.resolve())


def test_parrot_cache_ls_and_clear(tmp_path, cache):
    runner = CliRunner()
    assert "No converted models" in runner.invoke(app, ["cache", "ls"]).stdout
    a = model_cache.cached_conversion(gguf_file(tmp_path / "a", b"a"), "alpha", Converter())
    b = model_cache.cached_conversion(gguf_file(tmp_path / "b", b"b"), "beta", Converter())
    listing = runner.invoke(app, ["cache", "ls"], env={"COLUMNS": "40"})
    assert listing.exit_code == 0, listing.output
    lines = listing.stdout.splitlines()
    sizes = {e.name: e.size_bytes for e in model_cache.list_cached()}
    assert 1000 < sizes[a.name] < 1500  # the weights, config and source record
    kib = f"{sizes[a.name] / 1024:.1f}"
    assert lines[0].split() == [a.name, kib, "KiB", str((tmp_path / "a" / "model.gguf").resolve())]
    assert lines[1].split()[0] == b.name  # each entry one line, however narrow the console
    assert lines[2] == f"2 in {cache / 'models'}, {sum(sizes.values()) / 1024:.1f} KiB in all"
    cleared = runner.invoke(app, ["cache", "clear", a.name])
    assert cleared.exit_code == 0 and f"Removed 1 converted model(s), {kib} KiB" in cleared.stdout
    assert not a.exists() and b.exists()
    cleared = runner.invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0 and "Removed 1 converted model(s)" in cleared.stdout
    assert model_cache.list_cached() == [] and not (cache / "models" / "hashes.json").exists()


def test_the_cache_dir_depends_on_the_user_not_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PARROT_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "venv"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loader.cache_dir() == tmp_path / "home" / ".cache" / "parrot"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.cache_dir() == tmp_path / "xdg" / "parrot"


@pytest.mark.e2e
def test_another_copy_of_the_default_model_reuses_its_converted_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PARROT_CACHE_DIR")  # the machine's real cache, as every environment sees it
    _, folder = loader.resolve_model(None)
    copy = tmp_path / "other-venv" / loader.default_gguf_path().name
    copy.parent.mkdir()
    shutil.copyfile(loader.default_gguf_path(), copy)
    assert loader.convert_gguf(copy, name=loader.DEFAULT_MODEL) == folder  # no second conversion
