"""Engine settings (vLLM's names), validated when built."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_KV_CACHE_MEMORY = 1 << 30


@dataclass
class EngineConfig:
    """How the engine batches and how much KV memory it holds."""

    max_num_seqs: int = 64
    """Most sequences running at once."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step (decode tokens + prefill chunks); smaller means shorter steps, more chunking."""
    max_model_len: int | None = None
    """Longest prompt + output; None means min(max_position_embeddings, 8192)."""
    block_size: int = 16
    """Tokens per KV block."""
    num_kv_blocks: int | None = None
    """KV blocks to allocate; None means sized from kv_cache_memory."""
    kv_cache_memory: int | None = None
    """Bytes of KV memory when num_kv_blocks is None; None means the smaller of 1 GiB and what
    max_num_seqs full-length sequences need."""
    enable_prefix_caching: bool = True
    """Share the KV of identical prompt prefixes (full blocks) between requests."""
    seed: int | None = 0
    """Seed of the engine's RNG, which seeds requests that bring no seed of their own."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
