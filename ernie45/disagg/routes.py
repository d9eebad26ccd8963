"""The HTTP side of `ernie45 serve --role prefill|decode`: endpoints the router calls, and the KV transfer
counters on /metrics.

    GET  /disagg/info                              -> {"role", "kv_address", counters}
    POST /disagg/import {"source", "transfer_id"}  -> {"ok", "num_blocks", "blocks_cached", "blocks_imported",
                                                       "bytes", "fetch_seconds", "transport"} once the blocks
                                                       are in the cache
    POST /disagg/role {"role"}                     -> {"ok", "role", ...}

Each is one keyed control message to the engine core, answered by a ("reply", key, dict) message.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel

from ..engine.client import EngineDeadError, _Subscriber
from .config import ROLES

_REPLY_TIMEOUT_S = 60.0
_COUNTERS = {
    "kv_exports": "Requests whose prompt KV this instance exported.",
    "kv_exports_expired": "Exports freed because nobody fetched them in time.",
    "kv_export_blocks": "KV blocks exported.",
    "kv_imports": "KV imports completed.",
    "kv_imports_failed": "KV imports that failed (the request then recomputes its prompt).",
    "kv_import_blocks": "KV blocks transferred in.",
    "kv_import_blocks_cached": "KV blocks an import found in the prefix cache already (not transferred).",
    "kv_import_bytes": "KV bytes transferred in.",
    "kv_import_bytes_shm": "KV bytes of those that came through a shared-memory segment (same host).",
}
_GAUGES = {
    "kv_exports_pending": "Exports waiting to be fetched (their blocks are pinned).",
    "kv_imports_held": "Imports whose blocks are held until their request is admitted.",
}


class ImportBody(BaseModel):
    source: str
    """host:port of the prefill instance's KV transfer server."""
    transfer_id: str
    """The prefill response's request id."""


class RoleBody(BaseModel):
    role: str


async def core_request(front, kind: str, *args) -> dict:
    """Send a keyed control message to the engine core and wait for its reply."""
    key = f"disagg-{uuid.uuid4().hex}"
    subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
    front._subscribers[key] = subscriber  # replies are delivered like outputs, by key
    try:
        front._send((kind, key, *args))
        item = await asyncio.wait_for(subscriber.outputs.get(), _REPLY_TIMEOUT_S)
    finally:
        front._subscribers.pop(key, None)
    if isinstance(item, BaseException):
        raise item
    return item


class _DisaggCollector(Collector):
    def __init__(self, stats, model_name: str):
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, doc in _COUNTERS.items():
            family = CounterMetricFamily(f"ernie45:{key}", doc, labels=["model_name"])
            family.add_metric([self._model_name], stats.get(key, 0))
            yield family
        for key, doc in _GAUGES.items():
            family = GaugeMetricFamily(f"ernie45:{key}", doc, labels=["model_name"])
            family.add_metric([self._model_name], stats.get(key, 0))
            yield family
        role = GaugeMetricFamily("ernie45:disagg_role", "1 for the instance's current role.",
                                 labels=["model_name", "role"])
        for r in ROLES:
            role.add_metric([self._model_name, r], float(stats.get("disagg_role") == r))
        yield role


def mount_disagg(app: FastAPI, front, model_name: str) -> None:
    app.state.ctx.metrics.registry.register(_DisaggCollector(front.stats, model_name))

    async def ask(kind: str, *args) -> JSONResponse:
        try:
            reply = await core_request(front, kind, *args)
        except (EngineDeadError, TimeoutError) as exc:
            return JSONResponse({"error": {"message": f"the engine core did not answer: {exc}",
                                           "type": "server_error", "param": None, "code": "engine_unavailable"}},
                                status_code=503)
        return JSONResponse(reply, status_code=200 if reply.get("ok") else 409)

    @app.get("/disagg/info")
    async def info() -> JSONResponse:
        return await ask("disagg_info")

    @app.post("/disagg/import")
    async def kv_import(body: ImportBody) -> JSONResponse:
        return await ask("kv_import", body.source, body.transfer_id)

    @app.post("/disagg/role")
    async def set_role(body: RoleBody) -> JSONResponse:
        if body.role not in ROLES:
            return JSONResponse({"error": {"message": f"role must be one of {', '.join(ROLES)}",
                                           "type": "invalid_request_error", "param": "role", "code": None}},
                                status_code=400)
        return await ask("set_role", body.role)
