"""TOML files the service reads at start-up (engines, tenants), with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def read_toml(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed file; an unreadable or malformed one raises ``error`` with a one-line message
    (``what`` names the file's role, e.g. "config file")."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML: {exc}") from None


def first_error(exc: ValidationError) -> tuple[str, str, dict[str, Any]]:
    """A validation failure's first error as (dotted field path, message, the raw error)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return loc, str(err["msg"]).removeprefix("Value error, "), dict(err)
