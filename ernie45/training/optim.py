"""AdamW with ERNIE's parameter groups (no decay on norms/biases, router at `moe_gate_lr_ratio` x lr) and the
learning-rate schedules (linear, cosine, WSD, constant; all after a linear warmup)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    decay, no_decay, gate = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(("mlp.gate.weight", "_moe.gate.weight")):  # text MoE; VL text_moe / vision_moe
            gate.append(p)
        elif p.ndim < 2 or "norm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.learning_rate, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.learning_rate, "name": "no_decay"}]
    if gate:
        ratio = 1.0 if cfg.moe_gate_lr_ratio is None else cfg.moe_gate_lr_ratio
        groups.append({"params": gate, "weight_decay": cfg.weight_decay, "lr": cfg.learning_rate * ratio, "name": "gate"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    params = [p for group in groups for p in group["params"]]
    # The fused kernel updates each tensor in one pass: 0.13-0.23 s a step for the 0.3B shape's parameters on this
    # CPU against 1.5-1.7 s for the per-tensor loop (foreach: 1.95 s). FSDP2's DTensor shards keep the loop.
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, **({"fused": True} if fused else {"foreach": False}))


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based: the lr used BY that step)."""
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    floor = cfg.min_lr / cfg.learning_rate if cfg.learning_rate else 0.0
    kind = cfg.lr_scheduler_type
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay = cfg.decay_steps or max(1, total_steps // 10)
        start = max(warm, total_steps - decay)
        if step < start:
            return 1.0
        frac = min(1.0, (step - start + 1) / max(1, total_steps - start))
        return 1.0 - (1.0 - floor) * frac
    frac = min(1.0, (step - warm) / max(1, total_steps - warm))
    if kind == "linear":
        return 1.0 - (1.0 - floor) * frac
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def optimizer_step(params, optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float) -> tuple[float, float]:
    """Clip (when max_grad_norm > 0), step the optimizer and the schedule, clear the gradients; returns the
    (lr used by this step, gradient norm before clipping or NaN when not clipped)."""
    grad_norm = float("nan")
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm
