"""Tiny random transformers ERNIE 4.5 models: the numerical reference of the model tests."""

from __future__ import annotations

import torch

DENSE_BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, initializer_range=0.3, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
MOE_BASE = dict(DENSE_BASE, moe_intermediate_size=24, moe_num_experts=6, moe_k=2, moe_num_shared_experts=1,
                moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1)


def build_hf_model(moe: bool, seed: int = 0, **overrides):
    """A transformers Ernie4_5(_Moe)ForCausalLM with random weights, non-zero biases and correction biases."""
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM, Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(MOE_BASE if moe else DENSE_BASE, **overrides)
    config = Ernie4_5_MoeConfig(**kwargs) if moe else Ernie4_5Config(**kwargs)
    model = (Ernie4_5_MoeForCausalLM if moe else Ernie4_5ForCausalLM)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.uniform_(0.0, 0.5)  # large enough to change which experts win
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name:
                p.normal_(0.0, 1.0)
    return model


def hf_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation with transformers' own generate (KV cache on, EOS ignored)."""
    model.generation_config.eos_token_id = None  # pure greedy: no EOS stop, no EOS suppression
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]
