"""Dynamic role switching: when prefill work queues up while decode instances idle (or the reverse), one
instance changes role. No public design exists (only the ERNIE 4.5 model card's sentence); this is ours.

The rule, checked every `check_interval_s` from what the router measures:
  pressure(role) = mean over the role's usable instances of (its scraped num_requests_waiting + this router's
                   requests on it now), i.e. the queue each instance of the role is facing;
  switch one decode instance to prefill when pressure(prefill) > ratio * pressure(decode) + min_gap,
  switch one prefill instance to decode when pressure(decode) > ratio * pressure(prefill) + min_gap,
  only if the condition held for `hold_checks` consecutive checks (hysteresis against a burst), no switch
  happened in the last `cooldown_s` (against flapping: a switch changes the pressures it is judged by), and the
  donor role keeps at least `min_per_role` usable instances. The donor is its role's least loaded instance.

The switch itself never drops or duplicates a request: the instance is marked draining (the router sends it
nothing new), the router waits until none of its own requests is on it (a prefill instance's in-flight count
covers its requests until their KV has been imported), then POSTs /disagg/role and routes by the new role.
Exports still pending on a former prefill instance are served until fetched or expired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .instances import Instance, Registry

logger = logging.getLogger("ernie45.router")


@dataclass
class RoleSwitchConfig:
    """Thresholds of the rule in the module docstring."""

    enabled: bool = False
    """Switch roles automatically (POST /router/role switches by hand either way)."""
    ratio: float = 3.0
    """One role's pressure must exceed this multiple of the other's ..."""
    min_gap: float = 2.0
    """... plus this many queued requests per instance."""
    hold_checks: int = 3
    """Consecutive checks the condition must hold."""
    cooldown_s: float = 20.0
    """Seconds after a switch during which no other switch starts."""
    min_per_role: int = 1
    """Usable instances the donor role keeps."""
    check_interval_s: float = 1.0
    drain_timeout_s: float = 120.0
    """A drain that takes longer is abandoned (the instance keeps its role and is used again)."""

    def __post_init__(self) -> None:
        if self.ratio < 1 or self.min_gap < 0 or self.hold_checks < 1 or self.min_per_role < 1:
            raise ValueError("role switching needs ratio >= 1, min_gap >= 0, hold_checks >= 1, min_per_role >= 1")


def pressure(instances: list[Instance]) -> float:
    return sum(i.waiting + i.in_flight for i in instances) / len(instances) if instances else 0.0


class RoleBalancer:
    def __init__(self, registry: Registry, config: RoleSwitchConfig, on_switch=None):
        self.registry = registry
        self.config = config
        self.on_switch = on_switch
        self._streak: tuple[str | None, int] = (None, 0)
        self._last_switch = -float("inf")
        self.lock = asyncio.Lock()

    def decide(self, now: float | None = None) -> tuple[Instance, str] | None:
        """(instance, new role) when the rule says switch now; updates the hysteresis streak."""
        c = self.config
        now = time.monotonic() if now is None else now
        prefill, decode = self.registry.usable("prefill"), self.registry.usable("decode")
        p, d = pressure(prefill), pressure(decode)
        want = None
        if p > c.ratio * d + c.min_gap and len(decode) > c.min_per_role:
            want = "prefill"
        elif d > c.ratio * p + c.min_gap and len(prefill) > c.min_per_role:
            want = "decode"
        streak = self._streak[1] + 1 if want is not None and want == self._streak[0] else 1
        self._streak = (want, streak if want is not None else 0)
        if want is None or streak < c.hold_checks or now - self._last_switch < c.cooldown_s:
            return None
        donors = decode if want == "prefill" else prefill
        return min(donors, key=lambda i: i.load), want

    async def switch(self, inst: Instance, role: str) -> dict:
        """Drain `inst`, then switch it to `role`; returns the instance's reply (or raises TimeoutError)."""
        async with self.lock:
            self._last_switch = time.monotonic()
            self._streak = (None, 0)
            inst.draining = True
            try:
                deadline = time.monotonic() + self.config.drain_timeout_s
                while inst.in_flight > 0:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{inst.url} still had {inst.in_flight} requests after "
                                           f"{self.config.drain_timeout_s}s of draining")
                    await asyncio.sleep(0.01)
                reply = await self.registry.client.post(inst.url + "/disagg/role", json={"role": role}, timeout=10)
                reply.raise_for_status()
                logger.info("instance %s: role %s -> %s", inst.url, inst.role, role)
                inst.role = role
                if self.on_switch is not None:
                    self.on_switch(role)
                return reply.json()
            finally:
                inst.draining = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            if not self.config.enabled or self.lock.locked():
                continue
            decision = self.decide()
            if decision is not None:
                try:
                    await self.switch(*decision)
                except Exception as exc:  # noqa: BLE001 (a failed switch leaves the instance in its old role)
                    logger.warning("role switch of %s failed: %s", decision[0].url, exc)
