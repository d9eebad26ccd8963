"""Quantization-aware training building blocks: fake-quantize chosen weights with a straight-through estimator
(STE), train as usual, then export the same packed format as post-training quantization.

The fake quantization is a torch parametrization on the weight tensors (nn.Linear `weight`, the experts' stacked
`gate_up_proj` / `down_proj`), so the model code is untouched and every forward sees quantize(dequantize(w)) while
the optimizer updates the full-precision w: forward uses RTN with grids from the current weights, backward passes
the gradient straight through the rounding (d fake(w) / dw = 1).

    prepare_qat(model, bits=2, group_size=64, targets=["*.mlp.experts.*"])
    ... train ...
    convert_qat(model)   # packed QuantizedLinear/QuantizedExperts swapped in, quantization_config recorded
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import QuantizationConfig, default_spec
from .modules import quantizable_units, swap_in
from .rtn import fake_quantize, rtn_quantize
from .spec import QuantSpec

DEFAULT_TARGETS = ("*.self_attn.*", "*.mlp.*")
"""Attention and MLP/expert linears: never embeddings, lm_head or router gates."""


class FakeQuantize(nn.Module):
    """Parametrization w -> w + (rtn(w) - w).detach(): quantized values forward, identity gradient backward."""

    def __init__(self, spec: QuantSpec, group_size: int):
        super().__init__()
        self.spec, self.group_size = spec, group_size

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (fake_quantize(w.detach(), self.spec, self.group_size) - w).detach()


def prepare_qat(
    model: nn.Module,
    bits: int,
    group_size: int | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    symmetric: bool | None = None,
) -> dict[str, QuantSpec]:
    """Fake-quantize every quantizable unit whose name matches one of `targets` (fnmatch patterns); returns the
    units and formats chosen (ValueError if none match or a group size does not divide a unit's input dim)."""
    spec = default_spec(bits, group_size, symmetric)
    chosen: dict[str, QuantSpec] = {}
    for name, unit in quantizable_units(model).items():
        if name == "lm_head" or not any(fnmatch.fnmatchcase(name, t) for t in targets):
            continue
        weight = unit.weight
        G = spec.group_size_for(weight.shape[-1], name)
        parametrize.register_parametrization(unit.owner, unit.attr, FakeQuantize(spec, G))
        chosen[name] = spec
    if not chosen:
        raise ValueError(f"no quantizable module matches targets {list(targets)}")
    model.qat_modules = chosen
    return chosen


def convert_qat(model: nn.Module, method: str = "rtn") -> nn.Module:
    """Remove the fake quantization (keeping the trained full-precision weights), pack them with the same RTN
    grids the training saw, and swap the quantized modules in; the config is recorded for saving."""
    chosen: dict[str, QuantSpec] = getattr(model, "qat_modules", None)
    if not chosen:
        raise ValueError("the model has no QAT modules: call prepare_qat first")
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    units = quantizable_units(model)
    packed = {name: (rtn_quantize(units[name].weight.detach(), spec, name), spec) for name, spec in chosen.items()}
    with torch.no_grad():
        swap_in(model, packed)
    specs = list(chosen.values())
    config = QuantizationConfig(method=method, default=specs[0], modules=dict(chosen))
    model.config.extra["quantization_config"] = config.to_dict()
    del model.qat_modules
    return model


def convert_qat_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """convert_qat, then the packed state dict (qweight/scales/qzeros per quantized unit, everything else as is)."""
    return convert_qat(model).state_dict()
