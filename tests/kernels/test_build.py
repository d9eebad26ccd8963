"""Building the C kernels: every kernel compiles for every ISA target (whether or not this CPU runs it), the target
a process runs, the build cache. The kernels' numerics on each target are checked by their own tests, which take the
`kernel_isa` fixture (tests/conftest.py)."""

import platform

import pytest
import torch

from ernie45.kernels import (blas, build, causal_attention, cross_entropy, decode_ops, gemv, moe_experts,
                             paged_attention, qgemv)

KERNELS = {m.SOURCE_PATH.name: m for m in (gemv, qgemv, decode_ops, cross_entropy, causal_attention, blas,
                                           paged_attention, moe_experts)}
X86 = platform.machine() in ("x86_64", "AMD64")


def test_every_source_belongs_to_a_kernel_module():
    assert sorted(KERNELS) == sorted(s.name for s in build.SOURCES)


@pytest.mark.parametrize("target", [t.name for t in build.targets()])
@pytest.mark.parametrize("source", sorted(KERNELS))
def test_every_kernel_compiles_for_every_target(source, target):
    """Compiled here even where the CPU cannot run it: an AVX2 machine still compiles the AVX-512 code."""
    module = KERNELS[source]
    path = build.build_for(module.SOURCE_PATH, build.target_named(target), module.EXTRA_FLAGS)
    assert path.is_file() and path.stat().st_size > 0


@pytest.mark.skipif(not X86, reason="the x86-64 targets")
def test_x86_targets_cover_every_code_path():
    """The kernels branch on __AVX2__/__F16C__, __AVX512F__/__AVX512BW__ and __AVX512VNNI__/__AVX512BF16__: one
    target per combination they use, each needing the features its flags enable."""
    names = [t.name for t in build.targets()]
    assert names == ["generic", "avx2", "avx512", "avx512-vnni-bf16"]
    features = {t.name: set(t.cpu_features) for t in build.targets()}
    assert features["generic"] == set()
    assert {"avx2", "fma", "f16c"} <= features["avx2"] and "avx512f" not in features["avx2"]
    assert {"avx512f", "avx512bw", "avx512vl"} <= features["avx512"] and "avx512_vnni" not in features["avx512"]
    assert {"avx512_vnni", "avx512_bf16"} <= features["avx512-vnni-bf16"]


def test_active_target_is_the_fastest_the_cpu_runs(monkeypatch):
    monkeypatch.delenv("ERNIE45_KERNEL_ISA", raising=False)
    runnable = [t for t in build.targets() if t.runs_here()]
    assert runnable and runnable[0].name == "generic"
    assert build.active_target() == runnable[-1]


def test_kernel_isa_environment_picks_and_refuses(monkeypatch):
    monkeypatch.setenv("ERNIE45_KERNEL_ISA", "generic")
    assert build.active_target().name == "generic"
    monkeypatch.setenv("ERNIE45_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match="unknown kernel ISA 'sse9'.*generic"):
        build.active_target()
    unrunnable = [t for t in build.targets() if not t.runs_here()]
    if unrunnable:
        monkeypatch.setenv("ERNIE45_KERNEL_ISA", unrunnable[-1].name)
        with pytest.raises(ValueError, match="lacks: " + unrunnable[-1].missing_features()[0]):
            build.active_target()


def test_build_is_cached_by_content(monkeypatch, tmp_path):
    monkeypatch.setenv("ERNIE45_KERNEL_CACHE", str(tmp_path))
    quick_flags = ("-O0", "-fopenmp", "-shared", "-fPIC")  # the caching, not the code, is under test here
    path = build.build(gemv.SOURCE_PATH, quick_flags)
    assert path.parent == tmp_path and path.suffix == ".so"
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind
    mtime = path.stat().st_mtime_ns
    assert build.build(gemv.SOURCE_PATH, quick_flags) == path and path.stat().st_mtime_ns == mtime
    compiler = build.find_compiler()
    assert build.library_path(compiler, quick_flags, gemv.SOURCE_PATH) == path
    assert build.library_path(compiler, quick_flags + ("-DPREFETCH_BYTES=65536",), gemv.SOURCE_PATH) != path
    assert build.library_path([*compiler, "-DSOMETHING"], quick_flags, gemv.SOURCE_PATH) != path
    built = gemv.bind(build.load_library(path))
    y = torch.empty(3, 11)
    x, w = torch.randn(3, 37), torch.randn(11, 37)
    assert built.gemv(x.data_ptr(), 0, w.data_ptr(), 0, None, 0, y.data_ptr(), 0, 3, 11, 37, 1) == 0
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


def test_targets_build_apart(monkeypatch, tmp_path):
    """Each target is its own cached file, so a cache directory shared by different CPUs never hands one the
    other's instructions."""
    monkeypatch.setenv("ERNIE45_KERNEL_CACHE", str(tmp_path))
    compiler = build.find_compiler()
    paths = {build.library_path(compiler, t.compile_flags(), gemv.SOURCE_PATH) for t in build.targets()}
    assert len(paths) == len(build.targets())


def test_cache_key_covers_included_headers(tmp_path):
    """A kernel's local headers (scalar_types.h) are part of its build: editing one must not reuse a stale build."""
    source, header = tmp_path / "k.c", tmp_path / "h.h"
    source.write_text('#include "h.h"\nint f(void) { return VALUE; }\n')
    header.write_text("#define VALUE 1\n")
    compiler = build.find_compiler()
    before = build.library_path(compiler, build.BASE_FLAGS, source)
    header.write_text("#define VALUE 2\n")
    assert build.library_path(compiler, build.BASE_FLAGS, source) != before
    assert "scalar_types.h" in qgemv.SOURCE_PATH.read_text()  # the real kernels include it


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ERNIE45_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.cache_dir() == tmp_path / "ernie45" / "kernels"
    monkeypatch.setenv("ERNIE45_KERNEL_CACHE", str(tmp_path / "elsewhere"))
    assert build.cache_dir() == tmp_path / "elsewhere"


def test_forgetting_reloads_every_kernel_for_the_new_target(monkeypatch):
    first = gemv._library()
    monkeypatch.setenv("ERNIE45_KERNEL_ISA", "generic")
    build.forget_loaded_kernels()
    try:
        assert gemv._library() is not first and decode_ops._library() is not None
    finally:
        monkeypatch.undo()
        build.forget_loaded_kernels()
