"""LoRA applied from outside the model: chosen `Linear`s become `LoraLinear` (same weight/bias parameters, plus
`lora_A` [r, in] and `lora_B` [out, r]), and the routed experts' stacked weights, when named (`experts`,
`experts.gate_up_proj`, `experts.down_proj`), get `LoraExperts` adapters in the layout of PEFT's `target_parameters`
(one `ParamWrapper` per stacked parameter: `lora_A` [E * r, in], `lora_B` [out, r * E], expert e's factors
`A.view(E, r, in)[e]` and `B.view(out, r, E)[:, :, e]`). Adapters save in PEFT's format (adapter_config.json +
adapter_model.safetensors, names `base_model.model.<HF module>.lora_A.weight`) so `peft.PeftModel.from_pretrained`
applies them to transformers' Ernie4_5*ForCausalLM; `merge_lora` folds them into the weights for export.

The MTP block has no transformers counterpart, so it gets no adapters. On `ernie4_5_moe` models, peft (with
transformers 5) remaps the names gate_proj / up_proj / down_proj to the fused expert parameters, so adapters on the
shared-expert and dense MLP projections of a MoE model load in ernie45 and merge with `ernie45 export`, but not in
peft: attention (q/k/v/o_proj) and expert (`experts`) targets round-trip through peft for MoE models
(`peft_mismatch` names the case).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.layers import Linear, linear, silu_mul
from ..models.moe import Experts, MoeBlock

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


EXPERT_TARGETS = {"experts.gate_up_proj": ("gate_up_proj",), "experts.down_proj": ("down_proj",),
                  "experts": ("gate_up_proj", "down_proj")}


def expert_parameters(target_modules: list[str]) -> list[str]:
    """The stacked expert parameters the targets name, in PEFT's nesting order (the order transformers' experts
    module registers them: the first is wrapped innermost)."""
    wanted = {p for t in target_modules for p in EXPERT_TARGETS.get(t, ())}
    return [p for p in ("gate_up_proj", "down_proj") if p in wanted]


class _LowRankPair(nn.Module):
    """One stacked parameter's factors: lora_A [E * r, in], lora_B [out, r * E] (PEFT's ParamWrapper layout)."""

    def __init__(self, experts: int, r: int, in_features: int, out_features: int, like: torch.Tensor):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r * experts, bias=False, device=like.device, dtype=like.dtype)
        self.lora_B = nn.Linear(r * experts, out_features, bias=False, device=like.device, dtype=like.dtype)


class LoraExperts(Experts):
    """Routed experts with low-rank updates on `gate_up_proj` [E, 2I, H] and/or `down_proj` [E, H, I] (frozen):
    expert e computes x W_e^T + scaling * (x A_e^T) B_e^T on its tokens, never the [E, out, in] delta.

    Module names follow PEFT's nesting of one wrapper per targeted parameter: the last targeted parameter's factors
    are this module's `lora_A` / `lora_B`, the first's (when both are targeted) `base_layer.lora_A` / `lora_B`."""

    def __init__(self, base: Experts, parameters: list[str], r: int, alpha: float):
        nn.Module.__init__(self)
        self.num_experts, self.intermediate_size = base.num_experts, base.intermediate_size
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.r, self.scaling, self.enabled = r, alpha / r, True
        self.targets = list(parameters)
        pairs = {}
        for name in self.targets:
            E, out_features, in_features = getattr(self, name).shape
            pairs[name] = _LowRankPair(E, r, in_features, out_features, getattr(self, name))
        self.lora_A, self.lora_B = pairs[self.targets[-1]].lora_A, pairs[self.targets[-1]].lora_B
        if len(self.targets) == 2:
            self.base_layer = pairs[self.targets[0]]

    def factors(self, name: str) -> tuple[nn.Linear, nn.Linear]:
        holder = self if name == self.targets[-1] else self.base_layer
        return holder.lora_A, holder.lora_B

    def _update(self, name: str, e: int, x_MK: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.factors(name)
        A_rK = lora_A.weight.view(self.num_experts, self.r, -1)[e]
        B_Nr = lora_B.weight.view(lora_B.weight.shape[0], self.r, self.num_experts)[:, :, e]
        return linear(linear(x_MK, A_rK), B_Nr) * self.scaling

    def expert_forward(self, e: int, x_MH: torch.Tensor, weights: tuple | None = None) -> torch.Tensor:
        gate_up, down = weights if weights is not None else (self.gate_up_proj, self.down_proj)
        h = linear(x_MH, gate_up[e])
        if self.enabled and "gate_up_proj" in self.targets:
            h = h + self._update("gate_up_proj", e, x_MH)
        gate_MI, up_MI = h.chunk(2, dim=-1)
        a_MI = silu_mul(gate_MI, up_MI)
        y = linear(a_MI, down[e])
        if self.enabled and "down_proj" in self.targets:
            y = y + self._update("down_proj", e, a_MI)
        return y

    @torch.no_grad()
    def merged(self) -> Experts:
        """A plain `Experts` on the same (now updated) weights: W_e += scaling * B_e A_e for every expert."""
        for name in self.targets:
            lora_A, lora_B = self.factors(name)
            param = getattr(self, name)
            E, out_features, in_features = param.shape
            A_ErK = lora_A.weight.float().view(E, self.r, in_features)
            B_ENr = lora_B.weight.float().view(out_features, self.r, E).permute(2, 0, 1)
            param.add_((B_ENr @ A_ErK * self.scaling).to(param.dtype))
        plain = Experts.__new__(Experts)
        nn.Module.__init__(plain)
        plain.num_experts, plain.intermediate_size = self.num_experts, self.intermediate_size
        plain.gate_up_proj, plain.down_proj = self.gate_up_proj, self.down_proj
        return plain


def _expert_targets(model: nn.Module) -> list[tuple[str, MoeBlock]]:
    """The text MoE blocks (`...mlp`) of the decoder, not the MTP block's."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, MoeBlock) and n.endswith(".mlp") and ".mtp_" not in n]


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
    """Freeze the model and wrap every Linear named in `target_modules` (and the routed experts where `experts`,
    `experts.gate_up_proj` or `experts.down_proj` is named); returns the wrapped module names.
    Init as PEFT: A kaiming-uniform(a=sqrt(5)), B zeros (the model's function is unchanged at start)."""
    targets = _targets(model, target_modules)
    experts = expert_parameters(target_modules)
    moe_blocks = _expert_targets(model) if experts else []
    if not targets and not moe_blocks:
        raise ValueError(f"lora_target_modules: no Linear module or routed experts named {', '.join(target_modules)} "
                         f"in the model (valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; MoE "
                         f"models: experts, experts.gate_up_proj, experts.down_proj)")
    if moe_blocks and dropout:
        raise ValueError(f"lora_dropout: {dropout} with LoRA on the routed experts; set lora_dropout: 0 (PEFT's "
                         f"adapters on stacked expert weights cannot apply dropout to their input either)")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)

    def init_(lora_A: nn.Linear, lora_B: nn.Linear) -> None:
        with torch.no_grad():
            bound = 1.0 / math.sqrt(lora_A.in_features)  # kaiming_uniform(a=sqrt(5)) bound
            lora_A.weight.copy_(torch.empty_like(lora_A.weight, device="cpu").uniform_(-bound, bound, generator=gen))
            lora_B.weight.zero_()

    names = []
    module_names = {id(m): n for n, m in model.named_modules()}
    for parent, child_name, child in targets:
        lora = LoraLinear(child, r, alpha, dropout)
        init_(lora.lora_A, lora.lora_B)
        setattr(parent, child_name, lora)
        names.append(f"{module_names[id(parent)]}.{child_name}".lstrip("."))
    for block_name, block in moe_blocks:
        block.experts = LoraExperts(block.experts, experts, r, alpha)
        for name in experts:
            init_(*block.experts.factors(name))
        names.append(f"{block_name}.experts")
    return names


PEFT_MOE_REMAPPED = ("gate_proj", "up_proj", "down_proj")


def peft_mismatch(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Targets whose adapters peft would not apply to transformers' version of this model (see the module doc)."""
    if getattr(model.config, "model_type", "") != "ernie4_5_moe":
        return []
    return [t for t in target_modules if t in PEFT_MOE_REMAPPED]


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear | LoraExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))]


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
        "target_modules": sorted(t for t in target_modules if t not in EXPERT_TARGETS), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "modules_to_save": None, "base_model_name_or_path": base_model,
    }
    if experts := expert_parameters(target_modules):
        config["target_parameters"] = [f"mlp.experts.{name}" for name in experts]
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
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    for key in config.get("target_parameters") or []:
        name = "experts." + key.rpartition(".")[2]
        if not key.endswith(f"experts.{key.rpartition('.')[2]}") or name not in EXPERT_TARGETS:
            raise ValueError(f"{cfg_path}: target_parameters entry {key!r} is not a routed-expert weight "
                             f"(mlp.experts.gate_up_proj or mlp.experts.down_proj)")
        targets.append(name)
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
    """W += scaling * B @ A, then each LoraLinear becomes a plain Linear again (and LoraExperts plain Experts)."""
    parents = {n: m for n, m in model.named_modules()}
    for name, mod in lora_modules(model):
        parent_name, _, child = name.rpartition(".")
        if isinstance(mod, LoraExperts):
            setattr(parents[parent_name], child, mod.merged())
            continue
        delta = (mod.lora_B.weight.float() @ mod.lora_A.weight.float()) * mod.scaling
        mod.weight.add_(delta.to(mod.weight.dtype))
        plain = Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        plain.weight, plain.bias = mod.weight, mod.bias
        setattr(parents[parent_name], child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
