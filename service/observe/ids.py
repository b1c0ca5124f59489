"""The ids a log line is about (tenant, session, call, request), carried in context variables.

Each asyncio task runs in its own copy of the context, so ids bound in one request's handler or
one call's task never show on another's lines. ``IdsFilter`` copies them onto every record.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

tenant_id: ContextVar[str | None] = ContextVar("parrot_tenant_id", default=None)
session_id: ContextVar[str | None] = ContextVar("parrot_session_id", default=None)
call_id: ContextVar[str | None] = ContextVar("parrot_call_id", default=None)
request_id: ContextVar[str | None] = ContextVar("parrot_request_id", default=None)

ID_FIELDS = ("tenant", "session", "call", "request")
_VARS = dict(zip(ID_FIELDS, (tenant_id, session_id, call_id, request_id), strict=True))


def bind(*, tenant: str | None = None, session: str | None = None, call: str | None = None,
         request: str | None = None) -> None:
    """Set all four ids for the rest of the current task (None clears one)."""
    tenant_id.set(tenant)
    session_id.set(session)
    call_id.set(call)
    request_id.set(request)


def current() -> dict[str, str]:
    """The ids bound now, without the unset ones."""
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


class IdsFilter(logging.Filter):
    """Adds ``tenant``, ``session``, ``call`` and ``request`` to every record: an id passed in
    ``extra=`` wins, else the one bound in the context, else None."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True
