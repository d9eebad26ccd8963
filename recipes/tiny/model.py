"""The default model's shape (ERNIE 4.5 MoE: shared expert, dense first layer, top-2 of 8 experts) and its
randomly initialised starting checkpoint, which pretraining reads like any other checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from ernie45.checkpoint.saver import save_model
from ernie45.models.config import Ernie45Config
from ernie45.models.ernie45 import Ernie45ForCausalLM
from ernie45.tokenizer import load_tokenizer


def model_config(vocab_size: int) -> Ernie45Config:
    """About 8.8M parameters (about 3.9M active per token): 17.6 MB in bfloat16."""
    return Ernie45Config(
        model_type="ernie4_5_moe",
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        moe_num_experts=8,
        moe_k=2,
        moe_intermediate_size=256,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        moe_layer_end_index=-1,
        moe_layer_interval=1,
        eos_token_id=2,
    )


def padded_vocab_size(tokenizer_size: int, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer's ids rounded up, as the released models pad 103,367 ids to 103,424 rows."""
    return -(-tokenizer_size // multiple) * multiple


def write_initial_checkpoint(out_dir: Path, tokenizer_dir: Path, seed: int) -> Path:
    """Random weights (normal(0, 0.02), seeded) in the HF layout, with the tokenizer files beside them."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = model_config(padded_vocab_size(tokenizer.vocab_size))
    model = Ernie45ForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    model.generation_config = {
        "bos_token_id": 1, "eos_token_id": [2, tokenizer.token_to_id("<|end_of_sentence|>")],
        "pad_token_id": 0, "do_sample": True, "temperature": 0.8, "top_p": 0.8,
    }
    return save_model(model, out_dir, tokenizer=tokenizer_dir)
