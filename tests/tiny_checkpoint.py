"""A tiny ERNIE 4.5 checkpoint directory (random MoE weights + a tiny SentencePiece tokenizer) for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import torch

import ernie45
from ernie45.checkpoint import build_empty_model
from ernie45.models import Ernie45Config
from ernie45.tokenizer import load_tokenizer
from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer


def make_tiny_checkpoint(out_dir: Path, seed: int = 0, moe: bool = True, **overrides) -> Path:
    """`overrides`: config fields replacing the tiny defaults (e.g. a wider moe_intermediate_size)."""
    tok_dir = build_tiny_sentencepiece_tokenizer(out_dir.parent / f"{out_dir.name}-tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    config = Ernie45Config.from_dict(dict(
        model_type="ernie4_5_moe" if moe else "ernie4_5", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=4, moe_k=2,
        moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1, initializer_range=0.3,
    ) | overrides)
    model = build_empty_model(config, torch.float32)
    model.init_weights(torch.Generator().manual_seed(seed))
    ernie45.save_model(model, out_dir, tokenizer=tokenizer)
    return out_dir


VL_TOKENS = ("<|IMAGE_PLACEHOLDER|>", "<|AUDIO_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>", "<|VIDEO_START|>",
             "<|VIDEO_END|>", "<|VIDEO_PLACEHOLDER|>")


def make_tiny_vl_checkpoint(out_dir: Path, seed: int = 9) -> Path:
    """A tiny ERNIE 4.5 VL checkpoint (transformers-written, random weights) with a tiny tokenizer whose VL special
    tokens carry the config's ids, and small video preprocessing sizes."""
    import json

    from .models.hf_vl_reference import build_hf_vl_model

    build_tiny_sentencepiece_tokenizer(out_dir, extra_added_tokens=VL_TOKENS)
    added = json.loads((out_dir / "added_tokens.json").read_text())
    ids = {name: added[token] for name, token in (
        ("image_token_id", "<|IMAGE_PLACEHOLDER|>"), ("image_start_token_id", "<|IMAGE_START|>"),
        ("image_end_token_id", "<|IMAGE_END|>"), ("video_start_token_id", "<|VIDEO_START|>"),
        ("video_end_token_id", "<|VIDEO_END|>"), ("video_token_id", "<|VIDEO_PLACEHOLDER|>"))}
    build_hf_vl_model(seed=seed, text={"vocab_size": 640}, **ids).save_pretrained(out_dir)
    (out_dir / "video_preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 8, "draw_on_frames": False})
    )
    return out_dir
