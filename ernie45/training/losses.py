"""Training losses, each a plain function of tensors so it can be checked against a hand computation.

Causal-LM cross-entropy (optionally token-balanced), the ERNIE MoE router losses (aux load-balance, z-loss,
orthogonal), the aux-loss-free correction-bias update, the MTP loss targets and DPO (sigmoid / IPO, reference-free,
SFT term). Legend: B rows, T tokens, V vocab, N routed tokens, E experts, H hidden, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import cross_entropy as cross_entropy_kernel

IGNORE = -100


def shifted_targets(input_ids_BT: torch.Tensor, loss_mask_BT: torch.Tensor, segment_ids_BT: torch.Tensor,
                    k: int = 1) -> torch.Tensor:
    """targets[b, t] = input_ids[b, t+k] when that token is a loss target of the same sample, else IGNORE.

    k=1 is next-token prediction; k=2 is the first MTP depth (hidden at t plus token t+1 predict t+2)."""
    T = input_ids_BT.shape[1]
    out = torch.full_like(input_ids_BT, IGNORE)
    if T <= k:
        return out
    ok = loss_mask_BT[:, k:] & (segment_ids_BT[:, k:] == segment_ids_BT[:, :-k])
    out[:, :-k] = torch.where(ok, input_ids_BT[:, k:], torch.full_like(input_ids_BT[:, k:], IGNORE))
    return out


def token_cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, consume_logits: bool = False
                        ) -> torch.Tensor:
    """Per-token CE in fp32, shaped like the targets ([B, T], or [M] for gathered rows); 0 where IGNORE.

    `consume_logits=True` (for callers that drop the logits after the loss): on CPU fp32/bf16 the C kernel
    computes the loss and, in the backward, writes the gradient over the logits instead of allocating, filling
    and reading four more [M, V] tensors; the logits' contents are undefined after the backward."""
    V = logits_BTV.shape[-1]
    logits_MV, targets_M = logits_BTV.reshape(-1, V), targets_BT.reshape(-1)
    if consume_logits and cross_entropy_kernel.takes(logits_MV, targets_M):
        return _LogitsConsumingCrossEntropy.apply(logits_MV, targets_M).view_as(targets_BT)
    return F.cross_entropy(logits_MV.float(), targets_M, ignore_index=IGNORE, reduction="none").view_as(targets_BT)


class _LogitsConsumingCrossEntropy(torch.autograd.Function):
    """Per-token CE whose backward turns the saved logits into their own gradient (kernels/cross_entropy.c)."""

    @staticmethod
    def forward(ctx, logits_MV: torch.Tensor, targets_M: torch.Tensor) -> torch.Tensor:
        loss_M, lse_M = cross_entropy_kernel.forward(logits_MV, targets_M, IGNORE)
        ctx.save_for_backward(logits_MV, targets_M, lse_M)
        ctx.consumed = False
        return loss_M

    @staticmethod
    def backward(ctx, grad_M: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.consumed:
            raise RuntimeError("token_cross_entropy(consume_logits=True) already wrote its gradient over the logits: "
                               "it cannot run backward twice (use consume_logits=False with retain_graph)")
        ctx.consumed = True
        logits_MV, targets_M, lse_M = ctx.saved_tensors
        cross_entropy_kernel.backward_(logits_MV, targets_M, IGNORE, lse_M, grad_M)
        return logits_MV, None


def token_balanced(loss_sum: torch.Tensor, fixed_denominator: float, mean: torch.Tensor) -> torch.Tensor:
    """Value = `mean`, gradient = that of loss_sum / fixed_denominator (every token weighs the same whatever the
    batch mix): l - l.detach() + mean.detach()."""
    scaled = loss_sum / fixed_denominator
    return scaled - scaled.detach() + mean.detach()


def moe_aux_loss(router_logits_NE: torch.Tensor, top_k: int, token_mask_N: torch.Tensor | None = None,
                 correction_bias_1E: torch.Tensor | None = None) -> torch.Tensor:
    """Load balance: E * sum_e mean_tok(p_e) * (count_e / N), counts from the top-k selection, detached."""
    if token_mask_N is not None:
        router_logits_NE = router_logits_NE[token_mask_N]
    N, E = router_logits_NE.shape
    probs = router_logits_NE.float().softmax(-1)
    select = probs.detach() + (correction_bias_1E.float() if correction_bias_1E is not None else 0.0)
    idx_NK = select.topk(top_k, dim=-1).indices
    counts_E = torch.zeros(E, device=probs.device).scatter_add_(0, idx_NK.flatten(), torch.ones(idx_NK.numel(), device=probs.device))
    return E * (probs.mean(0) * (counts_E / max(N, 1))).sum()


def moe_z_loss(router_logits_NE: torch.Tensor, token_mask_N: torch.Tensor | None = None) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2."""
    if token_mask_N is not None:
        router_logits_NE = router_logits_NE[token_mask_N]
    return router_logits_NE.float().logsumexp(-1).pow(2).mean()


def orthogonal_loss(gate_weight_EH: torch.Tensor, top_k: int = 1, group: bool = False) -> torch.Tensor:
    """||Wn Wn^T - I||_F^2 / numel, Wn = rows of W L2-normalised (eps 1e-12); group: W as [k, E/k, H] first."""
    W = F.normalize(gate_weight_EH.float(), dim=-1, eps=1e-12)
    E, H = W.shape
    W = W.view(top_k, E // top_k, H) if group else W.unsqueeze(0)
    gram = W @ W.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], device=W.device).expand_as(gram)
    diff = gram - eye
    return diff.pow(2).sum() / diff.numel()


def expert_usage(router_logits_NE: torch.Tensor, correction_bias_1E: torch.Tensor, top_k: int,
                 token_mask_N: torch.Tensor | None = None) -> torch.Tensor:
    """How many tokens each expert received [E] (the router's own selection, bias included)."""
    if token_mask_N is not None:
        router_logits_NE = router_logits_NE[token_mask_N]
    probs = router_logits_NE.detach().float().softmax(-1)
    idx = (probs + correction_bias_1E.float()).topk(top_k, dim=-1).indices
    return torch.bincount(idx.flatten(), minlength=probs.shape[-1]).float()


@torch.no_grad()
def update_correction_bias(bias_1E: torch.Tensor, usage_E: torch.Tensor, coef: float) -> None:
    """Aux-loss-free balancing: b += coef * sign(mean(usage) - usage) (under-used experts become likelier)."""
    bias_1E += coef * torch.sign(usage_E.mean() - usage_E).to(bias_1E.dtype).view_as(bias_1E)


def sequence_logps(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, consume_logits: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs per row [B], number of targets per row [B]); `consume_logits` as in
    `token_cross_entropy`."""
    ce = token_cross_entropy(logits_BTV, targets_BT, consume_logits)
    return -ce.sum(-1), (targets_BT != IGNORE).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    """Per-pair DPO loss [P] and its rewards. sigmoid: -log sigmoid(beta * margin); ipo: (margin - 1/(2 beta))^2,
    margin = (pi_c - ref_c) - (pi_r - ref_r). Callers pass length-normalised log-probs for IPO."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r} is not one of sigmoid, ipo")
    chosen_r = beta * (policy_chosen - ref_chosen).detach()
    rejected_r = beta * (policy_rejected - ref_rejected).detach()
    stats = {"rewards_chosen": chosen_r, "rewards_rejected": rejected_r, "rewards_margin": chosen_r - rejected_r,
             "rewards_accuracy": (chosen_r > rejected_r).float()}
    return losses, stats
