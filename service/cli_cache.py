"""``parrot cache``: list and free the converted-model cache (model_cache); no torch needed."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

cache_app = typer.Typer(help="The converted-model cache: list it, or free it.", no_args_is_help=True,
                        rich_markup_mode=None if not sys.stdout.isatty() else "rich")


@cache_app.command("ls")
def cache_ls() -> None:
    """List the converted models: name, size on disk, and the file each was converted from."""
    from parrot.service.engine.builtin import model_cache

    entries = model_cache.list_cached()
    console = Console(soft_wrap=True, highlight=False)
    if not entries:
        console.print(f"No converted models in {model_cache.models_dir()}")
        return
    width = max(len(e.name) for e in entries)
    for entry in entries:
        source = "being converted (or left by a crash)" if entry.in_progress else (
            entry.source or "unknown (converted by an older version)")
        console.print(f"{entry.name:<{width}}  {_size(entry.size_bytes):>9}  {source}", markup=False)
    total = sum(e.size_bytes for e in entries)
    console.print(f"{len(entries)} in {model_cache.models_dir()}, {_size(total)} in all", markup=False)


@cache_app.command("clear")
def cache_clear(
    names: Annotated[list[str] | None, typer.Argument(
        help="Entries to remove, as `parrot cache ls` names them [default: all]")] = None,
) -> None:
    """Remove converted models (all, or the named ones); the next start converts again."""
    from parrot.service.engine.builtin import model_cache

    try:
        removed = model_cache.clear_cached(names or None)
    except model_cache.CacheError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    freed = sum(e.size_bytes for e in removed)
    Console(soft_wrap=True, highlight=False).print(
        f"Removed {len(removed)} converted model(s), {_size(freed)}, from {model_cache.models_dir()}",
        markup=False)


def _size(num_bytes: int) -> str:
    """Binary units, as du -h and ls -lh count."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"

