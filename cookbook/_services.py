"""The service a LangChain recipe's run uses (shared by the recipes; not a recipe itself)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx


@contextmanager
def service(url: str | None) -> Iterator[str]:
    """The service one run uses: ``url``, or a fresh embedded one (an empty prefix cache, so
    neither run finds the other's prompts already computed)."""
    if url is not None:
        yield url
        return
    from parrot.embedded import embedded_url, shutdown_embedded

    try:
        yield embedded_url()
    finally:
        shutdown_embedded()


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
