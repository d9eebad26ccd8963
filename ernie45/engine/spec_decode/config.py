"""`SpeculativeConfig`: vLLM's `speculative_config` ({"method": "ngram" | "mtp" | "mtp_ngram", ...}).

"ngram" drafts by prompt lookup; "mtp" with the checkpoint's MTP head (mtp_proposer.py), which runs
`num_speculative_tokens` times per step, each run feeding its own output hidden state back in (FastDeploy's and
vLLM's way of drafting more than one token with one MTP depth); "mtp_ngram" (FastDeploy's mtp_strategy
"with_ngram") drafts `num_model_steps` tokens with the MTP head and lets prompt lookup fill the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "mtp", "mtp_ngram")
MTP_HIDDEN_STATES = ("pre_norm", "post_norm")

# MTP: measured on the embedded default model, batch-1 chat decode on 2 cores (benchmarks/bench_spec_decode.py
# --method mtp --workload chat; results 2026-12-07-spec-decode.md): k = 1 1.36x, k = 2 1.48x, k = 3 1.46x over no
# drafting (acceptance 98%, 82%, 72%): the second draft still pays for its chained head run, the third no longer.
DEFAULT_TOKENS = {"ngram": 4, "mtp": 2, "mtp_ngram": 4}


@dataclass
class SpeculativeConfig:
    """How the engine drafts tokens for the model to verify in one forward."""

    method: str = "ngram"
    """Drafting method: "ngram" (prompt lookup: the tokens that followed the last match of the recent n-gram),
    "mtp" (the checkpoint's multi-token-prediction head) or "mtp_ngram" (MTP first, n-gram fills the rest)."""
    num_speculative_tokens: int | None = None
    """Draft tokens proposed per sequence per step (k): each step verifies up to k and adds up to k + 1 tokens.
    None: 4 for ngram and mtp_ngram, 2 for mtp."""
    prompt_lookup_min: int = 1
    """Shortest n-gram matched against earlier tokens."""
    prompt_lookup_max: int = 4
    """Longest n-gram tried first (longer matches predict better)."""
    num_model_steps: int = 1
    """mtp_ngram: draft tokens the MTP head proposes before prompt lookup fills the rest (FastDeploy's name)."""
    mtp_hidden_state: str = "pre_norm"
    """The main model's hidden state the MTP head reads: "pre_norm" (the last decoder layer's output, as
    PaddleFormers trains it) or "post_norm" (after the final norm, as FastDeploy, vLLM and SGLang feed it)."""
    mtp_final_norm: bool = True
    """Apply the shared final norm to the MTP block's output before the LM head (PaddleFormers and FastDeploy do;
    vLLM and SGLang do not). The defaults are the training reference's; benchmarks/bench_spec_decode.py
    --mtp-variants measures the teacher-forced acceptance of all four combinations on a checkpoint."""
    disable_by_batch_size: int | None = 4
    """Stop drafting while more sequences than this run: verification costs compute that a large batch, no
    longer memory-bound, pays for in full (vLLM's speculative_disable_by_batch_size). None: always draft.
    Measured on 2 cores (default model, chat): at 8 concurrent MTP k = 2 gives 0.94x, k = 3 1.10x, n-gram 1.09x,
    at 16 MTP 0.99x / 0.86x; past 4 the gain is within noise of none and turns to a loss as the batch grows."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_TOKENS[self.method]
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "num_model_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if self.method == "mtp_ngram" and self.num_model_steps >= self.num_speculative_tokens:
            raise ValueError(f"speculative_config.num_model_steps ({self.num_model_steps}) must be below "
                             f"num_speculative_tokens ({self.num_speculative_tokens}) for mtp_ngram, which leaves "
                             f"the rest to n-gram drafting")
        if self.mtp_hidden_state not in MTP_HIDDEN_STATES:
            raise ValueError(f"speculative_config.mtp_hidden_state must be one of {', '.join(MTP_HIDDEN_STATES)}, "
                             f"got {self.mtp_hidden_state!r}")
        if not isinstance(self.mtp_final_norm, bool):
            raise ValueError(f"speculative_config.mtp_final_norm must be true or false, got {self.mtp_final_norm!r}")
        value = self.disable_by_batch_size
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"speculative_config.disable_by_batch_size must be an integer >= 1 or null, "
                             f"got {value!r}")

    @property
    def uses_mtp(self) -> bool:
        return self.method in ("mtp", "mtp_ngram")

    @property
    def num_mtp_tokens(self) -> int:
        """Draft tokens per step the MTP head proposes (0 for ngram)."""
        if self.method == "mtp":
            return self.num_speculative_tokens
        return self.num_model_steps if self.method == "mtp_ngram" else 0

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
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"speculative_config has unknown field {unknown[0]!r}; fields are {', '.join(known)}")
        return cls(**value)
