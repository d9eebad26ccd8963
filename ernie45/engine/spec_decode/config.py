"""`SpeculativeConfig`: vLLM's `speculative_config` ({"method": "ngram", "num_speculative_tokens": k, ...}).

Only n-gram (prompt lookup) drafting is implemented so far; "mtp" and "mtp_ngram" are refused with a message that
says so, rather than accepted and silently run without drafts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram",)
NOT_YET = ("mtp", "mtp_ngram")


@dataclass
class SpeculativeConfig:
    """How the engine drafts tokens for the model to verify in one forward."""

    method: str = "ngram"
    """Drafting method: "ngram" (prompt lookup: the tokens that followed the last match of the recent n-gram)."""
    num_speculative_tokens: int = 4
    """Draft tokens proposed per sequence per step (k): each step verifies up to k and adds up to k + 1 tokens."""
    prompt_lookup_min: int = 1
    """Shortest n-gram matched against earlier tokens."""
    prompt_lookup_max: int = 4
    """Longest n-gram tried first (longer matches predict better)."""
    disable_by_batch_size: int | None = 4
    """Stop drafting while more sequences than this run: verification costs compute that a large batch, no
    longer memory-bound, pays for in full (vLLM's speculative_disable_by_batch_size). None: always draft."""

    def __post_init__(self) -> None:
        if self.method in NOT_YET:
            raise ValueError(f"speculative_config.method {self.method!r} is not implemented yet; use \"ngram\"")
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        value = self.disable_by_batch_size
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"speculative_config.disable_by_batch_size must be an integer >= 1 or null, "
                             f"got {value!r}")

    @classmethod
    def of(cls, value: Any) -> SpeculativeConfig | None:
        """From None, a SpeculativeConfig, a dict or its JSON text (`--speculative-config '{...}'`)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be an object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field {unknown[0]!r}; fields are {', '.join(known)}")
        return cls(**value)
