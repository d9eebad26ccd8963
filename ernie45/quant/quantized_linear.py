"""Runtime modules for packed weights: `QuantizedLinear` (one weight, or E stacked expert weights) and
`QuantizedExperts` (the grouped MoE experts with quantized gate_up/down projections).

Decode rows on the CPU go through our fused kernel (kernels/qgemv.c); everything else (prefill, GPU, autograd)
dequantizes the weight and runs a plain matmul: the reference path. Legend: M rows of x, N out, K in, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import qgemv as qgemv_kernel
from ..models.layers import linear
from ..models.moe import Experts
from .packing import PackedWeight, dequantize, row_bytes
from .spec import QuantSpec


def quantized_matmul(
    x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, use_kernel: bool = True
) -> torch.Tensor:
    """x [..., K] @ dequant(w)^T (+ bias): the kernel for CPU decode rows, else dequantize + matmul."""
    if use_kernel and w.qweight.dim() == 2 and qgemv_kernel.supports(x, w.qweight, bias):
        return qgemv_kernel.qgemv(x, w.qweight, w.scales, w.zeros, w.bits, w.group_size, bias)
    weight = dequantize(w.qweight, w.scales, w.zeros, w.bits, w.group_size, w.in_features, dtype=x.dtype)
    # `linear` keeps the CPU dtype policy (half-precision prefill upcast); off the CPU it is F.linear.
    return linear(x, weight, bias) if x.is_cpu else F.linear(x, weight, bias)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so that the loader and saver, which walk named_parameters, see them like any weight.
    return nn.Parameter(t, requires_grad=False)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored packed: qweight uint8 [(E,) N, row_bytes], scales fp16 [(E,) N, G],
    qzeros uint8 [(E,) N, G] (asymmetric formats only), optional bias. With a leading E dim it holds stacked expert
    weights, used through `forward_expert`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = False,
        num_experts: int | None = None,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "weight",
    ):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.group_size = spec.group_size_for(in_features, name)
        self.use_kernel = True
        """False forces the reference (dequantize) path: for tests and for comparing the two."""
        lead = () if num_experts is None else (num_experts,)
        groups = in_features // self.group_size
        self.qweight = _frozen(
            torch.zeros(*lead, out_features, row_bytes(in_features, spec.bits), dtype=torch.uint8, device=device)
        )
        self.scales = _frozen(torch.ones(*lead, out_features, groups, dtype=torch.float16, device=device))
        self.qzeros = (
            None
            if spec.symmetric
            else _frozen(torch.zeros(*lead, out_features, groups, dtype=torch.uint8, device=device))
        )
        self.bias = _frozen(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None

    @classmethod
    def from_packed(cls, packed: PackedWeight, spec: QuantSpec, bias: torch.Tensor | None = None) -> QuantizedLinear:
        *lead, N, _ = packed.scales.shape
        module = cls(
            packed.in_features, N, spec, bias is not None, lead[0] if lead else None,
            bias.dtype if bias is not None else torch.float32, packed.qweight.device,
        )  # fmt: skip
        if packed.group_size != module.group_size:
            raise ValueError(f"packed group size {packed.group_size} differs from the spec's {module.group_size}")
        with torch.no_grad():
            module.qweight.copy_(packed.qweight)
            module.scales.copy_(packed.scales)
            if module.qzeros is not None:
                module.qzeros.copy_(packed.zeros)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def packed(self, expert: int | None = None) -> PackedWeight:
        """The weight (or one expert's) as a PackedWeight view: no copies."""
        pick = (lambda t: t) if expert is None else (lambda t: t[expert])
        return PackedWeight(
            qweight=pick(self.qweight), scales=pick(self.scales),
            zeros=None if self.qzeros is None else pick(self.qzeros),
            bits=self.spec.bits, group_size=self.group_size, in_features=self.in_features,
        )  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight.dim() != 2:
            raise RuntimeError("stacked expert weights: call forward_expert(e, x)")
        return quantized_matmul(x, self.packed(), self.bias, self.use_kernel)

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return quantized_matmul(x, self.packed(expert), None, self.use_kernel)

    def extra_repr(self) -> str:
        experts = f", experts={self.qweight.shape[0]}" if self.qweight.dim() == 3 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
            f"group_size={self.group_size}, symmetric={self.spec.symmetric}, bias={self.bias is not None}{experts}"
        )


class QuantizedExperts(Experts):
    """`Experts` with packed weights: the same grouped forward (one product pair per active expert), each
    expert's product through QuantizedLinear.forward_expert. Parameter names: `gate_up_proj.qweight` [E, 2I, ...],
    `down_proj.qweight` [E, H, ...] (and .scales / .qzeros)."""

    def __init__(self, gate_up_proj: QuantizedLinear, down_proj: QuantizedLinear):
        nn.Module.__init__(self)  # Experts.__init__ would allocate the dense stacked weights
        self.num_experts = gate_up_proj.qweight.shape[0]
        self.intermediate_size = gate_up_proj.out_features // 2
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def unbound_weights(self) -> None:
        return None  # packed weights are not trained (QAT trains the dense model)

    def expert_forward(self, e: int, x_MH: torch.Tensor, weights: tuple | None = None) -> torch.Tensor:
        gate_MI, up_MI = self.gate_up_proj.forward_expert(e, x_MH).chunk(2, dim=-1)
        return self.down_proj.forward_expert(e, F.silu(gate_MI) * up_MI)

    def set_use_kernel(self, flag: bool) -> None:
        self.gate_up_proj.use_kernel = self.down_proj.use_kernel = flag
