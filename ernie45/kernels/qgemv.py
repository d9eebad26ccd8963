"""Decode-time product with weight-only quantized weights on the CPU: y = x @ dequant(Wq)^T (+ bias), W read once
in its packed form (1, 1/2 or 1/4 byte per weight).

Built from `qgemv.c` at first use for the active ISA target and loaded through ctypes (kernels/build.py). Callers check `supports(...)`
and fall back to the reference dequantize path otherwise. Legend: M rows of x, N output features, K input features.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import build

SOURCE_PATH = Path(__file__).with_name("qgemv.c")
MAX_ROWS = 64
"""Most rows of x worth a call: beyond this the product is compute-bound and dequantize + GEMM wins."""

# Must match the enums in qgemv.c.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERRORS = {
    1: "unsupported dtype",
    2: "bad shape (K or group size not a multiple of 16, or short rows)",
    3: "out of memory",
}


EXTRA_FLAGS: tuple[str, ...] = ()
"""Flags this kernel adds to its target's."""


class QgemvWeight(ctypes.Structure):
    """One weight of an `ernie45_qgemv_many` call: must match `QgemvWeight` in qgemv.c."""

    _fields_ = [
        ("qweight", ctypes.c_void_p),
        ("row_bytes", ctypes.c_int64),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("zero_const", ctypes.c_float),
        ("bias", ctypes.c_void_p),
        ("bias_dtype", ctypes.c_int),
        ("y", ctypes.c_void_p),
        ("N", ctypes.c_int64),
    ]


MAX_WEIGHTS = 8
"""Most weights one grouped call takes (MAX_WEIGHTS in qgemv.c)."""


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    return ctypes.CFUNCTYPE(i32, ptr, i32, i32, i64, ctypes.POINTER(QgemvWeight), i32, i32, i64, i64, i32)(
        ("ernie45_qgemv_many", lib)
    )


@build.cached_loader
def _library() -> Callable[..., int] | None:
    """The kernel's entry point (`ernie45_qgemv_many`) built on first use; None (logged once) if disabled or the
    build fails."""
    return build.load_kernel(SOURCE_PATH, _bind, "quantized gemv kernel", "using the dequantize path", EXTRA_FLAGS)


def available() -> bool:
    """Whether the kernel is enabled and built (the first call compiles it; never raises)."""
    return _library() is not None


def supports(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `qgemv` takes these: kernel available, CPU, x fp32/bf16/fp16 with 1..MAX_ROWS rows, no autograd."""
    return takes_weight(qweight, bias) and takes_input(x)


def takes_weight(qweight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """The weight half of `supports` (checked once when a call is prepared)."""
    return qweight.is_cpu and (bias is None or (bias.is_cpu and bias.dtype in _DTYPE_CODES)) and available()


def takes_input(x: torch.Tensor) -> bool:
    """The input half of `supports` (checked on every call): CPU, fp32/bf16/fp16, 1..MAX_ROWS rows, no autograd."""
    if not (x.is_cpu and x.dtype in _DTYPE_CODES and x.dim() >= 1) or (torch.is_grad_enabled() and x.requires_grad):
        return False
    K = x.shape[-1]
    return K > 0 and 1 <= x.numel() // K <= MAX_ROWS and available()


def qgemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(qweight [N, row_bytes], scales fp16 / zeros uint8 [N, K/group_size])^T + bias, in
    x's dtype.

    Symmetric weights pass zeros=None (zero point 2^(bits-1)). With `uses_integer_path` (8-, 4- and 2-bit
    weights in groups of 64..4096) the kernel takes its integer path: x is rounded per group to 16-bit
    integers, so each output may differ from the fp32 product by up to sum_k |w_k| * max|x_group(k)| / 64770
    (`integer_path_error_bound`). Raises RuntimeError if the kernel is unavailable or rejects the shapes. The result carries no autograd history.
    """
    return PreparedQgemv([(qweight, scales, zeros, bias)], bits, group_size)(x)[0]


def _entry_point() -> Callable[..., int]:
    entry = _library()
    if entry is None:
        raise RuntimeError("the quantized gemv kernel is unavailable (disabled or failed to build)")
    return entry


def _check_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bias: torch.Tensor | None) -> None:
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"qgemv: {name} must be contiguous")
    if scales.dtype != torch.float16 or (zeros is not None and zeros.dtype != torch.uint8):
        raise ValueError(
            f"qgemv: scales must be fp16 and zeros uint8, got {scales.dtype} and {getattr(zeros, 'dtype', None)}"
        )


class PreparedQgemv:
    """`qgemv` for one weight or several that share their input (q/k/v, gate/up; same bits and group size), with
    the arguments checked and converted once. A call then costs x's checks, the outputs' allocation and one C call
    (one parallel region, x prepared once): per call, a thread wake-up and x's preparation cost ~20 us, which at
    133 calls per 0.3B decode step were a tenth of an int4 step (61 calls grouped). `weights` holds
    (qweight, scales, zeros or None, bias or None) per weight; a call returns one output per weight. Holds
    references to the tensors it points at."""

    def __init__(
        self,
        weights: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
        bits: int,
        group_size: int,
    ):
        if not 1 <= len(weights) <= MAX_WEIGHTS:
            raise ValueError(f"qgemv: a grouped call takes 1..{MAX_WEIGHTS} weights, got {len(weights)}")
        self._fn = _entry_point()
        for qweight, scales, zeros, bias in weights:
            _check_weight(qweight, scales, zeros, bias)
        self._tensors = tuple(weights)
        self._bits, self._group_size = bits, group_size
        self.out_features = tuple(w[0].shape[0] for w in weights)
        self._structs = (QgemvWeight * len(weights))(*(
            QgemvWeight(
                qweight.data_ptr(), qweight.shape[-1], scales.data_ptr(), None if zeros is None else zeros.data_ptr(),
                float(1 << (bits - 1)), None if bias is None else bias.data_ptr(),
                0 if bias is None else _DTYPE_CODES[bias.dtype], None, qweight.shape[0],
            )
            for qweight, scales, zeros, bias in weights
        ))  # fmt: skip

    def bind_outputs(self, output_addresses: Sequence[int]) -> tuple[int, int]:
        """For a caller that runs the C entry point itself (the fused decode step writes into its own buffers):
        point weight i's output at `output_addresses[i]` for every later call made through the returned
        (entry point address, address of the weight descriptor array). Calling this object afterwards rebinds
        them to fresh tensors, so a prepared call serves one or the other."""
        if len(output_addresses) != len(self.out_features):
            raise ValueError(f"qgemv: {len(self.out_features)} outputs to bind, got {len(output_addresses)}")
        for struct, address in zip(self._structs, output_addresses):
            struct.y = address
        return ctypes.cast(self._fn, ctypes.c_void_p).value, ctypes.addressof(self._structs)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # ~60 calls per decode step: kept to the few tensor operations it needs.
        if not x.is_contiguous():
            x = x.contiguous()
        *lead, K = x.shape
        dtype = x.dtype
        ys = [torch.empty((*lead, n), dtype=dtype) for n in self.out_features]
        structs = self._structs
        for i, y in enumerate(ys):
            structs[i].y = y.data_ptr()
        code = _DTYPE_CODES[dtype]
        status = self._fn(
            x.data_ptr(), code, self._bits, self._group_size, structs, len(ys), code, x.numel() // K, K,
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"qgemv kernel failed: {_ERRORS.get(status, status)}")
        return tuple(ys)


def uses_integer_path(bits: int, group_size: int) -> bool:
    """Whether the kernel forms dot products in integers (on x86 with AVX2 or AVX-512 VNNI; any number of rows of
    x): 8-, 4- and 2-bit codes, group size a multiple of 64 (at most 4096)."""
    return bits in (8, 4, 2) and group_size % 64 == 0 and group_size <= 4096


def integer_path_error_bound(x: torch.Tensor, weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per output, the most the integer path's rounding of x can move x @ weight^T: sum_k |w_k| * max|x_g(k)| / 64770
    (x rounded to steps of max|x_g| / 32512, or / 32385 for 8-bit codes on AVX2: half a step at most); x [M, K],
    weight [N, K] dequantized."""
    group_max = x.float().abs().unflatten(-1, (-1, group_size)).amax(-1)
    return group_max.repeat_interleave(group_size, dim=-1) @ weight.float().abs().T / 64770

