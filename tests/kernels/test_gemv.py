"""The gemv kernel against F.linear (in float64 on the same inputs) on every ISA target, its argument checks and off
switches (the build and its cache: test_build.py).

Nothing here skips when the compiler is missing: the kernel is part of the package and CI has gcc, so a failed
build is a failed test. Legend: M rows of x, N output features, K input features.
"""

import json
import logging
import os
import platform
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ernie45.kernels import build, gemv

# Output rounding of each dtype (half an ulp, relative) on top of the fp32 accumulation-order error.
OUTPUT_RTOL = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}
X86 = platform.machine() in ("x86_64", "AMD64")


def weight_dtypes(lib: gemv.GemvLibrary) -> list[torch.dtype]:
    return [d for d in (torch.float32, torch.bfloat16, torch.float16) if d in lib.dtype_codes]


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


def assert_matches_linear(x, w, bias=None):
    """gemv agrees with F.linear computed in float64 from the same (already rounded) inputs."""
    y = gemv.gemv(x, w, bias)
    ref = reference(x, w, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    # fp32 sums of K products: error grows with the magnitude of the terms, ~sqrt(K) * eps * |x| |w|.
    scale = (x.double().abs() @ w.double().abs().T).max().item() + 1e-30
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * scale, rtol=OUTPUT_RTOL[x.dtype])


@pytest.fixture(scope="module")
def lib() -> gemv.GemvLibrary:
    library = gemv._library()
    assert library is not None, "gemv kernel failed to build; see the logged compiler output"
    return library


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_available(lib):
    assert gemv.available()


@pytest.mark.parametrize("M", [1, 2, 3, 16])
@pytest.mark.parametrize("K", [1000, 37, 1024])
@pytest.mark.parametrize("N", [5, 1029])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear(kernel_isa, M, K, N, with_bias):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    for w_dtype in weight_dtypes(gemv._library()):
        # x in fp32 (widening path) and in the weight's dtype (a model's forward; bf16 x bf16 may use dot products).
        for x_dtype in dict.fromkeys([torch.float32, w_dtype]):
            w = torch.randn(N, K, generator=g).to(w_dtype)
            x = torch.randn(M, K, generator=g).to(x_dtype)
            bias = torch.randn(N, generator=g).to(w_dtype) if with_bias else None
            assert gemv.supports(x, w, bias)
            assert_matches_linear(x, w, bias)


def test_every_row_count_and_odd_sizes(kernel_isa):
    """Each M from 1 to 16 (full and partial row tiles) against odd N (partial weight tiles, ragged thread slices)."""
    g = torch.Generator().manual_seed(0)
    for w_dtype in weight_dtypes(gemv._library()):
        w = torch.randn(2053, 67, generator=g).to(w_dtype)
        for M in range(1, gemv.MAX_ROWS + 1):
            assert_matches_linear(torch.randn(M, 67, generator=g).to(w_dtype), w)


def test_leading_dims_and_noncontiguous_x(kernel_isa):
    w = torch.randn(64, 40)
    x_BTK = torch.randn(2, 3, 40)
    assert gemv.gemv(x_BTK, w).shape == (2, 3, 64)
    assert_matches_linear(x_BTK, w)
    assert_matches_linear(torch.randn(40), w)  # [K] -> [N]
    x_strided = torch.randn(40, 4).T  # [4, 40], not contiguous
    assert not x_strided.is_contiguous()
    assert_matches_linear(x_strided, w)


def test_bias_dtype_may_differ_from_weight(lib):
    w = torch.randn(33, 50).bfloat16()
    assert_matches_linear(torch.randn(2, 50), w, torch.randn(33))


def test_same_result_for_any_thread_count(kernel_isa):
    """Each output is summed by one thread in a fixed order, so threading never changes the bits."""
    x, w = torch.randn(4, 1000), torch.randn(3000, 1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = gemv.gemv(x, w)
        torch.set_num_threads(2)
        y2 = gemv.gemv(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2)


def test_nonfinite_values_propagate(kernel_isa):
    x = torch.randn(2, 40)
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    w = torch.randn(9, 40)
    for dtype in (torch.float32, torch.bfloat16):
        y, ref = gemv.gemv(x.to(dtype), w.to(dtype)), F.linear(x.to(dtype).float(), w.to(dtype).float())
        assert torch.equal(y.float().isnan(), ref.isnan()) and torch.equal(y.float().isinf(), ref.isinf())


BAD_ARGUMENTS = {
    "int weight": (torch.randn(2, 8), torch.ones(4, 8, dtype=torch.int32), None, "dtype"),
    "float64 x": (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), None, "dtype"),
    "non-contiguous weight": (torch.randn(2, 8), torch.randn(8, 4).T, None, "contiguous"),
    "K mismatch": (torch.randn(2, 7), torch.randn(4, 8), None, r"weight \[N, K\]"),
    "1-D weight": (torch.randn(2, 8), torch.randn(8), None, r"weight \[N, K\]"),
    "17 rows": (torch.randn(17, 8), torch.randn(4, 8), None, "1..16"),
    "empty x": (torch.randn(0, 8), torch.randn(4, 8), None, "1..16"),
    "empty weight": (torch.randn(2, 0), torch.randn(4, 0), None, "empty"),
    "bias shape": (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), "bias"),
    "meta device": (torch.randn(2, 8, device="meta"), torch.randn(4, 8, device="meta"), None, "CPU"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_rejects_with_a_clear_message(lib, case):
    x, w, bias, message = BAD_ARGUMENTS[case]
    assert not gemv.supports(x, w, bias)
    with pytest.raises(ValueError, match=message):
        gemv.gemv(x, w, bias)


def test_rejects_inputs_needing_grad(lib):
    w = torch.nn.Parameter(torch.randn(4, 8))
    x = torch.randn(1, 8)
    with torch.enable_grad():
        assert not gemv.supports(x, w)
        with pytest.raises(ValueError, match="backward"):
            gemv.gemv(x, w)
    assert gemv.supports(x, w)  # the autouse fixture's no_grad


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux only)")
def test_shares_torchs_openmp_runtime(lib):
    """Loading the kernel maps no OpenMP runtime besides torch's (checked in a fresh process: other wheels in this
    one, e.g. sentencepiece, bring their own under a different soname)."""
    script = (
        "import json, torch; from ernie45.kernels import build, gemv; before = sorted(build.openmp_runtimes()); "
        "gemv.gemv(torch.randn(1, 4096), torch.randn(4096, 4096)); "
        "print(json.dumps([before, sorted(build.openmp_runtimes())]))"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    before, after = json.loads(out)
    assert after == before and len(after) == 1 and "torch" in after[0], out


@pytest.mark.skipif(not X86, reason="the generic x86-64 target is the one without F16C")
def test_generic_x86_build_refuses_fp16(monkeypatch):
    """The baseline x86-64 build has no F16C: fp16 is refused (F.linear takes it), never mis-converted."""
    monkeypatch.setenv("ERNIE45_KERNEL_ISA", "generic")
    build.forget_loaded_kernels()
    try:
        assert torch.float16 not in gemv._library().dtype_codes
        assert not gemv.supports(torch.randn(1, 8).half(), torch.randn(4, 8).half())
        assert gemv.supports(torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16())
    finally:
        monkeypatch.undo()
        build.forget_loaded_kernels()


@pytest.fixture
def fresh_library():
    """Forget the process's library so the next use re-reads the environment, and again afterwards."""
    gemv._library.cache_clear()
    yield
    gemv._library.cache_clear()


def test_disabled_by_environment(monkeypatch, fresh_library):
    monkeypatch.setenv("ERNIE45_DISABLE_KERNELS", "1")
    assert not gemv.available()
    assert not gemv.supports(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="unavailable"):
        gemv.gemv(torch.randn(1, 8), torch.randn(4, 8))


def test_failed_build_is_logged_once_and_never_raises(monkeypatch, tmp_path, caplog, fresh_library):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'broken-cc: no luck today' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("ERNIE45_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert not gemv.available()
        assert not gemv.available()
        assert not gemv.supports(torch.randn(1, 8), torch.randn(4, 8))
    failures = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(failures) == 1 and "no luck today" in failures[0].getMessage()
    assert not any((tmp_path / "cache").glob("*.so"))
