"""The packed weight format: integer codes along K packed into bytes, a scale and a zero point per group.

w[n, k] = (q[n, k] - z[n, g]) * s[n, g] with g = k // group_size and q in [0, 2^bits). s is fp16; z is stored as
uint8 in steps of 2^bits / 256 (integral zero points exactly; fitted fractional ones, as HQQ's, to 1/64 of a
step at 2 bits): 2.375 bits per weight at 2-bit group 64 where an fp16 zero point would make it 2.5. Symmetric
formats have no stored zero point (z = 2^(bits-1) for every group). Codes are packed per row in blocks of 16
bytes; a block holds 16 * 8/bits consecutive weights, byte j's bit field s holding weight s*16 + j of the block,
so the CPU kernel (kernels/qgemv.c) gets 16 consecutive weights from one load and one shift. Rows are padded
to whole blocks.

Legend: N output features (rows), K input features, G groups per row, E experts (optional leading dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (8, 4, 2)
BLOCK_BYTES = 16
"""Bytes per packing block (one SIMD load in the kernel)."""
K_MULTIPLE = 16
"""K and group sizes must be multiples of this: the kernel works on 16 consecutive weights at a time."""


def codes_per_byte(bits: int) -> int:
    return 8 // bits


def row_bytes(in_features: int, bits: int) -> int:
    """Bytes per packed row: K rounded up to whole blocks."""
    per_block = BLOCK_BYTES * codes_per_byte(bits)
    return -(-in_features // per_block) * BLOCK_BYTES


def pack_codes(q_NK: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., N, K] in [0, 2^bits) -> packed uint8 [..., N, row_bytes(K, bits)]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    *lead, K = q_NK.shape
    per = codes_per_byte(bits)
    padded_K = row_bytes(K, bits) * per
    q = torch.zeros(*lead, padded_K, dtype=torch.uint8, device=q_NK.device)
    q[..., :K] = q_NK.to(torch.uint8)
    # [..., blocks, per (bit field), 16 (byte in block)]: weight s*16 + j of a block lives in byte j, field s.
    q = q.view(*lead, padded_K // (per * BLOCK_BYTES), per, BLOCK_BYTES)
    packed = torch.zeros(*lead, q.shape[-3], BLOCK_BYTES, dtype=torch.uint8, device=q_NK.device)
    for field in range(per):
        packed |= q[..., field, :] << (field * bits)
    return packed.view(*lead, -1)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: packed uint8 [..., N, row_bytes] -> codes uint8 [..., N, K]."""
    *lead, nbytes = packed.shape
    per = codes_per_byte(bits)
    blocks = packed.view(*lead, nbytes // BLOCK_BYTES, 1, BLOCK_BYTES)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).view(per, 1)
    q = (blocks >> shifts) & ((1 << bits) - 1)
    return q.reshape(*lead, nbytes * per)[..., :in_features]


@dataclass
class PackedWeight:
    """One quantized weight (or E stacked ones): what a checkpoint stores and the kernel reads."""

    qweight: torch.Tensor
    """uint8 [..., N, row_bytes]: packed codes."""
    scales: torch.Tensor
    """fp16 [..., N, G]."""
    zeros: torch.Tensor | None
    """uint8 [..., N, G] encoded zero points (`decode_zeros`), or None for symmetric (z = 2^(bits-1))."""
    bits: int
    group_size: int
    """Weights per group along K (== in_features for per-channel)."""
    in_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def symmetric_zero(bits: int) -> float:
    return float(1 << (bits - 1))


def zero_step(bits: int) -> float:
    """Resolution of stored zero points: 256 steps over the code range [0, 2^bits)."""
    return (1 << bits) / 256.0


def encode_zeros(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points (code units, in [0, 2^bits - 1]) -> uint8."""
    return (z.float() / zero_step(bits)).round().clamp(0, 255).to(torch.uint8)


def decode_zeros(z_u8: torch.Tensor, bits: int) -> torch.Tensor:
    return z_u8.float() * zero_step(bits)


def round_zeros(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points rounded to what `encode_zeros` stores (for methods that fit fractional ones)."""
    return decode_zeros(encode_zeros(z, bits), bits)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference path (any device): packed codes -> weight [..., N, K] in `dtype`, computed in fp32."""
    q = unpack_codes(qweight, bits, in_features).float()
    *lead, N, K = q.shape
    q_NGS = q.view(*lead, N, K // group_size, group_size)
    z = symmetric_zero(bits) if zeros is None else decode_zeros(zeros, bits)[..., None]
    w = (q_NGS - z) * scales.float()[..., None]
    return w.view(*lead, N, K).to(dtype)
