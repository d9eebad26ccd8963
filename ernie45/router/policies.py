"""Which instance of a role gets a request: round_robin, least_load, cache_aware.

cache_aware (prefix affinity, the idea of SGLang's cache-aware router): the request's prompt (its messages or
prompt as canonical JSON) is cut into fixed-size character chunks and chain-hashed, like the engine's KV blocks
but on text, since the router has no tokenizer. The instance that was sent the longest run of the same leading
hashes is likely to hold that prefix in its KV cache; it wins unless its load exceeds the least loaded instance's
by more than `balance_slack` (then least_load decides, so one hot prefix cannot pin all traffic to one instance).
"""

from __future__ import annotations

import hashlib
import itertools
import json

from .instances import Instance

POLICIES = ("round_robin", "least_load", "cache_aware")
_CHUNK_CHARS = 64


def prefix_hashes(body: dict) -> list[str]:
    prompt = body.get("messages", body.get("prompt", ""))
    text = json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    hashes, parent = [], b""
    for start in range(0, len(text) - _CHUNK_CHARS + 1, _CHUNK_CHARS):
        parent = hashlib.sha256(parent + text[start:start + _CHUNK_CHARS].encode()).digest()
        hashes.append(parent.hex()[:16])
    return hashes


class Policy:
    def __init__(self, name: str, balance_slack: float = 4.0):
        if name not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
        self.name = name
        self.balance_slack = balance_slack
        self._counter = itertools.count()

    def choose(self, candidates: list[Instance], hashes: list[str]) -> Instance:
        if not candidates:
            raise LookupError("no usable instance")
        if self.name == "round_robin":
            chosen = candidates[next(self._counter) % len(candidates)]
        elif self.name == "least_load":
            chosen = min(candidates, key=lambda i: i.load)
        else:
            chosen = self._cache_aware(candidates, hashes)
        if hashes:
            chosen.remember(hashes)
        return chosen

    def _cache_aware(self, candidates: list[Instance], hashes: list[str]) -> Instance:
        least = min(candidates, key=lambda i: i.load)

        def matched(inst: Instance) -> int:
            return next((k for k, h in enumerate(hashes) if h not in inst.prefixes), len(hashes))

        best = max(candidates, key=lambda i: (matched(i), -i.load))
        if matched(best) == 0 or best.load - least.load > self.balance_slack:
            return least
        return best
