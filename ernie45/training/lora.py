"""LoRA applied from outside the model: chosen `Linear`s become `LoraLinear` (same weight/bias parameters, plus
`lora_A` [r, in] and `lora_B` [out, r]); adapters save in PEFT's format (adapter_config.json +
adapter_model.safetensors, names `base_model.model.<HF module>.lora_A.weight`) so `peft.PeftModel.from_pretrained`
applies them to transformers' Ernie4_5*ForCausalLM; `merge_lora` folds them into the weights for export.

Routed experts are stacked tensors (not Linear modules, in transformers either) and the MTP block has no
transformers counterpart, so neither gets adapters.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.layers import Linear, linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraLinear(Linear):
    """y = x W^T + b + scaling * B(A(dropout(x))); W and b frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dt)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def _targets(model: nn.Module, target_modules: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        if ".mtp_" in name or name.startswith("lm_head"):
            continue
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and not isinstance(child, LoraLinear) and child_name in target_modules:
                found.append((module, child_name, child))
    return found


def apply_lora(model: nn.Module, target_modules: list[str], r: int, alpha: float, dropout: float = 0.0,
               seed: int = 0) -> list[str]:
    """Freeze the model and wrap every Linear named in `target_modules`; returns the wrapped module names.
    Init as PEFT: A kaiming-uniform(a=sqrt(5)), B zeros (the model's function is unchanged at start)."""
    targets = _targets(model, target_modules)
    if not targets:
        raise ValueError(f"lora_target_modules: no Linear module named {', '.join(target_modules)} in the model "
                         f"(valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    names = []
    module_names = {id(m): n for n, m in model.named_modules()}
    for parent, child_name, child in targets:
        lora = LoraLinear(child, r, alpha, dropout)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(lora.in_features)  # kaiming_uniform(a=sqrt(5)) bound
            lora.lora_A.weight.copy_(torch.empty_like(lora.lora_A.weight, device="cpu").uniform_(-bound, bound, generator=gen))
            lora.lora_B.weight.zero_()
        setattr(parent, child_name, lora)
        names.append(f"{module_names[id(parent)]}.{child_name}".lstrip("."))
    return names


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model's function (DPO's reference when training LoRA)."""
    mods = [m for _, m in lora_modules(model)]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


def adapter_state_dict(named_params) -> dict[str, torch.Tensor]:
    """PEFT names from our parameter names (ours mirror transformers' module paths)."""
    return {f"base_model.model.{n}": p.detach().cpu().contiguous() for n, p in named_params
            if ".lora_A." in n or ".lora_B." in n}


def save_adapter(state: dict[str, torch.Tensor], out_dir: Path, r: int, alpha: float, dropout: float,
                 target_modules: list[str], base_model: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(target_modules), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "modules_to_save": None, "base_model_name_or_path": base_model,
    }
    save_file(state, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Apply the adapter in `adapter_dir` (PEFT format) to `model`; returns its config."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT LoRA adapter directory")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_rslora"):
        raise ValueError(f"{cfg_path}: use_rslora adapters are not supported")
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    apply_lora(model, targets, config["r"], config["lora_alpha"], 0.0)
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        name = key.removeprefix("base_model.model.").replace(".default.", ".")
        if name not in params:
            raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} matches no LoRA parameter of the model")
        with torch.no_grad():
            params[name].copy_(tensor)
    return config


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W += scaling * B @ A, then each LoraLinear becomes a plain Linear again."""
    parents = {n: m for n, m in model.named_modules()}
    for name, mod in lora_modules(model):
        delta = (mod.lora_B.weight.float() @ mod.lora_A.weight.float()) * mod.scaling
        mod.weight.add_(delta.to(mod.weight.dtype))
        plain = Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        plain.weight, plain.bias = mod.weight, mod.bias
        parent_name, _, child = name.rpartition(".")
        setattr(parents[parent_name], child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
