"""Text in, streamed text out: tokenizer + `stream_generate` + incremental detokenization."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..tokenizer import IncrementalDetokenizer
from .generate import GenerationConfig, stream_generate


def stream_text(model: nn.Module, tokenizer, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[str]:
    """Yields text deltas (never half a UTF-8 character); stop tokens end the stream and are not shown."""
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization")
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    stops = set(cfg.stop_token_ids)
    for next_ids in stream_generate(model, torch.tensor([prompt_ids]), cfg):
        token = int(next_ids[0])
        if token in stops:
            break
        delta = detok.push(token)
        if delta:
            yield delta
    tail = detok.flush()
    if tail:
        yield tail


def stop_ids_for(tokenizer, model: nn.Module) -> tuple[int, ...]:
    """`</s>` and `<|end_of_sentence|>` (from the tokenizer) plus the eos ids of config and generation_config."""
    ids = set(getattr(tokenizer, "stop_token_ids", []) or []) | set(model.config.eos_token_ids)
    generation_eos = (getattr(model, "generation_config", None) or {}).get("eos_token_id")
    if generation_eos is not None:
        ids |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return tuple(sorted(ids))
