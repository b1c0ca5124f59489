"""Semantic Kernel tests use the integrations' live service (a tiny random llama, see
``tests/integrations/conftest.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def service_url(parrot_service) -> str:
    return parrot_service.url


@pytest.fixture
def closed_url(closed_port_url) -> str:
    return closed_port_url
