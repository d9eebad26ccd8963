"""OpenBLAS GEMM in torch's thread pool (kernels/blas.py + parallel_sgemm.c) and the autograd linear built on it
(models/training_linear.py), against torch's matmul and F.linear. Every test forces `ERNIE45_BLAS=openblas` so the
path runs on any CPU (`auto` takes it only on AMD)."""

import threading

import pytest
import torch
import torch.nn.functional as F

from ernie45.kernels import blas
from ernie45.models import training_linear
from ernie45.models.layers import linear


@pytest.fixture(autouse=True)
def force_openblas(monkeypatch):
    monkeypatch.setenv("ERNIE45_BLAS", "openblas")
    monkeypatch.delenv("ERNIE45_DISABLE_KERNELS", raising=False)


def test_openblas_loads():
    assert blas.enabled()
    assert blas.describe().startswith("openblas (")


def layouts(M: int, K: int, N: int):
    """(name, a [M, K], b [K, N]) in every stored layout the GEMM takes without a copy, and two it must copy."""
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    yield "row-major", a, b
    yield "transposed views", a.t().contiguous().t(), b.t().contiguous().t()
    yield "row slices", torch.randn(M, K + 7, generator=g)[:, 3 : 3 + K], torch.randn(K, N + 5, generator=g)[:, :N]
    yield "copied: strided both ways", torch.randn(M * 2, K * 2, generator=g)[::2, ::2], b
    yield "copied: broadcast rows", torch.randn(1, K, generator=g).expand(M, K), b


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 64, 33), (37, 29, 53), (5, 300, 1), (64, 48, 2000), (700, 96, 24)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mm_equals_torch_in_every_layout(shape, threads):
    """Odd sizes split across threads (along N when N >= M, else M; partial micro-tiles at the ends)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, a, b in layouts(*shape):
            out = blas.mm(a, b)
            assert out is not None, name
            assert out.shape == (shape[0], shape[2]) and out.is_contiguous()
            torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-4, msg=name)
    finally:
        torch.set_num_threads(saved)


def test_mm_declines_what_it_does_not_take(monkeypatch):
    """None (the caller uses torch): other dtypes, empty operands, and ERNIE45_BLAS=torch."""
    a, b = torch.randn(4, 3), torch.randn(3, 5)
    assert blas.mm(a.double(), b.double()) is None
    assert blas.mm(a.bfloat16(), b.bfloat16()) is None
    assert blas.mm(torch.randn(0, 3), b) is None and blas.mm(a, torch.randn(3, 0)) is None
    assert blas.mm(a[:, None], b) is None  # not 2-D
    monkeypatch.setenv("ERNIE45_BLAS", "torch")
    assert not blas.enabled() and blas.mm(a, b) is None and blas.describe() == "torch"
    monkeypatch.setenv("ERNIE45_BLAS", "on")
    with pytest.raises(ValueError, match="ERNIE45_BLAS='on' is not one of auto, openblas, torch"):
        blas.enabled()


def test_concurrent_callers_get_their_own_results():
    """Python threads calling at once (ctypes drops the GIL): OpenBLAS's buffers are per call."""
    torch.manual_seed(0)
    pairs = [(torch.randn(96, 80), torch.randn(80, 130)) for _ in range(6)]
    errors: list[str] = []

    def worker(i: int) -> None:
        a, b = pairs[i]
        for _ in range(20):
            if not torch.allclose(blas.mm(a, b), a @ b, rtol=1e-5, atol=1e-4):
                errors.append(f"pair {i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_shape", [(7, 24), (2, 5, 24)])
def test_training_linear_equals_f_linear_forward_and_backward(bias, x_shape):
    torch.manual_seed(0)
    x = torch.randn(*x_shape, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    grad = torch.randn(*x_shape[:-1], 40)
    ours = training_linear.linear(x, w, b)
    (ours * grad).sum().backward()
    got = [x.grad, w.grad] + ([b.grad] if bias else [])
    for t in (x, w) + ((b,) if bias else ()):
        t.grad = None
    ref = F.linear(x, w, b)
    (ref * grad).sum().backward()
    want = [x.grad, w.grad] + ([b.grad] if bias else [])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for g_ours, g_ref in zip(got, want):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-4)


def test_training_linear_frozen_weight_gets_no_gradient():
    """LoRA's base layers: the weight is frozen, the input still needs its gradient."""
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(8, 16)
    training_linear.linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(6, 16), rtol=1e-5, atol=1e-5)
    assert w.grad is None


def test_layers_linear_routes_autograd_products_only():
    """Under autograd (fp32, CPU) the product goes through OpenBLAS; inference and other dtypes keep their routes."""
    x = torch.randn(80, 32)
    w = torch.nn.Parameter(torch.randn(48, 32))
    assert type(linear(x, w).grad_fn).__name__ == "_BlasLinearBackward"
    with torch.no_grad():
        assert linear(x, w).grad_fn is None
    assert not training_linear.takes(x.double(), w.detach().double(), None)
    assert not training_linear.takes(x, w, torch.randn(48, dtype=torch.float64))


def test_autocast_keeps_torch_linear():
    """compute_type bf16 (CPU autocast): the product stays F.linear's, computed and returned in bf16."""
    x = torch.randn(80, 32, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(48, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not training_linear.takes(x, w, None)
        assert linear(x, w).dtype == torch.bfloat16
