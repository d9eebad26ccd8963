"""What one weight is quantized to: bit width, group size, symmetric or not (validated where it is built)."""

from __future__ import annotations

from dataclasses import dataclass

from .packing import K_MULTIPLE, SUPPORTED_BITS

PER_CHANNEL = -1
"""group_size value meaning one group per output row (GPTQ's and FastDeploy's convention)."""


@dataclass(frozen=True)
class QuantSpec:
    """A weight-only quantization format."""

    bits: int
    """Bits per weight: 8, 4 or 2."""
    group_size: int = 128
    """Weights per scale along the input dim; -1 = per output channel."""
    symmetric: bool = False
    """Symmetric codes (zero point fixed at 2^(bits-1), no zeros stored) or asymmetric (a zero point per group)."""

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))} "
                f"(weight-only int8/int4/int2), got {self.bits}"
            )
        if self.group_size != PER_CHANNEL and (self.group_size <= 0 or self.group_size % K_MULTIPLE):
            raise ValueError(
                f"group size must be -1 (per channel) or a positive multiple of {K_MULTIPLE} "
                f"(the kernel reads 16 weights at a time), got {self.group_size}"
            )

    def group_size_for(self, in_features: int, name: str = "weight") -> int:
        """The group size for a weight with `in_features` inputs; ValueError if it does not divide them."""
        if in_features % K_MULTIPLE:
            raise ValueError(f"{name}: input dim {in_features} is not a multiple of {K_MULTIPLE}; cannot quantize it")
        if self.group_size == PER_CHANNEL:
            return in_features
        if in_features % self.group_size:
            raise ValueError(
                f"{name}: group size {self.group_size} does not divide its input dim {in_features}; "
                f"choose a group size that divides every quantized layer's input dim (or -1 for per-channel)"
            )
        return self.group_size

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, raw: dict, default: QuantSpec | None = None) -> QuantSpec:
        base = default.to_dict() if default else {}
        unknown = set(raw) - {"bits", "group_size", "symmetric"}
        if unknown:
            raise ValueError(
                f"unknown quantization key(s) {', '.join(sorted(unknown))}; use bits, group_size, symmetric"
            )
        return cls(**{**base, **raw})
