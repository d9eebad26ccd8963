"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure the server returns.

Bad input is a 400 (FastAPI's 422 for a body that does not validate included), never a 500: the catch-all handler is
for bugs, and logs them.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .streaming import ClientDisconnected

logger = logging.getLogger("ernie45.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error to return to the client as is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Pydantic names the member of a union in an error's location ("prompt", "list[int]", 0); field names never look
# like these, so they can be dropped to give the client the path it wrote.
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _clean_loc(loc) -> list[str]:
    return [str(x) for x in loc
            if x != "body" and not (isinstance(x, str) and (x in _UNION_TAGS or "[" in x or "-" in x))]


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            return f"the request body is not valid JSON: {ctx.get('error', error.get('msg'))}", None
        if error.get("type") == "model_attributes_type" and not _clean_loc(error.get("loc", ())):
            return "the request body must be a JSON object", None
    locs = [_clean_loc(e.get("loc", ())) for e in errors]
    common = locs[0] if locs else []
    for loc in locs[1:]:  # a union's errors share the field's path: that is the parameter
        size = next((i for i, (a, b) in enumerate(zip(common, loc)) if a != b), min(len(common), len(loc)))
        common = common[:size]
    parts = []
    for loc, error in zip(locs, errors):
        msg = str(error.get("msg")).removeprefix("Value error, ")
        part = f"{'.'.join(loc)}: {msg}" if loc else msg
        if part not in parts:
            parts.append(part)
    return "; ".join(parts[:3]) or "invalid request", ".".join(common) or None


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and "json" not in content_type:
        message = f"{message} (send the body as JSON with `Content-Type: application/json`)"
    return bad_request(message, param=param).response()


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if status == 404 and message == HTTPStatus.NOT_FOUND.phrase:
        message = f"no route {request.method} {request.url.path}"
    return APIError(status, message).response()


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error").response()


async def _on_client_gone(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": for the log line, nobody reads it


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(ClientDisconnected, _on_client_gone)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
