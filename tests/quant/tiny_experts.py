"""A tiny stack of MoE experts (4 experts, hidden 32, width 16) with weights large enough to quantize visibly."""

import torch

from ernie45.models.config import Ernie45Config
from ernie45.models.moe import Experts


def tiny_experts() -> Experts:
    config = Ernie45Config.from_dict(
        {
            "model_type": "ernie4_5_moe",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "moe_num_experts": 4,
            "moe_k": 2,
            "moe_intermediate_size": 16,
        }
    )
    module = Experts(config)
    torch.nn.init.normal_(module.gate_up_proj, std=0.3)
    torch.nn.init.normal_(module.down_proj, std=0.3)
    return module
