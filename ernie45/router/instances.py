"""The instances a router knows: their role, health, load, and the router's own count of requests on each.

Health: GET /health every `interval_s`; two failures in a row (or a refused connection during a request) mark an
instance unhealthy, one success healthy again (SGLang's router allows 2 failures too). Load: the instance's
/metrics (`num_requests_running` + `num_requests_waiting`), scraped with the health check. Prefill and decode
instances also report their KV transfer address and current role (GET /disagg/info).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger("ernie45.router")

_GAUGE = re.compile(r'^ernie45:(num_requests_running|num_requests_waiting)\{[^}]*\} (\S+)$', re.MULTILINE)
_FAILURES_TO_UNHEALTHY = 2
_AFFINITY_MEMORY = 4096  # prefix hashes remembered per instance (cache_aware)


@dataclass(eq=False)
class Instance:
    url: str
    role: str
    """prefill, decode or mixed (as the router uses it; updated by role switches and /disagg/info)."""
    healthy: bool = False
    failures: int = 0
    kv_address: str | None = None
    running: float = 0.0
    waiting: float = 0.0
    in_flight: int = 0
    """Requests of this router on the instance now (prefill calls, imports and decode streams)."""
    draining: bool = False
    """Being drained for a role switch: gets no new requests."""
    prefixes: OrderedDict = field(default_factory=OrderedDict)
    """Prefix hashes of requests sent here, least recent first (cache_aware)."""

    @property
    def load(self) -> float:
        # Scraped load lags by up to one health interval; the router's in-flight count is exact and current.
        return max(self.running + self.waiting, self.in_flight)

    @property
    def usable(self) -> bool:
        return self.healthy and not self.draining

    def remember(self, hashes: list[str]) -> None:
        for h in hashes:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > _AFFINITY_MEMORY:
            self.prefixes.popitem(last=False)

    def mark_failed(self) -> None:
        self.failures = max(self.failures, _FAILURES_TO_UNHEALTHY)
        self.healthy = False


class Registry:
    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.instances: list[Instance] = []

    def add(self, url: str, role: str) -> Instance:
        url = url.rstrip("/")
        for inst in self.instances:
            if inst.url == url:
                inst.role = role
                return inst
        inst = Instance(url, role)
        self.instances.append(inst)
        return inst

    def remove(self, url: str) -> bool:
        before = len(self.instances)
        self.instances = [i for i in self.instances if i.url != url.rstrip("/")]
        return len(self.instances) < before

    def find(self, url: str) -> Instance | None:
        return next((i for i in self.instances if i.url == url.rstrip("/")), None)

    def usable(self, *roles: str) -> list[Instance]:
        return [i for i in self.instances if i.role in roles and i.usable]

    async def check(self, inst: Instance) -> None:
        try:
            health = await self.client.get(inst.url + "/health", timeout=2.0)
            if health.status_code != 200:
                raise httpx.HTTPStatusError("unhealthy", request=health.request, response=health)
            text = (await self.client.get(inst.url + "/metrics", timeout=2.0)).text
            values = {name: float(v) for name, v in _GAUGE.findall(text)}
            inst.running = values.get("num_requests_running", 0.0)
            inst.waiting = values.get("num_requests_waiting", 0.0)
            if inst.role != "mixed" or inst.kv_address is not None:
                info = await self.client.get(inst.url + "/disagg/info", timeout=2.0)
                if info.status_code == 200:
                    data = info.json()
                    inst.kv_address = data.get("kv_address")
                    if not inst.draining:
                        inst.role = data.get("role", inst.role)
        except (httpx.HTTPError, ValueError) as exc:
            inst.failures += 1
            if inst.healthy and inst.failures >= _FAILURES_TO_UNHEALTHY:
                logger.warning("instance %s is unhealthy: %s", inst.url, exc)
                inst.healthy = False
            return
        if not inst.healthy:
            logger.info("instance %s (%s) is healthy", inst.url, inst.role)
        inst.failures = 0
        inst.healthy = True

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in list(self.instances)))

    async def run_checks(self, interval_s: float) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(interval_s)
