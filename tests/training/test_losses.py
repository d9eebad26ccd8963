"""Each loss term against a hand computation on a fixed batch."""

import math

import torch

from ernie45.training.losses import (
    IGNORE,
    dpo_loss,
    expert_usage,
    moe_aux_loss,
    moe_z_loss,
    orthogonal_loss,
    sequence_logps,
    shifted_targets,
    token_balanced,
    token_cross_entropy,
    update_correction_bias,
)


def test_shifted_targets_respect_mask_and_segments():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.tensor([[False, True, True, False, True]])
    seg = torch.tensor([[0, 0, 0, 1, 1]])
    assert shifted_targets(ids, mask, seg, 1).tolist() == [[6, 7, IGNORE, 9, IGNORE]]
    # k=2 (MTP): t=0 -> 7 (same sample, target); t=1 -> 8 is another sample; t=2 -> 9 other sample
    assert shifted_targets(ids, mask, seg, 2).tolist() == [[7, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_cross_entropy_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]])
    targets = torch.tensor([[1, IGNORE]])
    ce = token_cross_entropy(logits, targets)
    hand = -(2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)))
    assert torch.allclose(ce, torch.tensor([[hand, 0.0]]))
    logp, n = sequence_logps(logits, targets)
    assert n.tolist() == [1] and math.isclose(logp.item(), -hand, rel_tol=1e-6)


def test_token_balanced_value_is_mean_gradient_is_fixed_denominator():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss_sum = (x**2).sum()
    out = token_balanced(loss_sum, 10.0, loss_sum / 3)
    out.backward()
    assert math.isclose(out.item(), 14.0 / 3, rel_tol=1e-6)
    assert torch.allclose(x.grad, 2 * x.detach() / 10.0)


def test_aux_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    token_mask = torch.tensor([True, True, True, False])  # padding excluded
    p = torch.softmax(logits[:3], -1)
    top1 = p.argmax(-1)  # experts 0, 1, and (tie) 0
    counts = torch.bincount(top1, minlength=3).float()
    hand = 3 * (p.mean(0) * counts / 3).sum()
    assert torch.allclose(moe_aux_loss(logits, 1, token_mask), hand)
    # the correction bias changes which expert is counted, not the probabilities
    bias = torch.tensor([[0.0, 0.0, 10.0]])
    hand_b = 3 * (p.mean(0) * torch.tensor([0.0, 0.0, 3.0]) / 3).sum()
    assert torch.allclose(moe_aux_loss(logits, 1, token_mask, bias), hand_b)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    assert math.isclose(moe_z_loss(logits).item(), (lse[0] ** 2 + lse[1] ** 2) / 2, rel_tol=1e-6)


def test_orthogonal_loss_by_hand():
    W = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    Wn = torch.tensor([[1.0, 0.0], [2**-0.5, 2**-0.5]])
    diff = Wn @ Wn.T - torch.eye(2)
    assert math.isclose(orthogonal_loss(W).item(), (diff**2).sum().item() / 4, rel_tol=1e-6)
    assert orthogonal_loss(torch.eye(4) * 5).item() < 1e-12  # orthogonal rows: zero
    # group variant: [k=2, E/k=2, H]; rows 0,1 and rows 2,3 are compared only within their group
    W4 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert math.isclose(orthogonal_loss(W4, top_k=2, group=True).item(), 4 / 8, rel_tol=1e-6)


def test_correction_bias_update_by_hand():
    logits = torch.tensor([[3.0, 0.0, 0.0]] * 3 + [[0.0, 3.0, 0.0]])
    bias = torch.zeros(1, 3)
    usage = expert_usage(logits, bias, 1)
    assert usage.tolist() == [3.0, 1.0, 0.0]
    update_correction_bias(bias, usage, 0.001)
    assert torch.allclose(bias, torch.tensor([[-0.001, 0.001, 0.001]]))  # mean usage 4/3


def test_dpo_losses_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))
    margin = (-1.0 + 2.0) - (-3.0 + 2.5)  # 1.5
    sig, stats = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
    assert math.isclose(sig.item(), -math.log(1 / (1 + math.exp(-0.1 * margin))), rel_tol=1e-6)
    assert math.isclose(stats["rewards_margin"].item(), 0.1 * margin, rel_tol=1e-6)
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert math.isclose(ipo.item(), (margin - 5.0) ** 2, rel_tol=1e-6)
    free, _ = dpo_loss(pc, pr, torch.zeros(1), torch.zeros(1), beta=0.5)
    assert math.isclose(free.item(), -math.log(1 / (1 + math.exp(-0.5 * 2.0))), rel_tol=1e-6)
