"""ERNIE 4.5 mixture-of-experts block: fp32 softmax router with a selection-only correction bias, routed experts
grouped by expert (one matmul pair per active expert, never a loop over tokens) and optional shared experts.

`Experts.forward(x, topk_ids, topk_weights, shared)` is the one seam through which the routed tokens reach the
experts (an expert-parallel version replaces that module: dispatch to the ranks holding the experts, combine
back). On the CPU without autograd, up to `KERNEL_MAX_TOKENS` tokens (decode) run in one C call with the shared
experts fused in (kernels/moe_experts.c: every active expert's weights read once, by both threads); more tokens
(prefill) run the grouped torch path: tokens sorted by expert, one GEMM pair per active expert, index_add_ back.

Legend: N tokens (flattened), H hidden, E experts, K experts per token, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_state  # the global forward hooks live here

from ..kernels import moe_experts
from .config import Ernie45Config
from .layers import Linear, SwiGLU, linear, silu_mul

KERNEL_MAX_TOKENS = 64
"""Most tokens the C experts kernel takes. 0.3B-like MoE (32 experts top-6 x 512 + 2 shared, H 1024), Zen 5,
2 threads, A/B in one process: 1.7x the grouped torch path at 1 token, 1.1-1.4x at 2-64 tokens, about even at
128-256 (where GEMMs start to win: each expert then has 24+ rows)."""


class MoeStatics(nn.Module):
    """Holds the expert-score correction bias [1, E] (released name `mlp.moe_statics.e_score_correction_bias`).

    It is a parameter without gradient: the aux-loss-free balancing updates it in place between steps.
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts, dtype=torch.float32), requires_grad=False)


class Router(nn.Module):
    """Top-k gate: softmax(x W^T) in fp32; the bias changes WHICH experts win, never their weights."""

    def __init__(self, config: Ernie45Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.moe_num_experts, config.hidden_size, dtype=torch.float32))
        self.top_k = config.moe_k
        self.norm_min = config.moe_norm_min

    def forward(
        self, x_NH: torch.Tensor, correction_bias_1E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (router logits [N, E] fp32, routing weights [N, K] in x's dtype, expert ids [N, K])."""
        with torch.autocast(device_type=x_NH.device.type, enabled=False):
            logits_NE = F.linear(x_NH.float(), self.weight.float())
            probs_NE = logits_NE.softmax(dim=-1)
            _, idx_NK = torch.topk(probs_NE + correction_bias_1E.float(), self.top_k, dim=-1)
            w_NK = probs_NE.gather(-1, idx_NK)
            w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)
        return logits_NE, w_NK.to(x_NH.dtype), idx_NK


class Experts(nn.Module):
    """E SwiGLU experts stored stacked (transformers' fused layout): gate_up_proj [E, 2I, H] (gate rows first),
    down_proj [E, H, I]. Stacking lets the grouped forward slice one expert's weights without copies."""

    def __init__(self, config: Ernie45Config, intermediate_size: int | None = None):
        super().__init__()
        E, H = config.moe_num_experts, config.hidden_size
        I = config.moe_intermediate_size if intermediate_size is None else intermediate_size
        self.num_experts = E
        self.intermediate_size = I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def expert_forward(self, e: int, x_MH: torch.Tensor, weights: tuple | None = None) -> torch.Tensor:
        gate_up, down = weights if weights is not None else (self.gate_up_proj, self.down_proj)
        gate_MI, up_MI = linear(x_MH, gate_up[e]).chunk(2, dim=-1)
        return linear(silu_mul(gate_MI, up_MI), down[e])

    def unbound_weights(self) -> tuple | None:
        """Per-expert weight views for training, or None (inference indexes the stacked weights directly).

        One unbind, whose backward stacks the expert gradients once, instead of indexing per expert, whose backward
        zero-fills a full [E, ...] gradient for every expert (E^2 memory traffic)."""
        if not (self.gate_up_proj.requires_grad or self.down_proj.requires_grad):
            return None
        return self.gate_up_proj.unbind(0), self.down_proj.unbind(0)

    def forward(
        self, x_NH: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, shared: nn.Module | None = None
    ) -> torch.Tensor:
        """sum_k w[n, k] * expert_{idx[n, k]}(x[n]) (+ shared(x[n]) when given) [N, H]: the dispatch seam."""
        if x_NH.shape[0] <= KERNEL_MAX_TOKENS and self._takes_kernel(x_NH):
            fused = _shared_weights(shared)
            y_NH = moe_experts.experts(x_NH, idx_NK, w_NK, self.gate_up_proj, self.down_proj, fused)
            if y_NH is not None:
                return y_NH if shared is None or fused is not None else y_NH + shared(x_NH)
        y_NH = self.grouped_forward(x_NH, idx_NK, w_NK)
        return y_NH if shared is None else y_NH + shared(x_NH)

    def _takes_kernel(self, x_NH: torch.Tensor) -> bool:
        """Plain experts (subclasses such as LoRA's or the quantized ones compute differently), CPU, no autograd."""
        return (type(self).expert_forward is Experts.expert_forward and x_NH.is_cpu
                and not (torch.is_grad_enabled() and (x_NH.requires_grad or self.gate_up_proj.requires_grad
                                                      or self.down_proj.requires_grad)))  # fmt: skip

    def grouped_forward(self, x_NH: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """The routed sum in torch: assignments sorted by expert, one matmul pair per active expert."""
        N, K = idx_NK.shape
        flat_expert = idx_NK.reshape(-1)
        order = flat_expert.argsort(stable=True)  # assignments grouped by expert
        token_of = order // K  # token index of each sorted assignment
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        w_sorted = w_NK.reshape(-1)[order, None]
        out_NH = torch.zeros_like(x_NH)
        weights = self.unbound_weights() if torch.is_grad_enabled() else None
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start : start + count]
            y = self.expert_forward(e, x_NH[tokens], weights) * w_sorted[start : start + count]
            out_NH.index_add_(0, tokens, y)
            start += count
        return out_NH


def _shared_weights(shared: nn.Module | None) -> tuple | None:
    """The shared experts' (gate, up, down, biases) for the C kernel, or None where it must be called as a module:
    a SwiGLU of plain `Linear`s without hooks (quantized or LoRA-wrapped linears, calibration hooks run as modules)."""
    if type(shared) is not SwiGLU or _module_state._global_forward_hooks or _module_state._global_forward_pre_hooks:
        return None
    linears = (shared.gate_proj, shared.up_proj, shared.down_proj)
    if any(type(m) is not Linear or m._forward_hooks or m._forward_pre_hooks for m in (shared, *linears)):
        return None
    return tuple(m.weight for m in linears) + tuple(m.bias for m in linears)


class MoeBlock(nn.Module):
    """shared(x) + sum_k w_k * expert_k(x), per token. `intermediate_size` overrides the experts' width and
    `shared=False` leaves the shared experts out (the per-modality halves of `ModalityMoeBlock`)."""

    def __init__(self, config: Ernie45Config, intermediate_size: int | None = None, shared: bool = True):
        super().__init__()
        self.gate = Router(config)
        self.moe_statics = MoeStatics(config.moe_num_experts)
        self.experts = Experts(config, intermediate_size)
        self.shared_experts = None
        if shared and config.moe_num_shared_experts > 0:
            width = config.moe_intermediate_size * config.moe_num_shared_experts
            self.shared_experts = SwiGLU(config.hidden_size, width, bias=config.use_bias)

    def forward(
        self, x_BTH: torch.Tensor, router_logits: list[torch.Tensor] | None = None, shared: nn.Module | None = None
    ) -> torch.Tensor:
        """`shared` stands in for absent shared experts (the VL block's, added in the same experts call)."""
        x_NH = x_BTH.reshape(-1, x_BTH.shape[-1])
        logits_NE, w_NK, idx_NK = self.gate(x_NH, self.moe_statics.e_score_correction_bias)
        if router_logits is not None:
            router_logits.append(logits_NE)
        shared = self.shared_experts if self.shared_experts is not None else shared
        return self.experts(x_NH, idx_NK, w_NK, shared).view_as(x_BTH)


class ModalityMoeBlock(nn.Module):
    """ERNIE 4.5 VL's modality-isolated MoE: text tokens go through the text gate, correction-bias row and experts,
    vision tokens (image/video placeholders and their start/end tokens) through the vision ones; the shared experts
    (width: the text expert width times their count) see every token."""

    def __init__(self, config: Ernie45Config, vision_intermediate_size: int):
        super().__init__()
        self.text_moe = MoeBlock(config, shared=False)
        self.vision_moe = MoeBlock(config, intermediate_size=vision_intermediate_size, shared=False)
        self.shared_experts = None
        if config.moe_num_shared_experts > 0:
            width = config.moe_intermediate_size * config.moe_num_shared_experts
            self.shared_experts = SwiGLU(config.hidden_size, width, bias=config.use_bias)

    def forward(
        self,
        x_BTH: torch.Tensor,
        token_types_BT: torch.Tensor | None = None,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """token_types [B, T]: 0 text, non-zero vision; None means all text (decode steps)."""
        x_NH = x_BTH.reshape(-1, x_BTH.shape[-1])
        vision_N = None if token_types_BT is None else token_types_BT.reshape(-1).to(x_NH.device) != 0
        if vision_N is None or not bool(vision_N.any()):
            return self.text_moe(x_NH, router_logits, shared=self.shared_experts).view_as(x_BTH)
        y_NH = torch.empty_like(x_NH)
        y_NH[~vision_N] = self.text_moe(x_NH[~vision_N], router_logits)
        y_NH[vision_N] = self.vision_moe(x_NH[vision_N], router_logits)
        if self.shared_experts is not None:
            y_NH = y_NH + self.shared_experts(x_NH)
        return y_NH.view_as(x_BTH)
