"""Per-request bookkeeping as plain ASGI middleware (streams pass through untouched): a request id in every
response's `X-Request-Id` header, and one log line per request when its response ends."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("ernie45.server")

_SCOPE_KEY = "ernie45.request"


@dataclass
class RequestInfo:
    """Filled in by the handlers; read by the middleware for the header and the log line."""

    request_id: str
    response_id: str | None = None
    """The `id` of the response body (`chatcmpl-...`); the header carries it when set."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def request_info(request: Request) -> RequestInfo:
    return request.scope[_SCOPE_KEY]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = scope[_SCOPE_KEY] = RequestInfo(request_id=uuid.uuid4().hex)
        start = time.perf_counter()
        status = 500  # unless a response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                header = (info.response_id or info.request_id).encode("latin-1")
                message["headers"] = [*message.get("headers", []), (b"x-request-id", header)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            tokens = ""
            if info.prompt_tokens is not None:
                tokens = f" prompt_tokens={info.prompt_tokens} completion_tokens={info.completion_tokens or 0}"
            logger.info("%s %s %d%s latency=%.3fs id=%s", scope["method"], scope["path"], status, tokens,
                        time.perf_counter() - start, info.response_id or info.request_id)
