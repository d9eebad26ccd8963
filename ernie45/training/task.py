"""What `Trainer`'s loop asks of a training task (data + objective), and which task a config's stage runs.

The loop (trainer.py) is family-blind: load the checkpoint, LoRA, parallelise, then per step micro-batches ->
normalisers -> loss / backward -> optimizer -> bias update, eval and checkpoints. A task supplies the rest:
`TextTask` (text_task.py: PT, SFT, DPO) and `VLSFTTask` (vl_task.py: VL-SFT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from .config import TrainConfig


class TrainData(Protocol):
    steps_per_epoch: int
    global_batch: int
    """Samples (sequences) per optimizer step over every rank."""
    stats: Any
    """`ReadStats` of the train files (lines read, lines skipped)."""

    def micro_batches(self, step: int, rank: int) -> list[dict[str, torch.Tensor]]: ...


class Task(Protocol):
    """Built after the model is loaded, transformed and given LoRA adapters."""

    module: nn.Module
    """The single-device training forward (wraps the model), before DDP / FSDP."""
    decoder_layers: nn.ModuleList
    """The layers `recompute` checkpoints."""
    data: TrainData
    eval_data: Any | None
    """None when the run has no eval."""

    @staticmethod
    def check_model(spec, source) -> None:
        """ConfigError when the checkpoint's family (`models.registry.ModelSpec`) is not one this task trains."""

    @staticmethod
    def prepare_model(base: nn.Module, cfg: TrainConfig) -> None:
        """Changes to the loaded model before LoRA (QAT's fake quantization; freezing the vision tower)."""

    def parallelize(self, module: nn.Module) -> nn.Module:
        """`module` on several processes (DDP or FSDP2)."""

    def bind(self, module: nn.Module, n_micro: int) -> None:
        """Build the objective over the (possibly wrapped) module; `n_micro` micro-batches per step over all ranks."""

    def normalisers(self, micro: list[dict]) -> dict[str, float]:
        """This rank's share of the step's loss denominators (the trainer sums them over ranks)."""

    def new_usage(self) -> Any | None:
        """Expert-usage accumulators for the aux-free bias update, or None when it is off."""

    def loss(self, batch: dict, denom: dict, usage) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss (already divided by the step's global denominators) and its metrics."""

    def update_biases(self, usage) -> None:
        """After the optimizer step: usage summed over ranks, correction biases nudged."""

    def step_metrics(self, denom: dict) -> dict[str, float]:
        """Counts logged with the step (`tokens`: input tokens, for tokens/s)."""

    def evaluate(self, autocast: Callable) -> dict:
        """Eval metrics summed over ranks (called under no_grad with the module in eval mode)."""


def task_for(cfg: TrainConfig) -> type:
    """The task class of `cfg.stage`: VL-SFT for VL models, every other stage for text models."""
    if cfg.stage == "VL-SFT":
        from .vl_task import VLSFTTask  # media processing needs pillow (the `vl` extra): imported only here

        return VLSFTTask
    from .text_task import TextTask

    return TextTask
