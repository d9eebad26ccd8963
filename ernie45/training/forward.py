"""The training forward: one `nn.Module.__call__` that runs the decoder with packing metadata, the LM head, the
MTP depths and the router orthogonal loss, so FSDP2/DDP hooks see a single forward (Legend: B rows, T tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import CausalAttention
from ..models.ernie45 import Ernie45ForCausalLM
from ..models.moe import MoeBlock
from .losses import orthogonal_loss


@dataclass
class TrainOutput:
    logits: torch.Tensor
    """[B, T, V] next-token logits, or [M, V] at the M positions of `logit_masks[0]` when given."""
    router_logits: list[torch.Tensor] = field(default_factory=list)
    """Per MoE layer, fp32 [B*T, E]."""
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    """Per MTP depth d, [B, T, V] (or [M_d, V] under `logit_masks[1 + d]`): position t predicts token t + 2 + d."""
    orthogonal: torch.Tensor | None = None
    """Sum over MoE layers of the router orthogonal loss (None when not requested)."""


def moe_blocks(model: Ernie45ForCausalLM) -> list[MoeBlock]:
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoeBlock)]


class TrainingModel(nn.Module):
    """Wraps the single-device model; `forward(batch) -> TrainOutput`."""

    def __init__(self, model: Ernie45ForCausalLM, mtp: bool = False, orthogonal_group: bool | None = None):
        super().__init__()
        self.model = model
        self.mtp = mtp and model.model.num_mtp_layers > 0
        self.orthogonal_group = orthogonal_group  # None: orthogonal loss off

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H]. When the embedding is the LM head's weight too (tied, a plain tensor, one
        process, no hooks), its gradient from this lookup is sparse (the batch's rows), and autograd adds it into the
        head's dense gradient in place, instead of zero-filling, scattering and adding a second [V, H] tensor
        (424 MB at the 0.3B shape)."""
        embed = self.model.model.embed_tokens
        weight = embed.weight
        sparse = (
            torch.is_grad_enabled() and weight.requires_grad and self.model.lm_head.weight is weight
            and type(weight) is nn.Parameter and not (embed._forward_hooks or embed._forward_pre_hooks)
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
        )  # fmt: skip
        return F.embedding(input_ids, weight, sparse=True) if sparse else embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor,
                logit_masks: list[torch.Tensor] | None = None) -> TrainOutput:
        """`logit_masks` (bool [B, T] per head: main, then MTP depths): project only the positions that have a
        target, so prompt tokens of SFT data cost no LM-head matmul."""

        def head(hidden_BTH: torch.Tensor, i: int) -> torch.Tensor:
            if logit_masks is None:
                return self.model.compute_logits(hidden_BTH)
            return self.model.compute_logits(hidden_BTH[logit_masks[i]])

        if int(segment_ids.max()) <= 0:
            # One sample per row (plus right padding, never a target): plain causal attention, no explicit mask.
            segment_ids = None
        attn = CausalAttention(segment_ids)
        router_logits: list[torch.Tensor] = []
        hidden = self.model.forward_hidden(None, positions, attn, self._embed(input_ids), router_logits=router_logits)
        out = TrainOutput(head(hidden, 0), router_logits)
        if self.mtp:
            h = hidden
            for d in range(self.model.model.num_mtp_layers):
                # depth d reads token t+1+d; the shifted-in tail is never a target (see losses.shifted_targets)
                nxt = torch.roll(input_ids, shifts=-(d + 1), dims=1)
                h = self.model.model.mtp_forward(nxt, h, positions, CausalAttention(segment_ids), depth=d)
                out.mtp_logits.append(head(h, 1 + d))
        if self.orthogonal_group is not None:
            blocks = moe_blocks(self.model)
            if blocks:
                out.orthogonal = sum(orthogonal_loss(b.gate.weight, b.gate.top_k, self.orthogonal_group) for b in blocks)
        return out
