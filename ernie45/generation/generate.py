"""The model core's own generation loop, for every model family: prefill once, then one token per step against a
static KV cache. The family's differences (VL: media merged into the prompt's embeddings, 3-D positions, routing
types) sit behind the model protocol `prepare_inputs` / `decode_inputs` / `forward_inputs` (models/inputs.py).

For single requests and equal-length batches (CLI, tests, benchmarks); serving many requests is the engine's job.
Legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..models.registry import spec_for
from .static_cache import StaticKVCache


@dataclass
class GenerationConfig:
    """Sampling settings of `generate`."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens."""
    temperature: float = 0.0
    """0 means greedy; otherwise logits are divided by it."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 means off."""
    seed: int | None = None
    """Seed of the sampling generator (same seed, same output)."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a row ends after it emits one of these."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits_BV: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits."""
    logits = logits_BV.float()  # half-precision reductions over the vocabulary are slow on CPUs
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream_generate(model: nn.Module, input_ids_BT: torch.Tensor, cfg: GenerationConfig, **media) -> Iterator[torch.Tensor]:
    """Yields the next token ids [B] step by step; stops when every row has hit a stop token or the budget.
    `media` (VL models): pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw."""
    if input_ids_BT.dim() != 2 or input_ids_BT.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor, got shape {tuple(input_ids_BT.shape)}")
    B, T = input_ids_BT.shape
    device = model.device
    text_config = spec_for(model).text_config(model.config)
    cache = StaticKVCache(text_config, B, T + cfg.max_new_tokens, model.dtype, device)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stop = torch.tensor(cfg.stop_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    prompt = inputs = model.prepare_inputs(input_ids_BT.to(device), **media)
    for _ in range(cfg.max_new_tokens):
        hidden = model.forward_inputs(inputs, cache)
        cache.advance()
        next_ids = sample(model.compute_logits(hidden[:, -1]), cfg, generator)
        yield next_ids
        if len(stop):
            finished |= torch.isin(next_ids, stop)
            if bool(finished.all()):
                return
        inputs = model.decode_inputs(next_ids[:, None], cache.length, prompt)


def generate(model: nn.Module, input_ids_BT: torch.Tensor, cfg: GenerationConfig | None = None, **kwargs):
    """input_ids [B, T] -> [B, T + new] (rows that stopped early keep generating until all stop, as HF does).

    `kwargs`: GenerationConfig fields (when `cfg` is not given) and, for VL models, the media inputs."""
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in GenerationConfig.__dataclass_fields__}
    if cfg is None:
        cfg = GenerationConfig(**fields)
    elif fields:
        raise ValueError(f"generate: pass either cfg or {', '.join(sorted(fields))}, not both")
    steps = list(stream_generate(model, input_ids_BT, cfg, **kwargs))
    return torch.cat([input_ids_BT.to(model.device), torch.stack(steps, dim=1)], dim=1)
