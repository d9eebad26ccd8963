"""The training cross-entropy kernel (kernels/cross_entropy.c) and the logits-consuming loss built on it
(`training.losses.token_cross_entropy(consume_logits=True)`), against `F.cross_entropy` and its autograd.
Legend: M rows, V vocabulary, H hidden.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ernie45.kernels import cross_entropy
from ernie45.training.losses import IGNORE, token_cross_entropy

DTYPES = [torch.float32, torch.bfloat16]


def test_kernel_builds():
    assert cross_entropy.available()


def targets_with_ignored(M: int, V: int, seed: int = 0) -> torch.Tensor:
    t = torch.randint(0, V, (M,), generator=torch.Generator().manual_seed(seed))
    t[1::4] = IGNORE
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 17, 1003, 5000])  # odd sizes: partial lanes and blocks
def test_forward_equals_torch(kernel_isa, dtype, V):
    torch.manual_seed(0)
    logits = (torch.randn(9, V) * 4).to(dtype)
    targets = targets_with_ignored(9, V)
    loss, lse = cross_entropy.forward(logits, targets, IGNORE)
    ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), -1), rtol=1e-6, atol=1e-5)
    assert (loss[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("scale", [1e-3, 30.0, 1e4])
def test_forward_is_stable_at_extreme_scales(kernel_isa, scale):
    torch.manual_seed(1)
    logits = torch.randn(4, 700) * scale
    targets = torch.randint(0, 700, (4,))
    loss, _ = cross_entropy.forward(logits, targets, IGNORE)
    ref = F.cross_entropy(logits, targets, reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)


def test_nan_logit_gives_nan_loss_for_its_row_only(kernel_isa):
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    loss, _ = cross_entropy.forward(logits, torch.tensor([0, 3, 4]), IGNORE)
    assert math.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_out_of_range_target_names_it():
    logits = torch.randn(3, 10)
    with pytest.raises(IndexError, match=r"target 10 is out of bounds for a vocabulary of 10"):
        cross_entropy.forward(logits, torch.tensor([1, 10, IGNORE]), IGNORE)
    with pytest.raises(IndexError, match=r"target -3 is out of bounds"):
        cross_entropy.forward(logits, torch.tensor([1, -3, 2]), IGNORE)


def test_refuses_what_it_does_not_take():
    targets = torch.zeros(2, dtype=torch.long)
    assert cross_entropy.forward(torch.randn(2, 8, dtype=torch.float16), targets, IGNORE) is None
    assert cross_entropy.forward(torch.randn(8, 2).t(), targets, IGNORE) is None  # not contiguous
    assert cross_entropy.forward(torch.randn(2, 8), targets.int(), IGNORE) is None


def head_gradients(dtype, consume: bool, weights_M: torch.Tensor):
    """Gradients of sum_m w[m] * CE(h W^T)[m] with respect to h and W."""
    torch.manual_seed(2)
    M, H, V = 24, 16, 1003
    h = torch.randn(M, H).to(dtype).requires_grad_()
    W = torch.randn(V, H).to(dtype).requires_grad_()
    targets = targets_with_ignored(M, V, seed=3)
    loss = token_cross_entropy(h @ W.T, targets, consume_logits=consume)
    (loss * weights_M).sum().backward()
    return loss.detach(), h.grad, W.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_consumed_logits_give_torch_gradients(kernel_isa, dtype):
    weights = torch.rand(24, generator=torch.Generator().manual_seed(4))  # per-token upstream gradients
    loss, grad_h, grad_W = head_gradients(dtype, True, weights)
    ref_loss, ref_h, ref_W = head_gradients(dtype, False, weights)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # fp32: the same softmax to an ulp; bf16: the logit gradients round to bf16 on both paths, an ulp apart at most
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(grad_h, ref_h, **tol)
    torch.testing.assert_close(grad_W, ref_W, **tol)


def test_consumed_logits_are_overwritten_by_their_gradient():
    torch.manual_seed(5)
    logits = torch.randn(6, 40, requires_grad=True)
    work = logits * 1.0  # a non-leaf the loss may consume
    targets = torch.tensor([3, IGNORE, 0, 39, 7, 7])
    token_cross_entropy(work, targets, consume_logits=True).sum().backward()
    expected = torch.softmax(logits.detach(), -1) - F.one_hot(targets.clamp(min=0), 40)
    expected[1] = 0
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(work.detach(), expected, rtol=1e-5, atol=1e-6)  # the buffer now holds it


def test_second_backward_is_refused():
    logits = torch.randn(2, 30, requires_grad=True) * 1.0
    loss = token_cross_entropy(logits, torch.tensor([1, 2]), consume_logits=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run backward twice"):
        loss.backward()


def test_fp16_falls_back_to_torch():
    logits = torch.randn(3, 20, dtype=torch.float16, requires_grad=True)
    targets = torch.tensor([1, IGNORE, 19])
    loss = token_cross_entropy(logits, targets, consume_logits=True)
    ref = F.cross_entropy(logits.detach().float(), targets, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss.detach(), ref)
    loss.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.float16
