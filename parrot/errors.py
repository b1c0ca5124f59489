"""Errors the SDK raises when the service refuses, fails or cannot be reached."""

from __future__ import annotations


class ParrotError(Exception):
    """A request was rejected, a call failed, or the service could not be reached.

    ``message`` is the service's own explanation when it gave one (the ``message`` of
    its JSON error body, or the error a failed call left on its output variable).
    """

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code  # the HTTP status, when the service answered
        self.code = code  # the service's error code, when it gave one

    def __str__(self) -> str:
        return self.message


class ParrotTimeoutError(ParrotError, TimeoutError):
    """A ``get`` (or stream) did not see the value before its timeout."""
