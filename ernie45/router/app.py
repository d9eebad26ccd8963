"""The router's FastAPI app: the OpenAI endpoints (proxied), /health, /metrics, and instance management.

    POST /v1/chat/completions, /v1/completions   (streaming included)    GET /v1/models (from an instance)
    GET  /router/instances                        POST /router/instances {"url", "role"} (registration)
    DELETE /router/instances {"url"}              POST /router/role {"url", "role"} (drain, then switch)
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.responses import Response

from .. import __version__
from ..disagg import ROLES
from .instances import Registry
from .metrics import RouterMetrics
from .policies import Policy
from .proxy import Proxy, error_body
from .role_switch import RoleBalancer, RoleSwitchConfig


class InstanceBody(BaseModel):
    url: str
    role: str = "mixed"


def _bad(message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=400)


def build_router_app(prefill: list[str], decode: list[str], mixed: list[str], policy: str = "least_load",
                     health_interval_s: float = 1.0, role_switch: RoleSwitchConfig | None = None,
                     max_attempts: int = 3, pd_min_prompt_tokens: int = 0) -> FastAPI:
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))
    registry = Registry(client)
    for role, urls in (("prefill", prefill), ("decode", decode), ("mixed", mixed)):
        for url in urls:
            registry.add(url, role)
    metrics = RouterMetrics(registry)
    proxy = Proxy(registry, Policy(policy), metrics, client, max_attempts, pd_min_prompt_tokens)
    balancer = RoleBalancer(registry, role_switch or RoleSwitchConfig(),
                            on_switch=lambda role: metrics.role_switches.labels(role).inc())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await registry.check_all()
        tasks = [asyncio.create_task(registry.run_checks(health_interval_s)), asyncio.create_task(balancer.run())]
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.aclose()

    app = FastAPI(title="ernie45 router", version=__version__, lifespan=lifespan)
    app.state.registry, app.state.proxy, app.state.balancer = registry, proxy, balancer

    def forwarded(request: Request) -> dict:
        auth = request.headers.get("authorization")
        return {"authorization": auth} if auth else {}

    async def proxied(request: Request, endpoint: str) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _bad("the request body is not valid JSON")
        if not isinstance(body, dict):
            return _bad("the request body must be a JSON object")
        return await proxy.handle(endpoint, body, forwarded(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxied(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxied(request, "/v1/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        for inst in registry.usable("decode", "mixed", "prefill"):
            try:
                resp = await client.get(inst.url + "/v1/models", headers=forwarded(request), timeout=5)
            except httpx.HTTPError:
                continue
            return Response(resp.content, status_code=resp.status_code, media_type="application/json")
        return JSONResponse(error_body("no instance is available", "upstream_unavailable"), status_code=503)

    @app.get("/health")
    async def health() -> Response:
        if registry.usable("decode", "mixed", "prefill"):
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body("no healthy instance", "upstream_unavailable"), status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/instances")
    async def instances() -> dict:
        return {"instances": [{"url": i.url, "role": i.role, "healthy": i.healthy, "draining": i.draining,
                               "in_flight": i.in_flight, "running": i.running, "waiting": i.waiting,
                               "kv_address": i.kv_address} for i in registry.instances]}

    @app.post("/router/instances")
    async def register(body: InstanceBody) -> Response:
        if body.role not in ROLES:
            return _bad(f"role must be one of {', '.join(ROLES)}", "role")
        inst = registry.add(body.url, body.role)
        await registry.check(inst)
        return JSONResponse({"url": inst.url, "role": inst.role, "healthy": inst.healthy})

    @app.delete("/router/instances")
    async def unregister(body: InstanceBody) -> Response:
        return JSONResponse({"removed": registry.remove(body.url)})

    @app.post("/router/role")
    async def switch_role(body: InstanceBody) -> Response:
        inst = registry.find(body.url)
        if inst is None:
            return _bad(f"unknown instance {body.url}", "url")
        if body.role not in ROLES:
            return _bad(f"role must be one of {', '.join(ROLES)}", "role")
        try:
            reply = await balancer.switch(inst, body.role)
        except (TimeoutError, httpx.HTTPError) as exc:
            return JSONResponse(error_body(f"role switch failed: {exc}", "role_switch_failed"), status_code=502)
        return JSONResponse(reply)

    return app
