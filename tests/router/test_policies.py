"""The router's choices without processes: policies, prefix hashes, and the role-switch rule's thresholds,
hysteresis, cooldown and floor."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ernie45.router.instances import Instance, Registry
from ernie45.router.policies import Policy, prefix_hashes
from ernie45.router.proxy import Proxy
from ernie45.router.role_switch import RoleBalancer, RoleSwitchConfig


def _instances(n: int, role: str = "decode") -> list[Instance]:
    return [Instance(f"http://d{i}", role, healthy=True) for i in range(n)]


def test_round_robin_cycles_and_least_load_picks_the_emptiest():
    insts = _instances(3)
    rr = Policy("round_robin")
    assert [rr.choose(insts, []).url for _ in range(6)] == [i.url for i in insts] * 2
    insts[0].running, insts[1].waiting, insts[2].in_flight = 5, 3, 1
    assert Policy("least_load").choose(insts, []) is insts[2]
    with pytest.raises(ValueError, match="policy must be one of"):
        Policy("random")


def test_prefix_hashes_chain_over_the_prompt():
    base = {"messages": [{"role": "system", "content": "x" * 400}, {"role": "user", "content": "a"}]}
    other = {"messages": [{"role": "system", "content": "x" * 400}, {"role": "user", "content": "b" * 200}]}
    a, b = prefix_hashes(base), prefix_hashes(other)
    shared = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= 5  # the common system prompt gives the same leading hashes
    assert prefix_hashes({"prompt": "y" * 10}) == []  # shorter than one chunk: no affinity


def test_cache_aware_follows_the_prefix_unless_that_instance_is_overloaded():
    insts = _instances(3)
    policy = Policy("cache_aware", balance_slack=4)
    body = {"messages": [{"role": "user", "content": "shared context " * 40}]}
    hashes = prefix_hashes(body)
    insts[0].running = 1  # makes another instance the least loaded: the first choice is not affinity
    first = policy.choose(insts, hashes)
    assert first is not insts[0]
    first.running = 2  # busier now than the others, within the slack
    assert policy.choose(insts, hashes) is first
    first.running = 9  # beyond the slack: least load wins
    assert policy.choose(insts, hashes) is not first


def test_pd_eligibility():
    assert Proxy.pd_eligible("/v1/chat/completions", {"messages": []})
    assert not Proxy.pd_eligible("/v1/chat/completions", {"messages": [], "n": 2})
    assert Proxy.pd_eligible("/v1/completions", {"prompt": "hi"})
    assert Proxy.pd_eligible("/v1/completions", {"prompt": [1, 2, 3]})
    assert not Proxy.pd_eligible("/v1/completions", {"prompt": ["a", "b"]})
    assert not Proxy.pd_eligible("/v1/completions", {"prompt": "a", "prompt_logprobs": 1})


def _balancer(n_prefill: int, n_decode: int, **config) -> tuple[RoleBalancer, list[Instance], list[Instance]]:
    registry = Registry(client=None)
    prefill = [registry.add(f"http://p{i}", "prefill") for i in range(n_prefill)]
    decode = [registry.add(f"http://d{i}", "decode") for i in range(n_decode)]
    for inst in registry.instances:
        inst.healthy = True
    return RoleBalancer(registry, RoleSwitchConfig(enabled=True, **config)), prefill, decode


def test_role_rule_needs_the_imbalance_to_hold_then_cools_down():
    balancer, prefill, decode = _balancer(1, 2, ratio=3.0, min_gap=2.0, hold_checks=3, cooldown_s=10.0)
    prefill[0].waiting = 12  # prefill pressure 12 vs decode 1: 12 > 3 * 1 + 2
    decode[0].in_flight, decode[1].in_flight = 2, 0
    assert balancer.decide(now=100.0) is None
    assert balancer.decide(now=101.0) is None
    inst, role = balancer.decide(now=102.0)
    assert role == "prefill" and inst is decode[1]  # the least loaded decode instance
    # A burst that does not last resets the streak.
    balancer._streak = (None, 0)
    balancer.decide(now=103.0)
    prefill[0].waiting = 0
    assert balancer.decide(now=104.0) is None
    prefill[0].waiting = 12
    assert balancer.decide(now=105.0) is None and balancer.decide(now=106.0) is None
    # Within the cooldown of a switch nothing switches, however long the imbalance holds.
    balancer._last_switch = 106.5
    assert all(balancer.decide(now=107.0 + k) is None for k in range(5))
    assert balancer.decide(now=117.0) is not None


def test_role_rule_keeps_a_floor_and_a_dead_band():
    balancer, prefill, decode = _balancer(1, 1, hold_checks=1)
    prefill[0].waiting = 50
    assert balancer.decide(now=0.0) is None  # the only decode instance is never taken
    balancer, prefill, decode = _balancer(2, 2, ratio=3.0, min_gap=2.0, hold_checks=1)
    prefill[0].waiting, decode[0].in_flight = 4, 1  # prefill 2 vs decode 0.5: inside 3 * 0.5 + 2
    assert balancer.decide(now=0.0) is None
    decode[0].in_flight, decode[1].in_flight, prefill[0].waiting = 20, 20, 0
    inst, role = balancer.decide(now=0.0)
    assert role == "decode" and inst in prefill


def test_switch_drains_before_it_switches():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, inst.in_flight, inst.draining))
        return httpx.Response(200, json={"ok": True, "role": "decode"})

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            balancer.registry.client = client
            inst.in_flight = 2

            async def finish_requests():
                await asyncio.sleep(0.05)
                assert inst.draining and inst not in balancer.registry.usable("prefill")
                inst.in_flight = 0

            _, reply = await asyncio.gather(finish_requests(), balancer.switch(inst, "decode"))
            return reply

    balancer, prefill, _ = _balancer(2, 1)
    inst = prefill[0]
    assert asyncio.run(run())["role"] == "decode"
    assert calls == [("/disagg/role", 0, True)]  # the role changed only once nothing of ours ran there
    assert inst.role == "decode" and not inst.draining
