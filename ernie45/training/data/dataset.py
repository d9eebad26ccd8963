"""Training and eval data: read + encode every file once, mix by probability per epoch, pack, and serve the
micro-batches of any optimizer step deterministically (the data position of a checkpoint is its step).

Global step s uses the units [s*G, (s+1)*G) of its epoch's order (G = batch_size x world x accumulation);
micro-batch m of rank r takes the slice starting at (m*world + r)*batch_size, so 1 process with batch B*N sees
the same sequences per step as N processes with batch B.
"""

from __future__ import annotations

import random

from ..config import TrainConfig, split_list
from .encode import Encoder, PairSample
from .packing import collate, collate_pairs, pack
from .readers import ReadStats, read_records


def load_units(paths: list[str], types: list[str], stage: str, encoder: Encoder, skip_bad_lines: bool,
               stats: ReadStats) -> list[list]:
    """Per file: its encoded samples (Sample for PT/SFT, PairSample for DPO)."""
    sources = []
    for path, fmt in zip(paths, types):
        units = []
        for where, record in read_records(path, fmt, stage, skip_bad_lines, stats):
            try:
                units += encoder.encode(record)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        if not units:
            raise ValueError(f"{path}: no usable samples (empty, all skipped, or no assistant tokens to train on)")
        sources.append(units)
    return sources


class TrainData:
    def __init__(self, cfg: TrainConfig, encoder: Encoder, pad_id: int, world_size: int):
        self.cfg = cfg
        self.pad_id = pad_id
        self.world = world_size
        self.stats = ReadStats()
        if not split_list(cfg.train_dataset_path):
            raise ValueError("train_dataset_path: required for training (comma-separated data files)")
        self.sources = load_units(split_list(cfg.train_dataset_path), cfg.dataset_types, cfg.stage, encoder,
                                  cfg.skip_bad_lines, self.stats)
        self.probs = cfg.dataset_probs
        self.global_batch = cfg.batch_size * world_size * cfg.gradient_accumulation_steps
        self._epoch_cache: tuple[int, list] | None = None
        self.steps_per_epoch = len(self.epoch_units(0)) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train data: {len(self.epoch_units(0))} sequences per epoch is less than one global batch "
                f"({cfg.batch_size} batch_size x {world_size} processes x {cfg.gradient_accumulation_steps} accumulation)"
            )

    @property
    def is_pairs(self) -> bool:
        return isinstance(self.sources[0][0], PairSample)

    def epoch_units(self, epoch: int) -> list:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(self.cfg.seed * 1000003 + epoch)
        total = sum(len(s) for s in self.sources)
        mixed = []
        for src, p in zip(self.sources, self.probs):
            want = len(src) if len(self.sources) == 1 else max(1, round(p * total))
            order = []
            while len(order) < want:  # cycle through the source, reshuffled each pass
                perm = list(range(len(src)))
                rng.shuffle(perm)
                order += perm
            mixed += [src[i] for i in order[:want]]
        rng.shuffle(mixed)
        units = mixed if self.is_pairs or not self.cfg.packing else pack(mixed, self.cfg.max_seq_len)
        if not self.is_pairs and not self.cfg.packing:
            units = pack_each(units, self.cfg.max_seq_len)
        # Packing gives each epoch's shuffle a slightly different number of sequences, but every epoch has
        # steps_per_epoch steps (counted on epoch 0): a short epoch wraps around to its own first sequences.
        needed = getattr(self, "steps_per_epoch", 0) * self.global_batch
        if units and len(units) < needed:
            units = units + [units[i % len(units)] for i in range(needed - len(units))]
        self._epoch_cache = (epoch, units)
        return units

    def micro_batches(self, step: int, rank: int) -> list[dict]:
        """This rank's gradient_accumulation_steps micro-batches for optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        units = self.epoch_units(epoch)
        base = k * self.global_batch
        B = self.cfg.batch_size
        out = []
        for m in range(self.cfg.gradient_accumulation_steps):
            start = base + (m * self.world + rank) * B
            out.append(self.collate(units[start : start + B]))
        return out

    def collate(self, units: list) -> dict:
        return collate_pairs(units, self.pad_id) if self.is_pairs else collate(units, self.pad_id)


def pack_each(samples: list, max_seq_len: int) -> list:
    """No packing: one sample per sequence (same representation as a packed sequence of one)."""
    return [p for s in samples for p in pack([s], max_seq_len)]


class EvalData:
    """Every eval sample once, in file order, batched by batch_size (the trainer deals batches to ranks)."""

    def __init__(self, cfg: TrainConfig, encoder: Encoder, pad_id: int):
        self.stats = ReadStats()
        sources = load_units(split_list(cfg.eval_dataset_path), cfg.eval_types, cfg.stage, encoder,
                             cfg.skip_bad_lines, self.stats)
        units = [u for src in sources for u in src]
        self.is_pairs = isinstance(units[0], PairSample)
        if not self.is_pairs:
            units = pack(units, cfg.max_seq_len) if cfg.packing else pack_each(units, cfg.max_seq_len)
        B = cfg.batch_size
        self.batches = [units[i : i + B] for i in range(0, len(units), B)]
        self.pad_id = pad_id

    def collate(self, units: list) -> dict:
        return collate_pairs(units, self.pad_id) if self.is_pairs else collate(units, self.pad_id)
