"""A live Parrot service (real uvicorn, real routes) on a tiny random-weight llama, for SDK tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from parrot.service.app import create_app


@pytest.fixture
def service_url(tiny_engine_factory, serve_app) -> Iterator[str]:
    """The base URL of a live service whose engine is a tiny random-weight llama."""
    engine, _ = tiny_engine_factory()
    with serve_app(create_app(engine)) as url:
        yield url
