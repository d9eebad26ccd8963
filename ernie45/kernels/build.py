"""Building the C kernels beside this file: compiled with the system C compiler at first use, cached on disk, loaded
through ctypes.

Each kernel is compiled for an instruction-set *target*: a named set of compiler flags and the CPU features a
machine needs to run the result. On x86-64 the targets are the paths the kernels have code for:

    generic           x86-64 baseline (SSE2; no F16C, so no fp16 weights)
    avx2              x86-64-v3: AVX2, FMA, F16C (Haswell, Zen 1-3)
    avx512            x86-64-v4: AVX-512 F/BW/CD/DQ/VL (Skylake-X)
    avx512-vnni-bf16  x86-64-v4 + VNNI + BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids)

other architectures have `generic` (the compiler's default) and `native` (-march=native). A process runs the best
target its CPU supports, or the one `ERNIE45_KERNEL_ISA` names, so the build that runs is always one of the builds
the tests check (tests/kernel_isa.py builds every target, runs those the CPU supports, compiles the others).

Builds are cached per user, keyed by a hash of the source (with its headers), compiler, flags and machine, in
`$ERNIE45_KERNEL_CACHE`, else `$XDG_CACHE_HOME/ernie45/kernels`, else `~/.cache/ernie45/kernels`.
`ERNIE45_DISABLE_KERNELS=1` turns every kernel off (callers fall back to torch).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

# torch first: it maps its own libgomp.so.1, and a kernel's libgomp.so.1 dependency then resolves to that same
# copy (the loader matches by soname), so both share one OpenMP thread pool.
import torch  # noqa: F401

logger = logging.getLogger(__name__)

T = TypeVar("T")

KERNEL_DIR = Path(__file__).parent
BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
"""Flags of every build; the target adds its instruction-set flags."""


@dataclass(frozen=True)
class IsaTarget:
    """An instruction set the kernels are built for."""

    name: str
    flags: tuple[str, ...]
    """Compiler flags selecting the instruction set."""
    cpu_features: tuple[str, ...]
    """The /proc/cpuinfo flags a CPU needs to run the build."""

    def missing_features(self) -> list[str]:
        """The features this CPU lacks to run the build (empty: it runs here)."""
        have = cpu_features()
        return [f for f in self.cpu_features if f not in have]

    def runs_here(self) -> bool:
        return not self.missing_features()

    def compile_flags(self, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        return (*BASE_FLAGS, *self.flags, *extra)


_V3 = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe")  # abm: how Linux names LZCNT
_V4 = (*_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
X86_TARGETS = (
    IsaTarget("generic", ("-march=x86-64", "-mtune=generic"), ()),
    IsaTarget("avx2", ("-march=x86-64-v3", "-mtune=generic"), _V3),
    IsaTarget("avx512", ("-march=x86-64-v4", "-mtune=generic"), _V4),
    IsaTarget("avx512-vnni-bf16", ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mtune=generic"),
              (*_V4, "avx512_vnni", "avx512_bf16")),
)
OTHER_TARGETS = (IsaTarget("generic", (), ()), IsaTarget("native", ("-march=native",), ()))


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def targets() -> tuple[IsaTarget, ...]:
    """This architecture's targets, from the most portable to the fastest."""
    return X86_TARGETS if is_x86() else OTHER_TARGETS


def target_named(name: str) -> IsaTarget:
    """The target called `name`; ValueError listing the choices if there is none."""
    for target in targets():
        if target.name == name:
            return target
    raise ValueError(f"unknown kernel ISA {name!r} on {platform.machine()}; "
                     f"choose one of {', '.join(t.name for t in targets())}")


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo `flags`, or `Features` on ARM); empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def active_target() -> IsaTarget:
    """The target this process builds and runs: `ERNIE45_KERNEL_ISA` if set (ValueError when this CPU cannot run
    it), else the fastest target the CPU supports."""
    name = os.environ.get("ERNIE45_KERNEL_ISA", "").strip()
    if name and name != "auto":
        target = target_named(name)
        if missing := target.missing_features():
            raise ValueError(f"ERNIE45_KERNEL_ISA={name} needs CPU features this CPU lacks: {', '.join(missing)}")
        return target
    return [t for t in targets() if t.runs_here()][-1]


def find_compiler() -> list[str] | None:
    """The C compiler command: $CC, else the one Python was built with, else cc or gcc on PATH."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        command = shlex.split(candidate or "")
        if command and (found := shutil.which(command[0])):
            return [found, *command[1:]]
    return None


def cache_dir() -> Path:
    """Where built kernels live."""
    override = os.environ.get("ERNIE45_KERNEL_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "ernie45" / "kernels"


def source_with_headers(source: Path) -> str:
    """The source's text and that of the local headers it includes (`#include "name.h"`, beside it): what a
    build depends on besides the compiler and flags."""
    text = source.read_text()
    headers = re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.MULTILINE)
    return "\0".join([text, *((source.parent / name).read_text() for name in headers)])


@functools.cache
def _compiler_version(compiler: tuple[str, ...]) -> str:
    return subprocess.run([*compiler, "--version"], check=False, capture_output=True, text=True,
                          errors="replace").stdout


def library_path(compiler: list[str], flags: tuple[str, ...], source: Path) -> Path:
    """Where the build of `source` by `compiler` with `flags` is cached: named by a hash of the source with its
    headers, the compiler and its version, the flags and the machine. (Flags name the instruction set, so a cache
    directory shared by different CPUs is safe; `-march=native` builds add the CPU's flags to the key.)"""
    key = hashlib.sha256()
    parts = [source_with_headers(source), " ".join(compiler), _compiler_version(tuple(compiler)), " ".join(flags),
             platform.machine()]
    if any("native" in flag for flag in flags):
        parts.append(" ".join(sorted(cpu_features())))
    for part in parts:
        key.update(part.encode() + b"\0")
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def build(source: Path, flags: tuple[str, ...]) -> Path:
    """Compile `source` with `flags` (or reuse the cached build) and return the .so's path.

    Raises RuntimeError when there is no compiler or compilation fails (with the compiler's output), OSError when
    the cache directory is not writable.
    """
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    target = library_path(compiler, flags, source)
    if target.exists():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: a concurrent process never loads a half-written library.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([*compiler, *flags, "-o", tmp_name, str(source)], check=False, capture_output=True,
                                text=True, errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} {' '.join(flags)} {source.name} failed "
                               f"(exit {result.returncode}):\n{result.stderr.strip()}")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def build_for(source: Path, target: IsaTarget | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Build `source` for `target` (default: the active one) with the kernel's `extra_flags`."""
    return build(source, (target or active_target()).compile_flags(extra_flags))


def openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(maxsplit=5)[-1].strip() for line in f if line.count(" ") >= 5}
    except OSError:
        return set()
    return {p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))}


def load_library(path: Path) -> ctypes.CDLL:
    """Load a built kernel, warning if it brought an OpenMP runtime besides torch's."""
    runtimes_before = openmp_runtimes()
    lib = ctypes.CDLL(str(path))
    if new_runtimes := openmp_runtimes() - runtimes_before:
        logger.warning("%s brought its own OpenMP runtime (%s) instead of sharing torch's; two thread pools will "
                       "compete for the cores (was it loaded before torch?)", path.name, ", ".join(sorted(new_runtimes)))
    return lib


def load_kernel(source: Path, bind: Callable[[ctypes.CDLL], T], what: str, fallback: str,
                extra_flags: tuple[str, ...] = ()) -> T | None:
    """Build `source` for the active target (or reuse its cached build), load it and `bind` its entry points.
    None when ERNIE45_DISABLE_KERNELS=1, or (logged: "ernie45 {what} unavailable, {fallback}") when the build, the
    load or a symbol fails. Callers cache the result with `cached_loader`."""
    if os.environ.get("ERNIE45_DISABLE_KERNELS") == "1":
        return None
    try:
        return bind(load_library(build_for(source, extra_flags=extra_flags)))
    # AttributeError: a library without the expected symbols (a foreign file under the cached name).
    except (RuntimeError, OSError, AttributeError) as e:
        logger.warning("ernie45 %s unavailable, %s: %s", what, fallback, e)
        return None


_LOADERS: list[functools._lru_cache_wrapper] = []


def cached_loader(loader: Callable[[], T]) -> Callable[[], T]:
    """`functools.cache` for a kernel module's library loader, registered so that `forget_loaded_kernels` can
    clear every one (the environment is read at a kernel's first use)."""
    cached = functools.cache(loader)
    _LOADERS.append(cached)
    return cached


def forget_loaded_kernels() -> None:
    """Make every kernel module load its library again at its next use, e.g. after ERNIE45_KERNEL_ISA changed.
    Objects that captured an entry point (prepared calls, fused decode plans) keep the library they were built
    with."""
    for loader in _LOADERS:
        loader.cache_clear()


SOURCES = tuple(sorted(KERNEL_DIR.glob("*.c")))
"""Every kernel source (tests build each for every target)."""
