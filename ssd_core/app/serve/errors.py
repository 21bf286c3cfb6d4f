"""OpenAI-style error objects and the exception handlers that produce them.

Every error the server answers has the OpenAI API's body,
``{"error": {"message", "type", "param", "code"}}``, whatever raised it: a request
that fails validation (unknown field, wrong type, out of range) is a 400, never
FastAPI's default 422, and a bug is a 500 with the same shape rather than a bare
traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ssd_core import ConfigError, EngineClosedError, InputError, SSDError

__all__ = ["ApiError", "error_body", "from_ssd_error", "install_error_handlers"]

log = logging.getLogger("ssd_core.app.serve")

#: The ``type`` OpenAI uses for each status we answer.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI API's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered with an OpenAI-style body.

    Args:
        status: the HTTP status.
        message: what went wrong, for a person.
        param: the request field at fault, if one is.
        code: a stable machine-readable code (``"queue_full"``, ``"invalid_api_key"``).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return error_body(self.message, type=kind, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def from_ssd_error(exc: SSDError, *, param: str | None = None) -> ApiError:
    """The answer to an engine error raised at submission: a bad prompt or parameter
    is the client's (400); a closed engine means the server cannot serve (503)."""
    if isinstance(exc, EngineClosedError):
        return ApiError(503, f"the engine is not running: {exc}", code="engine_closed")
    if isinstance(exc, InputError):
        return ApiError(400, str(exc), param=param or "prompt", code="invalid_value")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), param=param, code="invalid_value")
    return ApiError(500, f"{type(exc).__name__}: {exc}", code="internal_error")


def _field(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    parts: list[str] = []
    first: str | None = None
    for err in errors:
        kind = err.get("type")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            msg = (
                f"the body is not valid JSON ({detail})" if detail else "the body is not valid JSON"
            )
            if msg not in parts:
                parts.append(msg)
            continue
        name = _field(err.get("loc", ()))
        if first is None and name:
            first = name.split(".")[0].split("[")[0]
        if kind == "extra_forbidden":
            msg = f"unknown field {name!r} (this server rejects fields it does not implement)"
        elif kind in ("model_attributes_type", "dict_type", "model_type") and not name:
            msg = f"the body must be a JSON object: {err.get('msg')}"
        else:
            msg = f"{name}: {err.get('msg')}" if name else str(err.get("msg"))
        if msg not in parts:
            parts.append(msg)
    if len(parts) > 5:
        parts = parts[:5] + [f"({len(parts) - 5} more)"]
    return "; ".join(parts) or "invalid request", first


def install_error_handlers(app: FastAPI, *, on_error: Callable[[int], None] | None = None) -> None:
    """Answer every error with an OpenAI-style body; ``on_error(status)`` counts them."""

    def answer(error: ApiError) -> JSONResponse:
        if on_error is not None:
            on_error(error.status)
        return error.response()

    async def api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return answer(exc)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc.errors())
        return answer(ApiError(400, message, param=param, code="invalid_request"))

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return answer(
            ApiError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}))
        )

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request", exc_info=exc)
        return answer(
            ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
        )

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
