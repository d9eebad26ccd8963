"""What one micro-batch contributes to an optimizer step, for the causal-LM stages (PT, SFT) and DPO.

Losses are normalised by GLOBAL counts (targets or pairs over every micro-batch of every rank in the step), so the
step's gradient is the same whatever the split over processes and accumulation steps. `metrics` values are
already divided the same way: summing them over micro-batches and ranks gives the step's value.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .forward import TrainingModel, moe_blocks
from .losses import (
    IGNORE,
    dpo_loss,
    expert_usage,
    moe_aux_loss,
    moe_z_loss,
    sequence_logps,
    shifted_targets,
    token_balanced,
    token_cross_entropy,
)


def counts(batch: dict, cfg: TrainConfig, mtp_depths: int) -> dict[str, float]:
    """Normalisers this micro-batch adds to the step: LM targets, MTP targets per depth, DPO pairs."""
    ids, mask, seg = batch["input_ids"], batch["loss_mask"], batch["segment_ids"]
    out = {"tokens": _f((shifted_targets(ids, mask, seg, 1) != IGNORE).sum())}
    for d in range(mtp_depths):
        out[f"mtp{d}"] = _f((shifted_targets(ids, mask, seg, d + 2) != IGNORE).sum())
    if "num_pairs" in batch:
        out["pairs"] = _f(batch["num_pairs"])
    out["input_tokens"] = _f((seg >= 0).sum())
    return out


def _f(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


class Objective:
    def __init__(self, cfg: TrainConfig, module: TrainingModel, base_model, n_micro: int, reference=None,
                 reference_ctx=None, mtp_depths: int = 0):
        self.cfg = cfg
        self.module = module
        self.base = base_model  # the unwrapped Ernie45ForCausalLM (for MoE block metadata)
        self.n_micro = n_micro  # micro-batches per step over all ranks
        self.reference = reference  # a frozen TrainingModel, or None (reference-free / LoRA with adapters off)
        self.reference_ctx = reference_ctx  # context manager that turns the policy into the reference (LoRA)
        self.blocks = moe_blocks(base_model)
        self.mtp_depths = mtp_depths  # MTP heads the module computes (0 when MTP is off)

    def _router_terms(self, out, seg, metrics: dict, usage: list | None) -> torch.Tensor:
        cfg = self.cfg
        total = torch.zeros((), device=out.logits.device)
        if not self.blocks:
            return total
        token_mask = seg.flatten() >= 0
        aux = z = 0.0
        for i, (logits_NE, block) in enumerate(zip(out.router_logits, self.blocks)):
            bias = block.moe_statics.e_score_correction_bias
            bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
            if cfg.moe_aux_loss_lambda:
                aux = aux + moe_aux_loss(logits_NE, block.gate.top_k, token_mask, bias)
            if cfg.moe_z_loss_lambda:
                z = z + moe_z_loss(logits_NE, token_mask)
            if usage is not None:
                usage[i] += expert_usage(logits_NE, bias, block.gate.top_k, token_mask)
        if cfg.moe_aux_loss_lambda:
            total = total + cfg.moe_aux_loss_lambda * aux / self.n_micro
            metrics["aux_loss"] = _f(aux) / self.n_micro
        if cfg.moe_z_loss_lambda:
            total = total + cfg.moe_z_loss_lambda * z / self.n_micro
            metrics["z_loss"] = _f(z) / self.n_micro
        if out.orthogonal is not None:
            total = total + cfg.moe_orthogonal_loss_lambda * out.orthogonal / self.n_micro
            metrics["orthogonal_loss"] = _f(out.orthogonal) / self.n_micro
        return total

    def _run(self, module, batch):
        return module(batch["input_ids"], batch["positions"], batch["segment_ids"])

    def lm(self, batch: dict, denom: dict, usage: list | None) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        ids, mask, seg = batch["input_ids"], batch["loss_mask"], batch["segment_ids"]
        targets = [shifted_targets(ids, mask, seg, 1 + d) for d in range(1 + self.mtp_depths)]
        masks = [t != IGNORE for t in targets]
        out = self.module(ids, batch["positions"], seg, masks)
        metrics: dict[str, float] = {}
        lm_sum = token_cross_entropy(out.logits, targets[0][masks[0]], consume_logits=True).sum()
        lm = lm_sum / max(denom["tokens"], 1.0)
        if cfg.token_balance_loss:
            fixed = (cfg.token_balance_seqlen or cfg.max_seq_len * cfg.batch_size) * self.n_micro
            lm = token_balanced(lm_sum, fixed, lm)
        metrics["lm_loss"] = _f(lm)
        loss = lm + self._router_terms(out, seg, metrics, usage)
        for d, mtp_logits in enumerate(out.mtp_logits):
            mtp_sum = token_cross_entropy(mtp_logits, targets[1 + d][masks[1 + d]], consume_logits=True).sum()
            mtp = mtp_sum / max(denom[f"mtp{d}"], 1.0) / len(out.mtp_logits)
            loss = loss + cfg.multi_token_pred_lambda * mtp
            metrics["mtp_loss"] = metrics.get("mtp_loss", 0.0) + _f(mtp)
        metrics["loss"] = _f(loss)
        return loss, metrics

    def dpo(self, batch: dict, denom: dict, usage: list | None) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        ids, mask, seg = batch["input_ids"], batch["loss_mask"], batch["segment_ids"]
        P = int(batch["num_pairs"])
        targets = shifted_targets(ids, mask, seg, 1)
        out = self._run(self.module, batch)
        logps, n = sequence_logps(out.logits, targets, consume_logits=True)
        ref = torch.zeros_like(logps)
        if not cfg.reference_free:
            with torch.no_grad():
                if self.reference is not None:
                    ref_out = self._run(self.reference, batch)
                else:
                    with self.reference_ctx():
                        ref_out = self._run(self.module, batch)
                ref, _ = sequence_logps(ref_out.logits, targets, consume_logits=True)
        norm = n.clamp(min=1) if cfg.loss_type == "ipo" else torch.ones_like(n)
        losses, stats = dpo_loss(logps[:P] / norm[:P], logps[P:] / norm[P:], ref[:P] / norm[:P], ref[P:] / norm[P:],
                                 cfg.beta, cfg.loss_type)
        pairs = max(denom["pairs"], 1.0)
        dpo = losses.sum() / pairs
        metrics = {"dpo_loss": _f(dpo)}
        loss = dpo
        if cfg.sft_loss_ratio:
            sft = (-logps[:P] / n[:P].clamp(min=1)).sum() / pairs
            loss = loss + cfg.sft_loss_ratio * sft
            metrics["sft_loss"] = _f(sft)
        for key, value in stats.items():
            metrics[key] = _f(value.sum()) / pairs
        metrics["logps_chosen"] = _f(logps[:P].detach().sum()) / pairs
        metrics["logps_rejected"] = _f(logps[P:].detach().sum()) / pairs
        loss = loss + self._router_terms(out, seg, metrics, usage)
        metrics["loss"] = _f(loss)
        return loss, metrics

    def __call__(self, batch: dict, denom: dict, usage: list | None = None):
        return self.dpo(batch, denom, usage) if self.cfg.stage == "DPO" else self.lm(batch, denom, usage)
