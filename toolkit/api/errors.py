"""Every failure as OpenAI shapes it, `{"error": {"message", "type", "param", "code"}}`, with the status the `openai`
client maps to its exception classes: 400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, 5xx InternalServerError. FastAPI's own 422 `{"detail": ...}` never reaches a client."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.api.protocol import ErrorInfo, ErrorResponse
from toolkit.errors import (
    InvalidRequestError,
    QueueFullError,
    RemoteError,
    ToolkitError,
    WorkerCrashedError,
    WorkerHungError,
    WorkerNotRunningError,
)

log = logging.getLogger("toolkit.api")

RETRY_AFTER_S = 1  # what a 429 or 503 asks the client to wait


class APIError(Exception):
    """An error with its HTTP status and OpenAI type, raised by the routes."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def as_api_error(exc: BaseException) -> APIError:
    """The toolkit's typed errors (and anything else) as the status a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, QueueFullError):
        return APIError(429, f"server busy: {exc}", "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, (WorkerCrashedError, WorkerHungError, WorkerNotRunningError)):
        return APIError(503, str(exc), "service_unavailable", code=type(exc).__name__,
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, RemoteError):
        return APIError(500, str(exc).split("\n\n--- worker traceback", 1)[0], "internal_error", code=exc.error_type)
    log.exception("unexpected error in a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid')}{more}", param


def install(app: FastAPI) -> None:
    """Route every error, FastAPI's and Starlette's included, through the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {})).response()

    @app.exception_handler(ToolkitError)  # here, not only under Exception: those are re-raised to the server's log
    async def _toolkit(_: Request, exc: ToolkitError) -> JSONResponse:
        return as_api_error(exc).response()

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()
