"""A cap on request bodies, enforced before they are read: a body that says (``Content-Length``)
or turns out (chunked) to be larger than ``max_body_bytes`` is answered 413 with the service's
OpenAI-shaped error, and no more of it is read or kept in memory.

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so streaming responses and
disconnect detection pass through untouched.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parrot import limits
from parrot.service.errors import ErrorInfo, error_response


def _too_large_message(max_body_bytes: int) -> str:
    return (f"the request body is larger than the limit of {max_body_bytes} bytes "
            f"({max_body_bytes / 2**20:g} MiB)")


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once a chunked body passes the cap; an HTTP exception, so the
    app's handlers answer it as a 413 rather than as a body that failed to parse."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, _too_large_message(max_body_bytes))


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int = limits.MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.max_body_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLargeError(cap)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = ErrorInfo(message=_too_large_message(self.max_body_bytes), type="invalid_request_error",
                         param=None, code="request_too_large")
        response = error_response(info, 413)
        response.headers["connection"] = "close"  # the unread rest of the body is not wanted
        await response(scope, receive, send)
