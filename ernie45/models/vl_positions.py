"""3-D RoPE positions (t, h, w) of an interleaved text / image / video sequence, built as transformers builds them.

A text run continues 0, 1, 2, ... on all three axes. A vision block starting at position p gets
t = p + frame (frame pairs for videos), h = p + row, w = p + col on the merged grid; the next run starts at
p + max(rows, cols) (transformers' rule; vLLM's differs for some videos). Legend: B batch, T tokens.
"""

from __future__ import annotations

import itertools

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids_BT: torch.Tensor, type_of_id: dict[int, int]) -> torch.Tensor:
    """Per-token modality [B, T] (0 text, 1 image, 2 video) from the ids listed in `type_of_id`."""
    out = torch.zeros_like(input_ids_BT)
    for token_id, kind in type_of_id.items():
        out[input_ids_BT == token_id] = kind
    return out


def vision_block_positions(start: int, grid_thw: list[int], t_merge: int, s_merge: int) -> torch.Tensor:
    t, h, w = grid_thw[0] // t_merge, grid_thw[1] // s_merge, grid_thw[2] // s_merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def rope_positions(
    input_ids_BT: torch.Tensor,
    mm_token_types_BT: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    spatial_merge: int,
    temporal_merge: int,
    attention_mask_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [3, B, T] and per-row delta [B, 1] (decode position = cache length + delta on all three axes).

    `mm_token_types` marks placeholders only (1 image, 2 video); grids are consumed in order across the batch.
    Padding (attention_mask 0) gets position 0.
    """
    B, T = input_ids_BT.shape
    positions = torch.zeros(3, B, T, dtype=torch.long)
    grids = {
        IMAGE: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
        VIDEO: iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
    }
    deltas = []
    for b in range(B):
        keep = torch.ones(T, dtype=torch.bool) if attention_mask_BT is None else attention_mask_BT[b].cpu().bool()
        kinds = mm_token_types_BT[b].cpu()[keep].tolist()
        parts, pos = [], 0
        for kind, run in itertools.groupby(kinds):
            n = len(list(run))
            if kind == TEXT:
                parts.append(torch.arange(pos, pos + n).expand(3, -1))
                pos += n
                continue
            try:
                grid = next(grids[kind])
            except StopIteration:
                name = "image" if kind == IMAGE else "video"
                raise ValueError(f"more {name} placeholder runs in input_ids than {name}_grid_thw rows") from None
            block = vision_block_positions(pos, grid, 1 if kind == IMAGE else temporal_merge, spatial_merge)
            if block.shape[1] != n:
                raise ValueError(f"a run of {n} placeholder tokens, but its grid {grid} needs {block.shape[1]}")
            parts.append(block)
            pos += max(grid[1], grid[2]) // spatial_merge
        row = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        positions[:, b, keep] = row
        deltas.append((int(row.max()) + 1 if row.numel() else 0) - len(kinds))
    return positions.to(input_ids_BT.device), torch.tensor(deltas, device=input_ids_BT.device).unsqueeze(1)
