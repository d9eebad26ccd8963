"""VL-SFT batches: multimodal chatml files -> each rank's micro-batches of every optimizer step, and the eval batches.

Same face as the text stages' `TrainData` (`steps_per_epoch`, `global_batch`, `micro_batches(step, rank)`,
`stats`), so the trainer's loop does not know which family it trains. Samples are encoded when their step comes
(images processed as at inference), one sample per right-padded row.
"""

from __future__ import annotations

import random

import torch

from ..config import ConfigError, TrainConfig, split_list
from .readers import ReadStats
from .vl_sft import VLEncoder, collate_vl, read_vl_records


class VLTrainData:
    def __init__(self, cfg: TrainConfig, encoder: VLEncoder, pad_id: int, world_size: int):
        self.cfg = cfg
        self.encoder = encoder
        self.pad_id = pad_id
        self.stats = ReadStats()
        self.sources = [read_vl_records(path, cfg.skip_bad_lines, self.stats) for path in split_list(cfg.train_dataset_path)]
        self.records = [r for source in self.sources for r in source]
        self.rank_batch = cfg.batch_size * cfg.gradient_accumulation_steps
        self.global_batch = self.rank_batch * world_size
        per_epoch = len(self.sample_order(0))
        if per_epoch < self.global_batch:
            raise ConfigError(f"config: batch_size: {per_epoch} VL-SFT samples per epoch are fewer than one step's "
                              f"batch_size x gradient_accumulation_steps x processes = {self.global_batch}")
        self.steps_per_epoch = max(1, per_epoch // self.global_batch)

    def sample_order(self, epoch: int) -> list[int]:
        """Indices into `records` for one epoch. Files are concatenated (each sample once), or with
        `train_dataset_prob` mixed as in the text stages: file i gives round(p_i x all samples) draws, cycling
        through its own shuffles, and the mix is shuffled. Seeded by seed and epoch (resume needs only the step)."""
        if not self.cfg.train_dataset_prob or len(self.sources) == 1:
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            return torch.randperm(len(self.records), generator=g).tolist()
        rng = random.Random(self.cfg.seed * 1000003 + epoch)
        mixed, offset = [], 0
        for source, p in zip(self.sources, self.cfg.dataset_probs):
            want, draws = max(1, round(p * len(self.records))), []
            while source and len(draws) < want:
                perm = list(range(len(source)))
                rng.shuffle(perm)
                draws += perm
            mixed += [offset + i for i in draws[:want]]
            offset += len(source)
        rng.shuffle(mixed)
        return mixed

    def micro_batches(self, step: int, rank: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of step k's global batch, the next of a per-epoch shuffle (a partial tail is dropped)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + rank * self.rank_batch
        order = self.sample_order(epoch)[start : start + self.rank_batch]
        bs = self.cfg.batch_size
        return [collate_vl([self.encoder.encode(self.records[i]) for i in order[j : j + bs]], self.pad_id)
                for j in range(0, len(order), bs)]


class VLEvalData:
    """Every eval record once, in file order, `batch_size` per batch (the trainer deals batches to ranks)."""

    def __init__(self, cfg: TrainConfig, encoder: VLEncoder, pad_id: int):
        records = [r for path in split_list(cfg.eval_dataset_path) for r in read_vl_records(path)]
        self.encoder, self.pad_id = encoder, pad_id
        self.batches = [records[i : i + cfg.batch_size] for i in range(0, len(records), cfg.batch_size)]

    def collate(self, records: list) -> dict[str, torch.Tensor]:
        return collate_vl([self.encoder.encode(r) for r in records], self.pad_id)
