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
from ..models.layers import linear, silu_mul
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


_PACKED_TENSORS = frozenset(("qweight", "scales", "qzeros", "bias"))


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
        self._kernel_calls: dict[int | None, tuple[int, qgemv_kernel.PreparedQgemv]] = {}
        """expert (None: the whole weight) -> (`_version` when prepared, the prepared kernel call)."""
        self._group_calls: dict[int, tuple[tuple, qgemv_kernel.PreparedQgemv]] = {}
        """For `forward_group` led by this module: group size -> (the group's identity, the prepared call)."""

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _PACKED_TENSORS:
            self._tensors_replaced()

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)  # .to(), .float(), ...: new tensors, or old ones swapped in place
        self._tensors_replaced()
        return result

    def _tensors_replaced(self) -> None:
        """Prepared kernel calls point at the packed tensors: a new `_version` makes every call that includes this
        module prepare again. Assignment and `_apply` come here; loading in place (`copy_`) keeps the pointers
        valid; swapping storage behind the module's back (`param.data = ...`) is not tracked."""
        self.__dict__["_version"] = self.__dict__.get("_version", 0) + 1

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

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) prepare their own calls: these point at this module's tensors.
        return {**super().__getstate__(), "_kernel_calls": {}, "_group_calls": {}}

    def _kernel_call(self, expert: int | None) -> qgemv_kernel.PreparedQgemv | None:
        """The prepared kernel call for the weight (or one expert's), rebuilt after `_tensors_replaced`; None when
        the kernel does not take these tensors (not on the CPU, unsupported bias dtype)."""
        version = self._version
        cached = self._kernel_calls.get(expert)
        if cached is None or cached[0] != version:
            w = self.packed(expert)
            bias = self.bias if expert is None else None
            if not qgemv_kernel.takes_weight(w.qweight, bias):
                return None
            call = qgemv_kernel.PreparedQgemv([(w.qweight, w.scales, w.zeros, bias)], w.bits, w.group_size)
            self._kernel_calls[expert] = cached = (version, call)
        return cached[1]

    def _matmul(self, x: torch.Tensor, expert: int | None) -> torch.Tensor:
        # Per-call cost matters here (~60 calls per decode step): cheap checks on x, the weight's once per prepare.
        if self.use_kernel and qgemv_kernel.takes_input(x) and (call := self._kernel_call(expert)) is not None:
            return call(x)[0]
        return quantized_matmul(x, self.packed(expert), self.bias if expert is None else None, use_kernel=False)

    @staticmethod
    def forward_group(x: torch.Tensor, modules: tuple[QuantizedLinear, ...]) -> tuple[torch.Tensor, ...] | None:
        """Outputs of several quantized linears of the same x in one kernel call (`models.layers.
        shared_input_projections`), or None when the kernel does not take them together (prefill rows, mixed
        formats, the reference path forced): the caller then runs each module."""
        if not qgemv_kernel.takes_input(x):
            return None
        first = modules[0]
        key = tuple([(id(m), m._version, m.use_kernel) for m in modules])
        cached = first._group_calls.get(len(modules))
        if cached is None or cached[0] != key:
            call = QuantizedLinear.prepare_group(modules)
            if call is None:
                return None
            first._group_calls[len(modules)] = cached = (key, call)
        return cached[1](x)

    @staticmethod
    def prepare_group(modules: tuple[QuantizedLinear, ...]) -> qgemv_kernel.PreparedQgemv | None:
        """One prepared kernel call for linears of the same x (same bits, group size and input width, kernel on,
        2-D CPU weights), or None when they cannot share one."""
        first = modules[0]
        if not all(
            m.use_kernel and m.qweight.dim() == 2 and m.spec.bits == first.spec.bits
            and m.group_size == first.group_size and m.in_features == first.in_features
            and qgemv_kernel.takes_weight(m.qweight, m.bias)
            for m in modules
        ):  # fmt: skip
            return None
        return qgemv_kernel.PreparedQgemv(
            [(m.qweight, m.scales, m.qzeros, m.bias) for m in modules], first.spec.bits, first.group_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight.dim() != 2:
            raise RuntimeError("stacked expert weights: call forward_expert(e, x)")
        return self._matmul(x, None)

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, expert)

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
        return self.down_proj.forward_expert(e, silu_mul(gate_MI, up_MI))

    def set_use_kernel(self, flag: bool) -> None:
        self.gate_up_proj.use_kernel = self.down_proj.use_kernel = flag
