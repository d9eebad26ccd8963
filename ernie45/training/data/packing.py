"""Packing samples into sequences and collating them into batch tensors.

A packed sequence holds several samples back to back; `segment_ids` tell attention where samples start (no token
attends across a boundary) and `positions` restart at 0 for each sample, so a packed sample sees exactly what it
would see alone. Legend: B rows, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encode import PairSample, Sample


@dataclass
class Packed:
    ids: list[int]
    loss_mask: list[bool]
    segment_ids: list[int]
    positions: list[int]

    @classmethod
    def single(cls, s: Sample) -> Packed:
        return cls(list(s.ids), [False] + list(s.loss_mask[1:]), [0] * len(s.ids), list(range(len(s.ids))))


def pack(samples: list[Sample], max_seq_len: int) -> list[Packed]:
    """Greedy in-order packing: a sample joins the open sequence while it fits, else opens a new one."""
    out: list[Packed] = []
    cur: Packed | None = None
    for s in samples:
        ids = s.ids[:max_seq_len]
        if cur is None or len(cur.ids) + len(ids) > max_seq_len:
            cur = Packed([], [], [], [])
            out.append(cur)
        seg = cur.segment_ids[-1] + 1 if cur.segment_ids else 0
        cur.ids += ids
        cur.loss_mask += [False] + list(s.loss_mask[1 : len(ids)])  # a sample's first token has no context
        cur.segment_ids += [seg] * len(ids)
        cur.positions += list(range(len(ids)))
    return out


def collate(rows: list[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padding is its own segment (-1) and never a target."""
    T = max(len(r.ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    seg = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n] = torch.tensor(r.ids)
        mask[b, :n] = torch.tensor(r.loss_mask)
        seg[b, :n] = torch.tensor(r.segment_ids)
        pos[b, :n] = torch.tensor(r.positions)
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def collate_pairs(pairs: list[PairSample], pad_id: int) -> dict[str, torch.Tensor]:
    """DPO: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], loss mask on response tokens only."""
    rows = []
    for which in ("chosen", "rejected"):
        for p in pairs:
            resp = getattr(p, which)
            ids = p.prompt + resp
            rows.append(Packed(ids, [False] * len(p.prompt) + [True] * len(resp), [0] * len(ids), list(range(len(ids)))))
    batch = collate(rows, pad_id)
    batch["num_pairs"] = torch.tensor(len(pairs))
    return batch
