"""The FastAPI app: OpenAI endpoints (/v1/models, /v1/completions, /v1/chat/completions), /tokenize, /detokenize,
/health, /metrics (Prometheus) and /version, around an EngineClient (`ernie45 serve`: the engine core in its own process)."""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from .. import __version__
from ..engine.client import EngineClient
from .chat import create_chat_completion
from .completions import create_completion
from .context import ServingContext
from .errors import APIError, bad_request, install_error_handlers
from .middleware import RequestContextMiddleware, request_info
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    VLChatCompletionRequest,
)
from .web_ui import mount_web_ui


def _api_key_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            what = "missing" if not header else "incorrect"
            raise APIError(401, f"API key {what}: send `Authorization: Bearer <key>`", code="invalid_api_key")

    return check


def build_app(front: EngineClient, tokenizer, served_model_name: str, api_key: str | None = None,
              max_queue: int | None = None, model_root: str | None = None, max_images_per_prompt: int = 8,
              max_videos_per_prompt: int = 2, allowed_local_media_path: str | None = None,
              web_ui: bool = True) -> FastAPI:
    """An app serving `front`; its lifespan shuts the engine core down when the server stops. `web_ui`: the chat
    page at GET / (web_ui.py)."""
    ctx = ServingContext(front, tokenizer, served_model_name, max_queue=max_queue, model_root=model_root,
                         max_images_per_prompt=max_images_per_prompt, max_videos_per_prompt=max_videos_per_prompt,
                         allowed_local_media_path=allowed_local_media_path)
    created = int(time.time())
    stopping = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        stopping.set()
        await asyncio.to_thread(front.shutdown)

    app = FastAPI(title="ernie45 OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware)
    api = APIRouter(dependencies=[Depends(_api_key_check(api_key))])

    @api.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": created, "owned_by": "ernie45",
            "root": model_root or served_model_name, "parent": None, "max_model_len": ctx.max_model_len,
        }]}

    if front.model_info.is_multimodal:
        # A VL model's schema accepts image / video parts; a text model's keeps rejecting them at validation.
        @api.post("/v1/chat/completions", response_model=None)
        async def chat_completions(body: VLChatCompletionRequest, request: Request) -> Response:
            return await create_chat_completion(ctx, body, request_info(request), request.receive)
    else:
        @api.post("/v1/chat/completions", response_model=None)
        async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
            return await create_chat_completion(ctx, body, request_info(request), request.receive)

    @api.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request_info(request), request.receive)

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages")
        if body.messages is not None:
            text = ctx.render_chat(body.messages, body.add_generation_prompt, body.chat_template_kwargs)
        else:
            text = body.prompt
        tokens = tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.max_model_len}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        ctx.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < ctx.vocab_size]
        if bad:
            raise bad_request(f"tokens outside the vocabulary [0, {ctx.vocab_size}): {bad[:5]}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    app.include_router(api)

    @app.get("/health")
    async def health() -> Response:
        if stopping.is_set() or not front.is_running:
            return APIError(503, "the engine is shut down or its process died", code="engine_unavailable").response()
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if web_ui:
        mount_web_ui(app, multimodal=front.model_info.is_multimodal)
    return app
