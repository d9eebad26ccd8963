"""The inputs of one forward in the protocol every model family shares (`prepare_inputs` for a prompt,
`decode_inputs` for the next tokens, `forward_inputs` -> pre-norm hidden states), so that a generation loop or an
engine runs text and VL models through the same calls. Legend: B batch, T tokens, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    """[B, T] token ids."""
    positions: torch.Tensor
    """RoPE positions: [T] or [B, T] for text models, [3, B, T] (t, h, w) for VL models."""
    inputs_embeds: torch.Tensor | None = None
    """[B, T, H] embeddings with image / video features merged in (VL prompts); None = embed `input_ids`."""
    moe_token_types: torch.Tensor | None = None
    """[B, T] routing modality of VL tokens (0 text, else vision); None = every token routes as text."""
    rope_delta: torch.Tensor | None = None
    """[B, 1] VL: a generated token at cache position p sits at p + delta on all three RoPE axes."""
