"""VL-SFT as a training task: an ERNIE 4.5 VL checkpoint fine-tuned (full or LoRA) on multimodal chatml data, with
the MoE router terms and the aux-free bias update per modality, for `Trainer`'s loop.

`freeze_vision` keeps the vision tower fixed. On several processes the model is replicated (DDP): a micro-batch
without images leaves the vision experts without gradient, so DDP looks for unused parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..processing import load_processors
from . import distributed as D
from .config import ConfigError, TrainConfig
from .data.vl_dataset import VLEvalData, VLTrainData
from .data.vl_sft import VLEncoder
from .losses import IGNORE, update_correction_bias
from .vl_objective import MODALITIES, VLObjective, VLTrainingModel, vl_targets


class VLSFTTask:
    """Stage VL-SFT of a VL model."""

    @staticmethod
    def check_model(spec, source) -> None:
        if not spec.is_multimodal:
            raise ConfigError(f"config: model_name_or_path: stage VL-SFT needs an ERNIE 4.5 VL checkpoint "
                              f"(model_type ernie4_5_vl_moe); {source} holds a {spec.family} model")

    @staticmethod
    def prepare_model(base: nn.Module, cfg: TrainConfig) -> None:
        if cfg.freeze_vision:
            base.model.vision_tower.requires_grad_(False)

    def __init__(self, cfg: TrainConfig, base: nn.Module, info: D.DistInfo, tokenizer, lora: bool):
        self.cfg, self.info = cfg, info
        orth = cfg.moe_group_orthogonal_loss if cfg.moe_orthogonal_loss_lambda else None
        self.module = VLTrainingModel(base, orthogonal_group=orth)
        self.eval_objective = VLObjective(cfg, self.module, 1)  # the unwrapped module: no DDP hooks in eval
        self.blocks = self.module.blocks
        self.decoder_layers = base.model.language_model.layers
        image_processor, video_processor = load_processors(base.source_dir)
        encoder = VLEncoder(tokenizer, base.config, image_processor, video_processor, cfg.max_seq_len)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.data = VLTrainData(cfg, encoder, pad_id, info.world_size)
        eval_data = VLEvalData(cfg, encoder, pad_id) if cfg.eval_dataset_path and cfg.do_eval else None
        self.eval_data = eval_data if eval_data is not None and eval_data.batches else None
        if cfg.packing and info.is_main:
            print("VL-SFT: each sample gets its own (right-padded) row; packing does not apply")
        self.objective: VLObjective | None = None

    def parallelize(self, module: nn.Module) -> nn.Module:
        if self.cfg.fsdp and self.info.is_main:
            print("VL-SFT on several processes: DDP (every rank holds the whole model; FSDP sharding is not "
                  "implemented for VL models)")
        return D.apply_ddp(module, self.info, find_unused_parameters=True)

    def bind(self, module: nn.Module, n_micro: int) -> None:
        self.objective = VLObjective(self.cfg, module, n_micro)

    # ---- one optimizer step
    def normalisers(self, micro: list[dict]) -> dict[str, float]:
        return {"targets": sum(float((vl_targets(b) != IGNORE).sum()) for b in micro),
                "tokens": float(sum(int((b["segment_ids"] >= 0).sum()) for b in micro))}

    def new_usage(self) -> list[dict[str, torch.Tensor]] | None:
        if not (self.cfg.moe_use_aux_free and self.blocks):
            return None
        return [{m: torch.zeros(b.text_moe.gate.weight.shape[0], device=self.info.device) for m in MODALITIES}
                for b in self.blocks]

    def loss(self, batch: dict, denom: dict, usage) -> tuple[torch.Tensor, dict]:
        return self.objective(batch, denom["targets"], usage)

    def update_biases(self, usage: list[dict[str, torch.Tensor]]) -> None:
        for block, u in zip(self.blocks, usage):
            for modality, moe in (("text", block.text_moe), ("vision", block.vision_moe)):
                D.all_reduce_sum(u[modality], self.info)
                if bool(u[modality].any()):
                    update_correction_bias(moe.moe_statics.e_score_correction_bias.data, u[modality],
                                           self.cfg.moe_use_aux_free_update_coef)

    def step_metrics(self, denom: dict) -> dict[str, float]:
        return dict(denom)

    # ---- eval
    def evaluate(self, autocast) -> dict:
        """Mean loss over every assistant token of the eval data, and its perplexity. Ranks split the batches (in
        order) and the sums are added over ranks."""
        info = self.info
        nll, targets = 0.0, 0.0
        for records in self.eval_data.batches[info.rank :: info.world_size]:
            batch = {k: v.to(info.device) for k, v in self.eval_data.collate(records).items()}
            n = float((vl_targets(batch) != IGNORE).sum())
            with autocast():
                _, metrics = self.eval_objective(batch, n)
            nll, targets = nll + metrics["lm_loss"] * n, targets + n
        totals = D.reduce_dict({"nll": nll, "targets": targets}, info)
        loss = totals["nll"] / max(totals["targets"], 1.0)
        return {"loss": loss, "lm_loss": loss, "ppl": math.exp(min(loss, 50.0)), "targets": totals["targets"]}
