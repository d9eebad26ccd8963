"""The text stages as a training task (PT, SFT, DPO; Full, LoRA or QAT; with MTP and the MoE router terms): the
training forward, the data, the objective, the aux-free bias update and eval, for `Trainer`'s loop."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..quant.qat import prepare_qat
from . import distributed as D
from .config import ConfigError, TrainConfig, split_list
from .data import Encoder, EvalData, TrainData
from .forward import TrainingModel, moe_blocks
from .lora import adapters_disabled
from .losses import update_correction_bias
from .objectives import Objective, counts

_EVAL_KEYS = ("lm_loss", "mtp_loss", "dpo_loss", "sft_loss", "rewards_chosen", "rewards_rejected", "rewards_margin",
              "rewards_accuracy")


def prepare_qat_for(model: nn.Module, cfg: TrainConfig) -> None:
    """Fake-quantize the configured linears of `model` (ernie45.quant.qat)."""
    prepare_qat(model, cfg.qat_bits, cfg.qat_group_size or None, split_list(cfg.qat_targets))


class TextTask:
    """PT / SFT / DPO of a text model (dense or MoE, optional MTP)."""

    @staticmethod
    def check_model(spec, source) -> None:
        if spec.is_multimodal:
            raise ConfigError(f"config: stage: {source} holds an ERNIE 4.5 VL checkpoint; the text stages (PT, SFT, "
                              f"DPO) train text models; use stage VL-SFT")

    @staticmethod
    def prepare_model(base: nn.Module, cfg: TrainConfig) -> None:
        """Before LoRA: QAT's fake quantization."""
        if cfg.qat:
            prepare_qat_for(base, cfg)

    def __init__(self, cfg: TrainConfig, base: nn.Module, info: D.DistInfo, tokenizer, lora: bool):
        self.cfg, self.info, self.base = cfg, info, base
        self.reference, self.reference_ctx = None, None
        if cfg.stage == "DPO" and not cfg.reference_free:
            if lora:
                self.reference_ctx = lambda: adapters_disabled(base)
            else:
                self.reference = TrainingModel(copy.deepcopy(base).eval().requires_grad_(False))
        orth = cfg.moe_group_orthogonal_loss if cfg.moe_orthogonal_loss_lambda else None
        self.module = TrainingModel(base, mtp=cfg.multi_token_pred_lambda > 0 and cfg.stage != "DPO",
                                    orthogonal_group=orth)
        self.mtp_depths = base.model.num_mtp_layers if self.module.mtp else 0
        self.decoder_layers = base.model.layers
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        encoder = Encoder(tokenizer, cfg.max_seq_len, cfg.max_prompt_len)
        self.data = TrainData(cfg, encoder, pad_id, info.world_size)
        self.eval_data = EvalData(cfg, encoder, pad_id) if cfg.eval_dataset_path and cfg.do_eval else None
        self.blocks = moe_blocks(base)
        self.objective: Objective | None = None

    def parallelize(self, module: nn.Module) -> nn.Module:
        return D.apply_fsdp(module, self.info) if self.cfg.fsdp else D.apply_ddp(module, self.info)

    def bind(self, module: nn.Module, n_micro: int) -> None:
        """The objective over the (possibly wrapped) training module."""
        self.objective = Objective(self.cfg, module, self.base, n_micro, self.reference, self.reference_ctx,
                                   self.mtp_depths)

    # ---- one optimizer step
    def normalisers(self, micro: list[dict]) -> dict[str, float]:
        """This rank's share of the step's loss denominators (summed over ranks by the trainer)."""
        denom: dict[str, float] = {}
        for b in micro:
            for k, v in counts(b, self.cfg, self.mtp_depths).items():
                denom[k] = denom.get(k, 0.0) + v
        return denom

    def new_usage(self) -> list[torch.Tensor] | None:
        if not (self.cfg.moe_use_aux_free and self.blocks):
            return None
        return [torch.zeros(b.gate.weight.shape[0], device=self.info.device) for b in self.blocks]

    def loss(self, batch: dict, denom: dict, usage) -> tuple[torch.Tensor, dict]:
        return self.objective(batch, denom, usage)

    def update_biases(self, usage: list[torch.Tensor]) -> None:
        for block, u in zip(self.blocks, usage):
            D.all_reduce_sum(u, self.info)
            update_correction_bias(block.moe_statics.e_score_correction_bias.data, u,
                                   self.cfg.moe_use_aux_free_update_coef)

    def step_metrics(self, denom: dict) -> dict[str, float]:
        return {"tokens": denom["input_tokens"]}

    # ---- eval
    def evaluate(self, autocast) -> dict:
        """Mean eval loss over every eval target (pairs for DPO), perplexity for PT/SFT. Every rank runs the same
        number of forwards (FSDP needs that); filler batches carry weight 0."""
        info = self.info
        batches = self.eval_data.batches
        totals: dict[str, float] = {}
        for i in range(math.ceil(len(batches) / info.world_size)):
            idx = info.rank + i * info.world_size
            b = self.eval_data.collate(batches[idx if idx < len(batches) else 0])
            b = {k: v.to(info.device) for k, v in b.items()}
            denom = counts(b, self.cfg, self.mtp_depths)
            weight = 0.0 if idx >= len(batches) else denom["pairs"] if "pairs" in denom else denom["tokens"]
            with autocast():
                _, metrics = self.objective(b, denom)
            for k in _EVAL_KEYS:
                if k in metrics:
                    totals[k] = totals.get(k, 0.0) + metrics[k] * weight
            totals["_weight"] = totals.get("_weight", 0.0) + weight
        totals = D.reduce_dict(totals, info)
        weight = totals.pop("_weight", 0.0)
        out = {k: v / weight for k, v in totals.items()} if weight else {}
        if "lm_loss" in out:
            out["loss"] = out["lm_loss"]
            out["ppl"] = math.exp(min(out["lm_loss"], 50.0))
        elif "dpo_loss" in out:
            out["loss"] = out["dpo_loss"]
        return out
