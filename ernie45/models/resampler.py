"""ERNIE 4.5 VL variable-resolution resampler: vision patch features -> language-model tokens.

2x2 spatial merge (concatenate the 4 patches of a merge window, then Linear-GELU-Linear-LayerNorm), temporal merge
(concatenate frame pairs; an image pairs its single frame with itself, then Linear-GELU-Linear-LayerNorm), a Linear
to the text width and an RMSNorm. Legend: N patches, M merged tokens, C vision width, S = C * merge^2, H text hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear, RMSNorm
from .vl_config import Ernie45VLConfig


class ResamplerMLP(nn.Module):
    """fc1 -> GELU -> fc2 -> LayerNorm (released names `.0`, `.2`, `.3`)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.fc1 = Linear(in_dim, out_dim, bias=True)
        self.fc2 = Linear(out_dim, out_dim, bias=True)
        self.ln = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc2(F.gelu(self.fc1(x))))


def pair_frames(x_MS: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Per item, the tokens of frames (2k, 2k+1) concatenated side by side; an image's single frame with itself."""
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        per_frame = h * w // merge**2
        frames = x_MS[start : start + t * per_frame].view(t, per_frame, -1)
        start += t * per_frame
        if t == 1:
            out.append(torch.cat([frames[0], frames[0]], dim=-1))
        else:
            pairs = t // 2
            out.append(torch.cat([frames[0 : 2 * pairs : 2], frames[1 : 2 * pairs : 2]], dim=-1).flatten(0, 1))
    return torch.cat(out)


class Resampler(nn.Module):
    """[N, C] patch features of images/videos (grid_thw [items, 3]) -> [tokens, H] language-model embeddings."""

    def __init__(self, config: Ernie45VLConfig):
        super().__init__()
        vision = config.vision
        self.merge = vision.spatial_merge_size
        spatial = vision.hidden_size * self.merge**2
        self.spatial_linear = ResamplerMLP(spatial, spatial, vision.rms_norm_eps)
        self.temporal_linear = ResamplerMLP(spatial * vision.temporal_merge_size, spatial, vision.rms_norm_eps)
        self.mlp = Linear(spatial, config.text.hidden_size, bias=True)
        self.after_norm = RMSNorm(config.text.hidden_size, config.text.rms_norm_eps)

    def forward(self, x_NC: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x_MS = self.spatial_linear(x_NC.reshape(-1, x_NC.shape[-1] * self.merge**2))
        x = self.temporal_linear(pair_frames(x_MS, grid_thw.cpu(), self.merge))
        return self.after_norm(self.mlp(x))
