"""Generation for the VL model: one prefill over the merged text + vision embeddings with 3-D positions, then text
decode steps at (cache length + delta) on all three RoPE axes, against a static KV cache. Legend: B batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..models.ernie45_vl import Ernie45VLForConditionalGeneration
from .generate import GenerationConfig, sample
from .static_cache import StaticKVCache


@torch.inference_mode()
def stream_generate_vl(
    model: Ernie45VLForConditionalGeneration,
    input_ids_BT: torch.Tensor,
    cfg: GenerationConfig,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yields the next token ids [B] step by step; stops when every row has hit a stop token or the budget."""
    if input_ids_BT.dim() != 2 or input_ids_BT.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor, got shape {tuple(input_ids_BT.shape)}")
    device = model.device
    ids = input_ids_BT.to(device)
    B, T = ids.shape
    cache = StaticKVCache(model.config.text, B, T + cfg.max_new_tokens, model.dtype, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    stop = torch.tensor(cfg.stop_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    x = model.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    positions, delta_B1 = model.positions(ids, image_grid_thw, video_grid_thw)
    moe_types = model.moe_token_types(ids)
    for _ in range(cfg.max_new_tokens):
        hidden = model.forward_hidden(x, positions, cache, moe_types)
        cache.advance()
        next_ids = sample(model.compute_logits(hidden[:, -1]), cfg, generator)
        yield next_ids
        if len(stop):
            finished |= torch.isin(next_ids, stop)
            if bool(finished.all()):
                return
        x = model.model.language_model.embed_tokens(next_ids[:, None])
        positions = (cache.length + delta_B1).view(1, B, 1).expand(3, B, 1)
        moe_types = None  # decode tokens route as text, as in transformers


def generate_vl(
    model: Ernie45VLForConditionalGeneration, input_ids_BT: torch.Tensor, cfg: GenerationConfig | None = None, **inputs
) -> torch.Tensor:
    """input_ids [B, T] (+ pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw) -> [B, T + new]."""
    cfg = cfg or GenerationConfig(
        **{k: inputs.pop(k) for k in list(inputs) if k in GenerationConfig.__dataclass_fields__}
    )
    steps = list(stream_generate_vl(model, input_ids_BT, cfg, **inputs))
    return torch.cat([input_ids_BT.to(model.device), torch.stack(steps, dim=1)], dim=1)
