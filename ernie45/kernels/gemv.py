"""Matrix-vector product for decode on the CPU: y = x @ W^T (+ bias) for 1..16 rows of x, W read once.

Decode is memory-bound and torch's small-M matmuls reach a fraction of the machine's read bandwidth, so this
module builds `gemv.c` with the system C compiler at first use and calls it through ctypes. Callers check
`supports(x, weight)` (which includes `available()`) and fall back to `F.linear` otherwise.

The shared library is cached per user, keyed by a hash of the source, compiler, flags and CPU, in
`$ERNIE45_KERNEL_CACHE`, else `$XDG_CACHE_HOME/ernie45/kernels`, else `~/.cache/ernie45/kernels`.
`ERNIE45_DISABLE_KERNELS=1` turns the kernel off. Legend: M rows of x, N output features, K input features.
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

# torch first: it maps its own libgomp.so.1, and the kernel's libgomp.so.1 dependency then resolves to that same
# copy (the loader matches by soname), so both share one OpenMP thread pool.
import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ROWS = 16
"""Most rows of x per call: beyond this the product is compute-bound and a real GEMM wins."""

SOURCE_PATH = Path(__file__).with_name("gemv.c")
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

# Must match the enum in gemv.c.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERRORS = {1: "unsupported dtype", 2: "empty shape", 3: "out of memory"}


@dataclass(frozen=True)
class GemvLibrary:
    """A built and loaded gemv.c."""

    path: Path
    gemv: Callable[..., int]
    dtype_codes: dict[torch.dtype, int]
    """The dtypes this build takes (fp16 only with F16C) and their codes in gemv.c."""


def find_compiler() -> list[str] | None:
    """The C compiler command: $CC, else the one Python was built with, else cc or gcc on PATH."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        command = shlex.split(candidate or "")
        if command and (found := shutil.which(command[0])):
            return [found, *command[1:]]
    return None


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU model and feature flags (a cache dir may be shared by machines)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        # One core's worth: every core repeats the same lines.
        return "".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    """Where built kernels live."""
    override = os.environ.get("ERNIE45_KERNEL_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "ernie45" / "kernels"


def library_path(compiler: list[str], flags: tuple[str, ...] = COMPILE_FLAGS, source: Path = SOURCE_PATH) -> Path:
    """Where the build of `source` (gemv.c, or another kernel beside it) by `compiler` with `flags` for this CPU is
    cached: named by a hash of all four (the source with the headers it includes)."""
    version = subprocess.run(
        [*compiler, "--version"], check=False, capture_output=True, text=True, errors="replace"
    ).stdout
    key = hashlib.sha256()
    for part in (
        source_with_headers(source),
        " ".join(compiler),
        version,
        " ".join(flags),
        platform.machine(),
        _cpu_identity(),
    ):
        key.update(part.encode() + b"\0")
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def source_with_headers(source: Path) -> str:
    """The source's text and that of the local headers it includes (`#include "name.h"`, beside it): what a
    build depends on besides the compiler and flags."""
    text = source.read_text()
    headers = re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.MULTILINE)
    return "\0".join([text, *((source.parent / name).read_text() for name in headers)])


def build(flags: tuple[str, ...] = COMPILE_FLAGS, source: Path = SOURCE_PATH) -> Path:
    """Compile `source` (default gemv.c) with `flags` (or reuse the cached build) and return the .so's path.

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
        result = subprocess.run(
            [*compiler, *flags, "-o", tmp_name, str(source)],
            check=False,
            capture_output=True,
            text=True,
            errors="replace",
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed (exit {result.returncode}):\n{result.stderr.strip()}")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(maxsplit=5)[-1].strip() for line in f if line.count(" ") >= 5}
    except OSError:
        return set()
    return {p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))}


def load(path: Path) -> GemvLibrary:
    """Load a built gemv library and declare its functions' signatures."""
    runtimes_before = openmp_runtimes()
    lib = ctypes.CDLL(str(path))
    if new_runtimes := openmp_runtimes() - runtimes_before:
        logger.warning(
            "gemv: %s brought its own OpenMP runtime (%s) instead of sharing torch's; "
            "two thread pools will compete for the cores (was it loaded before torch?)",
            path.name,
            ", ".join(sorted(new_runtimes)),
        )
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    # A prototype call converts its arguments ~30% faster than a CDLL attribute with argtypes set (~1.7 vs 2.5 us).
    prototype = ctypes.CFUNCTYPE(i32, ptr, i32, ptr, i32, ptr, i32, ptr, i32, i64, i64, i64, i32)
    gemv = prototype(("ernie45_gemv", lib))
    supports_fp16 = ctypes.CFUNCTYPE(i32)(("ernie45_gemv_supports_fp16", lib))()
    codes = dict(_DTYPE_CODES) if supports_fp16 else {d: c for d, c in _DTYPE_CODES.items() if d != torch.float16}
    return GemvLibrary(path=path, gemv=gemv, dtype_codes=codes)


def load_kernel(source: Path, bind: Callable[[ctypes.CDLL], T], what: str, fallback: str,
                flags: tuple[str, ...] = COMPILE_FLAGS) -> T | None:
    """Build `source` (or reuse its cached build), load it and `bind` its entry points: the loading every kernel
    beside gemv.c shares. None when ERNIE45_DISABLE_KERNELS=1, or (logged: "ernie45 {what} unavailable,
    {fallback}") when the build, the load or a symbol fails. Callers cache the result."""
    if os.environ.get("ERNIE45_DISABLE_KERNELS") == "1":
        return None
    try:
        return bind(ctypes.CDLL(str(build(flags=flags, source=source))))
    # AttributeError: a library without the expected symbols (a foreign file under the cached name).
    except (RuntimeError, OSError, AttributeError) as e:
        logger.warning("ernie45 %s unavailable, %s: %s", what, fallback, e)
        return None


@functools.cache
def _library() -> GemvLibrary | None:
    """The process's gemv library, built on first use; None (logged once) if disabled or the build fails.

    The environment (ERNIE45_DISABLE_KERNELS, CC, the cache dir) is read once, at that first use.
    """
    if os.environ.get("ERNIE45_DISABLE_KERNELS") == "1":
        return None
    try:
        return load(build())
    # AttributeError: a library without the expected symbols (a foreign file under the cached name).
    except (RuntimeError, OSError, AttributeError) as e:
        logger.warning("ernie45 gemv kernel unavailable, falling back to F.linear: %s", e)
        return None


def available() -> bool:
    """Whether the kernel is enabled and built (the first call compiles it; never raises)."""
    return _library() is not None


def _unsupported_reason(
    lib: GemvLibrary, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> str | None:
    """Why gemv cannot take these arguments, or None if it can. Cheap checks only: it runs on every call."""
    codes = lib.dtype_codes
    if not (x.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu)):
        return f"CPU tensors only, got x on {x.device}, weight on {weight.device}" + (
            "" if bias is None else f", bias on {bias.device}"
        )
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in codes:
            return f"{name} dtype {t.dtype} is not one of {', '.join(map(str, codes))}"
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return f"need x [..., K] and weight [N, K], got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
    if weight.numel() == 0:
        return f"weight {tuple(weight.shape)} is empty"
    rows = x.numel() // x.shape[-1]
    if not 1 <= rows <= MAX_ROWS:
        return f"x has {rows} rows; gemv takes 1..{MAX_ROWS} (use F.linear for more)"
    if not weight.is_contiguous():
        return "weight must be contiguous (copying it every call would cost more than the product)"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or not bias.is_contiguous()):
        return f"bias must be a contiguous [{weight.shape[0]}] tensor, got {tuple(bias.shape)}"
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return "gemv has no backward; call it under torch.no_grad() or torch.inference_mode()"
    return None


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `gemv(x, weight, bias)` will run: kernel available, CPU tensors, fp32/bf16 (fp16 with F16C),
    1..16 rows of x, contiguous weight, no autograd needed."""
    lib = _library()
    return lib is not None and _unsupported_reason(lib, x, weight, bias) is None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [..., K] with 1..16 rows, in x's dtype, accumulated in fp32.

    Raises ValueError for arguments it does not take (see `supports`), RuntimeError if the kernel is unavailable.
    The result carries no autograd history.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the gemv kernel is unavailable (disabled or failed to build); check available() first")
    reason = _unsupported_reason(lib, x, weight, bias)
    if reason is not None:
        raise ValueError(f"gemv: {reason}")
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is None:
        bias_ptr, bias_code = None, 0
    else:
        bias_ptr, bias_code = bias.data_ptr(), lib.dtype_codes[bias.dtype]
    N, K = weight.shape
    x_code = lib.dtype_codes[x.dtype]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    status = lib.gemv(
        x.data_ptr(), x_code, weight.data_ptr(), lib.dtype_codes[weight.dtype], bias_ptr, bias_code,
        y.data_ptr(), x_code, x.numel() // K, N, K, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"gemv kernel failed: {_ERRORS.get(status, status)}")
    return y
