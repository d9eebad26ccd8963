"""Find a model's quantizable weights and swap quantized modules in (the model code is never forked).

Units: every nn.Linear (our `Linear`) by its module path, and each MoE `Experts` as two units,
`<path>.gate_up_proj` and `<path>.down_proj`, stacked over experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.moe import Experts
from .config import QuantizationConfig
from .packing import PackedWeight
from .quantized_linear import QuantizedExperts, QuantizedLinear
from .spec import QuantSpec


@dataclass(frozen=True)
class Unit:
    """A quantizable weight: `name` (module path), its owner module, and the dense weight [(E,) N, K]."""

    name: str
    owner_name: str
    owner: nn.Module
    attr: str
    """"weight" for a linear; "gate_up_proj" / "down_proj" for experts."""

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.attr) if isinstance(self.owner, Experts) else self.owner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return None if isinstance(self.owner, Experts) else self.owner.bias


def quantizable_units(model: nn.Module) -> dict[str, Unit]:
    """name -> Unit for every dense linear and expert projection not yet quantized."""
    units: dict[str, Unit] = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            continue
        if isinstance(module, Experts):
            for attr in ("gate_up_proj", "down_proj"):
                units[f"{name}.{attr}"] = Unit(f"{name}.{attr}", name, module, attr)
        elif isinstance(module, nn.Linear):
            units[name] = Unit(name, name, module, "weight")
    return units


def resolve_modules(model: nn.Module, config: QuantizationConfig) -> dict[str, QuantSpec]:
    """Every unit's format under `config` (units left unquantized omitted), validated against the weight shapes."""
    resolved: dict[str, QuantSpec] = {}
    by_owner: dict[str, list[str]] = {}
    for name, unit in quantizable_units(model).items():
        spec = config.spec_for(name)
        if spec is None:
            continue
        spec.group_size_for(unit.weight.shape[-1], name)  # raises ValueError with the reason
        resolved[name] = spec
        if isinstance(unit.owner, Experts):
            by_owner.setdefault(unit.owner_name, []).append(name)
    for owner, names in by_owner.items():
        if len(names) == 1:
            raise ValueError(
                f"{owner}: quantize both gate_up_proj and down_proj of the experts or neither (got {names[0]})"
            )
    return resolved


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def swap_in(model: nn.Module, packed: dict[str, tuple[PackedWeight, QuantSpec]]) -> nn.Module:
    """Replace each named unit by its quantized module, built from `packed` (name -> (weights, format))."""
    units = quantizable_units(model)
    done: set[str] = set()
    for name, (weight, spec) in packed.items():
        unit = units[name]
        if isinstance(unit.owner, Experts):
            if unit.owner_name in done:
                continue
            gate_up, down = (f"{unit.owner_name}.{a}" for a in ("gate_up_proj", "down_proj"))
            experts = QuantizedExperts(
                QuantizedLinear.from_packed(packed[gate_up][0], packed[gate_up][1]),
                QuantizedLinear.from_packed(packed[down][0], packed[down][1]),
            )
            _set_module(model, unit.owner_name, experts)
            done.add(unit.owner_name)
        else:
            bias = None if unit.bias is None else unit.bias.detach()
            _set_module(model, name, QuantizedLinear.from_packed(weight, spec, bias))
    return model


def swap_in_empty(model: nn.Module, modules: dict[str, QuantSpec]) -> nn.Module:
    """Replace each named unit by an empty quantized module of its format (for the loader to fill)."""
    units = quantizable_units(model)
    missing = sorted(set(modules) - set(units))
    if missing:
        raise ValueError(f"quantization_config names module(s) the model does not have: {', '.join(missing[:10])}")
    done: set[str] = set()
    for name, spec in modules.items():
        unit = units[name]
        device = unit.weight.device
        if isinstance(unit.owner, Experts):
            if unit.owner_name in done:
                continue
            built = {}
            for attr in ("gate_up_proj", "down_proj"):
                full = f"{unit.owner_name}.{attr}"
                if full not in modules:
                    raise ValueError(f"quantization_config quantizes {name} but not {full}")
                E, N, K = getattr(unit.owner, attr).shape
                built[attr] = QuantizedLinear(K, N, modules[full], num_experts=E, device=device, name=full)
            _set_module(model, unit.owner_name, QuantizedExperts(built["gate_up_proj"], built["down_proj"]))
            done.add(unit.owner_name)
        else:
            N, K = unit.weight.shape
            bias = unit.bias
            _set_module(
                model, name,
                QuantizedLinear(K, N, spec, bias is not None, None, bias.dtype if bias is not None else torch.float32,
                                device, name),
            )  # fmt: skip
    return model


def set_use_kernel(model: nn.Module, flag: bool) -> None:
    """Route every quantized module through the kernel (True) or the reference dequantize path (False)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernel = flag


def apply_quantization_config(model: nn.Module, raw: dict) -> nn.Module:
    """For the loader: swap in empty quantized modules for a checkpoint's `quantization_config` (as in
    config.json), so that its packed tensors load into them like any parameter."""
    return swap_in_empty(model, QuantizationConfig.from_dict(raw).modules)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every quantized module back for a dense one holding its dequantized weights (in place): the model the
    quantized one computes, for comparisons and for further training."""
    from ..models.layers import Linear

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedExperts):
            dense = Experts(model.config)
            gate_up = module.gate_up_proj.dequantized_weight()
            dense.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
            dense.down_proj = nn.Parameter(module.down_proj.dequantized_weight(), requires_grad=False)
            _set_module(model, name, dense)
        elif isinstance(module, QuantizedLinear) and module.qweight.dim() == 2:
            dense = Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = nn.Parameter(module.dequantized_weight(), requires_grad=False)
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
            _set_module(model, name, dense)
    model.config.extra.pop("quantization_config", None)
    return model
