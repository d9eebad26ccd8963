"""ERNIE 4.5 VL vision tower: a pre-norm ViT over flattened 14x14 patches with 2-D rotary positions, attending within
each image or video frame only.

Patches arrive flattened ([C*P*P] each) and ordered in spatial-merge windows (the processor's order), so that the
resampler can merge 2x2 neighbours by a reshape. Legend: N patches, C vision width, D head dim, F frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SegmentAttention
from .layers import Linear, apply_rotary
from .vl_config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch [N, 2], in the processor's merge-window order, frames repeating their grid."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        rc = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self, x_NC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: SegmentAttention
    ) -> torch.Tensor:
        N = x_NC.shape[0]
        # Heads from the weight's rows (-1), not the config: a tensor-parallel rank holds only its share of them.
        q, k, v = self.qkv(x_NC).view(N, 3, -1, self.head_dim).unbind(1)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin, interleaved=False), apply_rotary(k, cos, sin, interleaved=False)
        o = attn.attend(0, q[None], k[None], v[None], self.scale)[0]
        return self.proj(o.reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """x + Attn(LN(x)); then + MLP(LN(.))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x_NC, rope, attn: SegmentAttention) -> torch.Tensor:
        x_NC = x_NC + self.attn(self.norm1(x_NC), rope, attn)
        return x_NC + self.mlp(self.norm2(x_NC))


class PatchEmbed(nn.Module):
    """Linear (no bias) on flattened [C, P, P] patches: the released model's patch embedding."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = Linear(config.in_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, pixels_NP: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels_NP.to(self.proj.weight.dtype))


class VisionTransformer(nn.Module):
    """pixel patches [N, C*P*P] + grid_thw [items, 3] -> patch features [N, C] (after the final LayerNorm)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.register_buffer("inv_freq", self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config: VisionConfig) -> torch.Tensor:
        # head_dim / 4 frequencies; the h angles fill the first half of each rotated half, the w angles the second.
        spatial = config.head_dim // 2
        return 1.0 / (config.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))

    def rope(self, grid_thw: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos_N2 = patch_positions(grid_thw, self.config.spatial_merge_size).to(device)
        freqs_N2F = pos_N2[..., None].float() * self.inv_freq.float()
        freqs_ND2 = freqs_N2F.flatten(1)  # [h freqs..., w freqs...]
        return freqs_ND2.cos(), freqs_ND2.sin()

    def forward(self, pixels_NP: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = grid_thw.cpu()
        expected = int(grid_thw.prod(-1).sum())
        if pixels_NP.shape[0] != expected:
            raise ValueError(
                f"pixel values have {pixels_NP.shape[0]} patches, the grids {grid_thw.tolist()} need {expected}"
            )
        frames = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        attn = SegmentAttention(frames)
        x = self.patch_embed(pixels_NP)
        rope = self.rope(grid_thw, x.device)
        for block in self.blocks:
            x = block(x, rope, attn)
        return self.ln(x)
