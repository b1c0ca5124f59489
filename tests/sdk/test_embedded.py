"""Embedded mode on the real default model: ``P.Parrot()`` starts the service in this process."""

from __future__ import annotations

import pytest

import parrot as P
from parrot import embedded

pytestmark = pytest.mark.e2e


@P.semantic_function()
def capital(country: P.Input, city: P.Output(max_tokens=4)):
    """The capital of {{input:country}} is{{output:city}}"""


def test_embedded_service_is_started_once_and_reused():
    try:
        with P.Parrot() as first:
            assert "paris" in capital("France").get().lower()
            url = first.base_url
        with P.Parrot() as second:  # the same server, a new session
            assert second.base_url == url and second.session_id != first.session_id
            assert isinstance(capital(country="Italy").get(), str)
    finally:
        embedded.shutdown_embedded()  # free the model for the tests that follow

