"""The training forward's tied-embedding gradient: sparse from the lookup, added into the LM head's dense one."""

import torch

from ernie45.checkpoint import load_model
from ernie45.training.forward import TrainingModel


def tied_weight_gradient(model_dir, sparse: bool) -> torch.Tensor:
    model = load_model(model_dir, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    module = TrainingModel(model)
    if not sparse:  # a forward pre-hook on the embedding makes the training forward use the module as is
        model.model.embed_tokens.register_forward_pre_hook(lambda mod, args: None)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand_as(ids)
    out = module(ids, pos, torch.zeros_like(ids))
    (out.logits.float().logsumexp(-1).mean() + out.logits[..., 5].mean()).backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and not grad.is_sparse and grad.layout == torch.strided  # AdamW needs a dense gradient
    return grad


def test_tied_embedding_gradient_equals_the_dense_path(tiny_dense):
    dense = tied_weight_gradient(tiny_dense, sparse=False)
    sparse = tied_weight_gradient(tiny_dense, sparse=True)
    # The two paths sum a row's contributions in different orders: equal up to fp32 rounding of the largest terms.
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-8 * float(dense.abs().max()))
    assert dense[3:500].abs().sum() > 0


def test_lookup_gradient_is_sparse_only_when_tied_and_unhooked(tiny_dense):
    model = load_model(tiny_dense, dtype="float32")
    module, ids = TrainingModel(model), torch.tensor([[3, 4, 4]])
    weight = model.model.embed_tokens.weight
    (grad,) = torch.autograd.grad(module._embed(ids).sum(), weight)
    assert grad.is_sparse
    model.model.embed_tokens.register_forward_hook(lambda mod, args, out: None)
    (grad,) = torch.autograd.grad(module._embed(ids).sum(), weight)
    assert not grad.is_sparse
