"""The service's one exception hierarchy, and the one place it becomes HTTP.

Every failure a client can cause or see is answered with an OpenAI-shaped body,
``{"error": {"message", "type", "param", "code"}}``, so the official clients raise
their usual exceptions (``openai.BadRequestError``, ``openai.NotFoundError``, ...).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from parrot.service.engine.base import EngineError, InvalidRequestError

logger = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ParrotAPIError(Exception):
    """Base of every error the API answers on purpose; subclasses pick status, type and code."""

    status_code: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)


class BadRequestError(ParrotAPIError):
    status_code = 400


class ContextLengthExceededError(BadRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(ParrotAPIError):
    status_code = 404
    code = "model_not_found"


class NotFoundError(ParrotAPIError):
    """A session, variable or call that does not exist (or belongs to another session)."""

    status_code = 404
    code = "not_found"


class ConflictError(ParrotAPIError):
    """A request that contradicts the session's graph (a second producer, a produced value)."""

    status_code = 409
    code = "conflict"


class FailedDependencyError(ParrotAPIError):
    """A variable whose producing call (or one of its ancestors) failed."""

    status_code = 424
    code = "failed_dependency"


class EngineFailedError(ParrotAPIError):
    """The engine failed while serving a valid request."""

    status_code = 500
    type = "server_error"
    code = "engine_error"


class ServiceUnavailableError(ParrotAPIError):
    """No engine can take the request right now (none registered yet, or all gone)."""

    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class AuthenticationError(ParrotAPIError):
    """No API key, or one the service does not know (OpenAI's 401)."""

    status_code = 401
    code = "invalid_api_key"


class PermissionDeniedError(ParrotAPIError):
    """A valid key that may not do this (a tenant key on the engine routes)."""

    status_code = 403
    code = "permission_denied"


class RateLimitError(ParrotAPIError):
    """A tenant limit was hit; answered with ``Retry-After`` (whole seconds)."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float = 1.0) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


def error_response(info: ErrorInfo, status_code: int) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status_code)


def _param_name(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_error_info(errors: list[dict[str, Any]]) -> ErrorInfo:
    """Turn pydantic/FastAPI validation errors into one readable error naming the parameter."""
    messages = []
    first_param = None
    for err in errors:
        loc = tuple(err.get("loc", ()))
        param = _param_name(loc)
        kind = err.get("type")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error") or err.get("msg")
            return ErrorInfo(message=f"the request body is not valid JSON: {detail}",
                             type="invalid_request_error", code="invalid_json")
        if param is None and kind in ("missing", "model_attributes_type", "dict_type"):
            msg = "the request body must be a JSON object"
        elif kind == "extra_forbidden":
            msg = f"Unsupported parameter: {param!r} is not supported by this server"
        else:
            text = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            msg = f"{param}: {text}" if param else text
        first_param = first_param or param
        messages.append(msg)
    unsupported = bool(errors) and errors[0].get("type") == "extra_forbidden"
    code = "unsupported_parameter" if unsupported else None
    return ErrorInfo(message="; ".join(messages) or "invalid request", type="invalid_request_error",
                     param=first_param, code=code)


def install_exception_handlers(app: FastAPI) -> None:
    """Map every exception to an OpenAI-shaped JSON error; nothing reaches the client as a crash."""

    @app.exception_handler(ParrotAPIError)
    async def _api_error(_: Request, exc: ParrotAPIError) -> JSONResponse:
        resp = error_response(exc.to_info(), exc.status_code)
        if isinstance(exc, RateLimitError):
            resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        elif isinstance(exc, AuthenticationError):
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error_info(list(exc.errors())), 400)

    @app.exception_handler(InvalidRequestError)
    async def _engine_invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(ErrorInfo(message=str(exc), type="invalid_request_error"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        info = ErrorInfo(message=str(exc.detail), type=kind, code=code)
        resp = error_response(info, exc.status_code)
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        logger.error("engine error: %s", exc)
        err = EngineFailedError(f"the engine failed: {exc}")
        return error_response(err.to_info(), err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        info = ErrorInfo(message=f"internal server error: {type(exc).__name__}",
                         type="server_error", code="internal_error")
        return error_response(info, 500)
