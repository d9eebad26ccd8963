"""Building blocks shared by every ERNIE 4.5 model: linear with a CPU dtype policy, RMSNorm, SwiGLU MLP, RoPE.

Legend: B batch, T tokens, H hidden, D head dim, I intermediate.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import decode_ops
from ..kernels import gemv as gemv_kernel
from . import training_linear

# Below this many rows a half-precision matmul is a memory-bound GEMV, where half-precision storage wins (half the
# bytes); above it the matmul is compute-bound, and CPUs without native bf16/fp16 arithmetic are 10-100x slower in
# half precision than in fp32, so the weight is upcast for that call.
_HALF_GEMV_MAX_ROWS = 16
# Up to this many rows the GEMV kernel, run per 16-row chunk, beats torch's GEMM on the CPU (batched decode).
_GEMV_CHUNKED_MAX_ROWS = 64


@functools.lru_cache(maxsize=None)
def cpu_has_fast_half(dtype: torch.dtype) -> bool:
    """Whether this CPU computes `dtype` matmuls natively (AVX512-BF16 / AMX / AVX512-FP16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    if dtype == torch.bfloat16:
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return "avx512_fp16" in flags or "amx_fp16" in flags


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, routed on the CPU by how many rows x has.

    - <= 16 rows without autograd (decode): our GEMV kernel, which streams the weight once at close to memory
      bandwidth (torch's small-M matmuls reach about half of it);
    - many rows, half-precision weight, CPU without half arithmetic (prefill): the weight is upcast to fp32;
    - under autograd in fp32 (training), or more rows than the GEMV takes: `training_linear`, whose GEMMs run on
      OpenBLAS where it is faster than torch's (kernels.blas; `ERNIE45_BLAS` chooses).
    """
    if weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    in_features = weight.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    if 0 < rows <= _GEMV_CHUNKED_MAX_ROWS and not needs_grad:
        x2d = x.reshape(rows, in_features)
        chunk = gemv_kernel.MAX_ROWS
        if gemv_kernel.supports(x2d[:chunk], weight, bias):
            if rows <= chunk:
                return gemv_kernel.gemv(x2d, weight, bias).view(*x.shape[:-1], weight.shape[0])
            # Batched decode: the kernel per 16 rows (the weight is read once per chunk) beats torch's small-M GEMM
            # here (benchmarks/results/2026-11-27-engine-throughput.md).
            out = torch.cat([gemv_kernel.gemv(x2d[i : i + chunk], weight, bias) for i in range(0, rows, chunk)])
            return out.view(*x.shape[:-1], weight.shape[0])
    # Many rows without autograd (prefill, MoE experts' grouped GEMMs) too: OpenBLAS's GEMM where `kernels.blas`
    # enables it beat torch's MKL by 10-50% at 32-384 rows here (Zen 5: 215-233 vs 170-205 GFLOP/s; issue 16).
    if (needs_grad or rows > _GEMV_CHUNKED_MAX_ROWS) and training_linear.takes(x, weight, bias):
        return training_linear.linear(x, weight, bias)
    if weight.dtype in (torch.bfloat16, torch.float16) and rows > _HALF_GEMV_MAX_ROWS and not cpu_has_fast_half(weight.dtype):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (CPU routing above). A plain nn.Linear subclass, so quantization and
    LoRA can swap or wrap it like any linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to the input dtype, then scaled (transformers' order)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = decode_ops.rms_norm(x, self.weight, self.eps)  # one C call where it applies (no autograd, CPU)
        if fused is not None:
            return fused[1]
        # F.rms_norm without a weight is x * rsqrt(mean(x^2) + eps) in one call (bit-equal to the four ops it
        # replaces in torch 2.13).
        x32 = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * x32.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)): the residual add before a norm, fused into one call where it applies."""
        fused = decode_ops.rms_norm(x, self.weight, self.eps, residual=delta)
        if fused is not None:
            return fused
        total = x + delta
        return total, self(total)


def shared_input_projections(x: torch.Tensor, modules: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of linears that read the same x (q/k/v, gate/up).

    Modules of one type that define `forward_group(x, modules)` may compute them together (the quantized decode
    kernel does: one call instead of three) or return None to decline; modules with hooks are called one by one
    so that their hooks run (calibration captures inputs that way).
    """
    kind = type(modules[0])
    group = getattr(kind, "forward_group", None)
    if group is not None and all(
        type(m) is kind and not (m._forward_hooks or m._forward_pre_hooks) for m in modules
    ):
        outputs = group(x, modules)
        if outputs is not None:
            return outputs
    return tuple(m(x) for m in modules)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input_projections(x, (self.gate_proj, self.up_proj))
        return self.down_proj(silu_mul(gate, up))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up: SwiGLU's activation, one C call where it applies (no autograd, CPU)."""
    fused = decode_ops.silu_mul(gate, up)
    return fused if fused is not None else F.silu(gate) * up


class RotaryEmbedding(nn.Module):
    """Interleaved (GPT-J style) rotary embedding: frequency i rotates dims (2i, 2i+1), computed in fp32."""

    def __init__(self, head_dim: int, theta: float, compression_ratio: float = 1.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.compression_ratio = compression_ratio

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] -> the interleaved tables (`interleaved_tables`), each [..., T, D] fp32."""
        pos = positions.float()
        if self.compression_ratio != 1.0:
            pos = pos / self.compression_ratio
        freqs = pos[..., None] * self.inv_freq.float()
        return interleaved_tables(freqs.cos(), freqs.sin())


def interleaved_tables(cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency cos / sin [..., T, D/2] -> (cos, signed sin) [..., T, D] for `apply_rotary`: cos repeated per
    pair, sin as (-sin, +sin) per pair. Built once per forward and shared by every layer, they make the rotation
    x * cos + swap_pairs(x) * sin: five ops per call instead of ten (13 vs 28 us at decode, 36 calls a step at the
    0.3B shape), with the same roundings (x0 c - x1 s and x1 c + x0 s, the negation being exact)."""
    return cos_TF.repeat_interleave(2, dim=-1), torch.stack((-sin_TF, sin_TF), dim=-1).flatten(-2)


class MRotaryEmbedding(RotaryEmbedding):
    """3-D rotary of the VL language model: positions (t, h, w). Frequency slot i < h+w takes the h position (even i)
    or the w position (odd i); the last `t` slots take t; slot i still rotates dims (2i, 2i+1) with frequency i.

    `mrope_section` = (h, w, t) slot counts as in transformers' `rope_parameters.mrope_section` ((22, 22, 20) released).
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, int, int]):
        super().__init__(head_dim, theta)
        h, w, t = mrope_section
        if h != w or h + w + t != head_dim // 2:
            raise ValueError(
                f"mrope_section {list(mrope_section)} must be [n, n, m] with 2n + m = head_dim / 2 = {head_dim // 2}"
            )
        axis = torch.tensor([1 + i % 2 for i in range(h + w)] + [0] * t)  # 0 = t, 1 = h, 2 = w
        self.register_buffer("axis_of_slot", axis, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, ..., T] (t, h, w) or text-only [..., T] -> the interleaved tables, each [..., T, D] fp32."""
        if positions.dim() < 2 or positions.shape[0] != 3:
            positions = positions.unsqueeze(0).expand(3, *positions.shape)
        freqs_3TF = positions.float()[..., None] * self.inv_freq.float()
        index = self.axis_of_slot.view(1, *([1] * (freqs_3TF.dim() - 2)), -1).expand(1, *freqs_3TF.shape[1:])
        freqs = freqs_3TF.gather(0, index)[0]
        return interleaved_tables(freqs.cos(), freqs.sin())


def apply_rotary(
    x_BTND: torch.Tensor, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the angle of frequency i (interleaved, the language models; cos / sin are
    `interleaved_tables` [B, T, D]), or pairs (x[i], x[i + D/2]) (half rotation, the vision tower; per-frequency
    cos / sin [B, T, D/2]); returns the input dtype."""
    cos, sin = cos_BTF.unsqueeze(-2), sin_BTF.unsqueeze(-2)  # broadcast over heads
    if not interleaved:
        x1, x2 = x_BTND.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x_BTND.dtype)
    x = x_BTND.float()
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    return (x * cos + swapped * sin).to(x_BTND.dtype)
