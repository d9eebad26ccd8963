"""VL-SFT forward and losses: the VL model run on a padded multimodal batch, the LM loss on assistant tokens only,
and the MoE router losses per modality.

Text and vision tokens route to separate expert sets (`ModalityMoeBlock`), so each set is balanced over its own
tokens: the aux and z losses of the text gate see only (non-padding) text tokens, those of the vision gate only
vision tokens, and the orthogonal loss is taken per gate and summed. Legend: B rows, T tokens, N = B*T, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.attention import CausalAttention
from ..models.ernie45_vl import Ernie45VLForConditionalGeneration
from ..models.moe import ModalityMoeBlock
from .config import TrainConfig
from .losses import (
    IGNORE,
    expert_usage,
    moe_aux_loss,
    moe_z_loss,
    orthogonal_loss,
    shifted_targets,
    token_balanced,
    token_cross_entropy,
)

MODALITIES = ("text", "vision")


def modality_blocks(model: Ernie45VLForConditionalGeneration) -> list[ModalityMoeBlock]:
    return [layer.mlp for layer in model.model.language_model.layers if isinstance(layer.mlp, ModalityMoeBlock)]


@dataclass
class RoutedTokens:
    """One gate's router logits in one layer, with the rows that are real tokens."""

    gate: nn.Module
    """The MoeBlock (text_moe or vision_moe) whose router produced the logits."""
    logits_NE: torch.Tensor
    mask_N: torch.Tensor
    """False on padding rows."""


@dataclass
class VLTrainOutput:
    logits: torch.Tensor
    """[M, V] at the M target positions."""
    routed: list[dict[str, RoutedTokens]] = field(default_factory=list)
    """Per MoE layer: {"text": ..., "vision": ...} (vision only when the batch has vision tokens)."""
    orthogonal: torch.Tensor | None = None
    """Sum over MoE layers and both gates of the router orthogonal loss (None when not requested)."""


def split_router_logits(router_logits: list[torch.Tensor], blocks: list[ModalityMoeBlock], moe_types_BT: torch.Tensor,
                        segment_ids_BT: torch.Tensor) -> list[dict[str, RoutedTokens]]:
    """The flat list the MoE layers append to -> per layer and modality. Each `ModalityMoeBlock` appends its text
    gate's logits [text tokens, E] (all tokens when there is no vision token), then, when the batch has vision
    tokens, its vision gate's [vision tokens, E]; rows follow the flattened [B, T] order."""
    vision_N = moe_types_BT.reshape(-1) != 0
    valid_N = segment_ids_BT.reshape(-1) >= 0
    has_vision = bool(vision_N.any())
    expected = len(blocks) * (2 if has_vision else 1)
    if len(router_logits) != expected:
        raise RuntimeError(f"{len(router_logits)} router outputs for {len(blocks)} modality MoE layers "
                           f"(expected {expected})")
    out, it = [], iter(router_logits)
    for block in blocks:
        layer = {"text": RoutedTokens(block.text_moe, next(it), valid_N[~vision_N])}
        if has_vision:
            layer["vision"] = RoutedTokens(block.vision_moe, next(it), valid_N[vision_N])
        out.append(layer)
    return out


class VLTrainingModel(nn.Module):
    """Wraps the VL model; one `forward(batch)` so that autograd hooks see a single call."""

    def __init__(self, model: Ernie45VLForConditionalGeneration, orthogonal_group: bool | None = None):
        super().__init__()
        self.model = model
        self.orthogonal_group = orthogonal_group  # None: orthogonal loss off
        self.blocks = modality_blocks(model)

    def forward(self, batch: dict[str, torch.Tensor], logit_mask_BT: torch.Tensor) -> VLTrainOutput:
        m = self.model
        ids, seg = batch["input_ids"], batch["segment_ids"]
        x = m.embed(ids, batch.get("pixel_values"), batch.get("image_grid_thw"), batch.get("pixel_values_videos"),
                    batch.get("video_grid_thw"))
        # Right padding only, one sample per row: plain causal attention is exact for every real token.
        attn = CausalAttention(None)
        router_logits: list[torch.Tensor] = []
        hidden = m.forward_hidden(x, batch["positions"], attn, batch["moe_types"], router_logits)
        out = VLTrainOutput(m.compute_logits(hidden[logit_mask_BT]))
        out.routed = split_router_logits(router_logits, self.blocks, batch["moe_types"], seg)
        if self.orthogonal_group is not None and self.blocks:
            out.orthogonal = sum(
                orthogonal_loss(g.gate.weight, g.gate.top_k, self.orthogonal_group)
                for b in self.blocks for g in (b.text_moe, b.vision_moe)
            )
        return out


def vl_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets [B, T]: the following token where it is an assistant-response token, else IGNORE."""
    return shifted_targets(batch["input_ids"], batch["loss_mask"], batch["segment_ids"], 1)


def router_losses(routed: list[dict[str, RoutedTokens]], aux: bool, z: bool) -> dict[str, torch.Tensor]:
    """{"aux_text", "aux_vision", "z_text", "z_vision"} summed over layers (those requested and present)."""
    out: dict[str, torch.Tensor] = {}
    for layer in routed:
        for modality, r in layer.items():
            if not bool(r.mask_N.any()):
                continue
            bias = r.gate.moe_statics.e_score_correction_bias
            if aux:
                value = moe_aux_loss(r.logits_NE, r.gate.gate.top_k, r.mask_N, bias)
                out[f"aux_{modality}"] = out.get(f"aux_{modality}", 0.0) + value
            if z:
                out[f"z_{modality}"] = out.get(f"z_{modality}", 0.0) + moe_z_loss(r.logits_NE, r.mask_N)
    return out


class VLObjective:
    """loss = CE(assistant tokens) / step targets + router terms / micro-batches per step."""

    def __init__(self, cfg: TrainConfig, module: VLTrainingModel, n_micro: int):
        self.cfg = cfg
        self.module = module
        self.n_micro = n_micro

    def __call__(self, batch: dict, step_targets: float, usage: dict | None = None) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        targets = vl_targets(batch)
        mask = targets != IGNORE
        out = self.module(batch, mask)
        lm_sum = token_cross_entropy(out.logits, targets[mask], consume_logits=True).sum()
        lm = lm_sum / max(step_targets, 1.0)
        if cfg.token_balance_loss:
            fixed = (cfg.token_balance_seqlen or cfg.max_seq_len * cfg.batch_size) * self.n_micro
            lm = token_balanced(lm_sum, fixed, lm)
        metrics = {"lm_loss": float(lm.detach())}
        loss = lm
        terms = router_losses(out.routed, bool(cfg.moe_aux_loss_lambda), bool(cfg.moe_z_loss_lambda))
        for name, value in terms.items():
            coef = cfg.moe_aux_loss_lambda if name.startswith("aux") else cfg.moe_z_loss_lambda
            loss = loss + coef * value / self.n_micro
            metrics[f"{name}_loss"] = float(value.detach()) / self.n_micro
        if out.orthogonal is not None:
            loss = loss + cfg.moe_orthogonal_loss_lambda * out.orthogonal / self.n_micro
            metrics["orthogonal_loss"] = float(out.orthogonal.detach()) / self.n_micro
        if usage is not None:
            for i, layer in enumerate(out.routed):
                for modality, r in layer.items():
                    if bool(r.mask_N.any()):
                        usage[i][modality] += expert_usage(r.logits_NE, r.gate.moe_statics.e_score_correction_bias,
                                                           r.gate.gate.top_k, r.mask_N)
        metrics["loss"] = float(loss.detach())
        return loss, metrics
