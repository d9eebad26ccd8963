"""ERNIEKit / PaddleFormers LoRA adapters (`lora_config.json` + `peft_model.safetensors` (or its index,
`lora_model_state.safetensors`, `lora_model_state.pdparams`) applied to an ernie45 model as the PEFT-layout adapters
of `training.lora`, so they run, merge (`merge_lora`) and export like ours.

Paddle's LoRALinear (PaddleNLP/PaddleFormers peft/lora/lora_layers.py) on a Linear stored [in, out]: parameters
`<module>.lora_A` [in, r] and `<module>.lora_B` [r, out], y = x W + (x A B) * scaling, scaling = lora_alpha / r
(rslora: 4 / sqrt(r)). The modules are the Paddle layout's (`checkpoint.paddle_layout`): a LoRA on the fused
`qkv_proj` becomes one on each of q_proj / k_proj / v_proj with the same A and B's q | k | v columns, one on
`up_gate_proj` one on gate_proj / up_proj (gate columns first), and the per-expert `experts.{e}.up_gate_proj` /
`down_proj` pairs fill expert e's slice of the stacked expert adapters. PEFT's factors are the transposes:
lora_A [r, in] = A^T, lora_B [out, r] = B^T.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from .pdparams import read_pdparams

LORA_CONFIG = "lora_config.json"
SAFETENSORS_FILES = ("peft_model.safetensors", "lora_model_state.safetensors")
SAFETENSORS_INDEX = "peft_model.safetensors.index.json"
PDPARAMS_FILE = "lora_model_state.pdparams"
_UNSUPPORTED = ("use_mora", "pissa", "lora_use_mixer", "loraga", "use_quick_lora")
_NAME = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?ernie\.(.+)\.(lora_A|lora_B)$")
_EXPERT = re.compile(r"^(layers\.\d+\.mlp)\.experts\.(\d+)\.(up_gate_proj|down_proj)$")


def is_erniekit_adapter(directory: str | Path) -> bool:
    return (Path(directory) / LORA_CONFIG).is_file()


def read_config(directory: Path) -> dict:
    path = directory / LORA_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"{path}: {key} adapters are not supported (plain LoRA and rslora are)")
    if config.get("trainable_bias"):
        raise ValueError(f"{path}: trainable_bias adapters change the base biases; merge them with erniekit export")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise ValueError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    return config


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """name -> tensor (bf16 bits stored as uint16 viewed as bf16) from the adapter's weight file(s)."""
    files = []
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = [directory / f for f in SAFETENSORS_FILES if (directory / f).is_file()]
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[name] = f.get_tensor(name)
    if not files and (directory / PDPARAMS_FILE).is_file():
        raw = read_pdparams(directory / PDPARAMS_FILE)
        out = {k: torch.from_numpy(v.copy()) for k, v in raw.items()}
    if not out:
        raise FileNotFoundError(f"{directory}: no adapter weights ({', '.join(SAFETENSORS_FILES)}, "
                                f"{SAFETENSORS_INDEX} or {PDPARAMS_FILE})")
    return {k: v.view(torch.bfloat16) if v.dtype == torch.uint16 else v for k, v in out.items()}


def _pairs(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, t in tensors.items():
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"{where}: tensor {name} is not an ERNIEKit LoRA factor (`ernie.<module>.lora_A` / "
                             f"`.lora_B`, the Paddle layout's module names)")
        pairs[m.group(1)][m.group(2)] = t
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: module ernie.{module} has {', '.join(sorted(pair))} but not both "
                             f"lora_A, lora_B")
        if pair["lora_A"].dim() != 2 or pair["lora_B"].dim() != 2 or pair["lora_A"].shape[1] != pair["lora_B"].shape[0]:
            raise ValueError(f"{where}: ernie.{module}: lora_A {tuple(pair['lora_A'].shape)} and lora_B "
                             f"{tuple(pair['lora_B'].shape)} are not [in, r] and [r, out]")
    return pairs


def _split_targets(module: str, model) -> list[tuple[str, str]]:
    """(our Linear's name, the fused output rows it takes) for a Paddle module: 'all' or one of q/k/v/gate/up."""
    if module.endswith("self_attn.qkv_proj"):
        base = module[: -len("qkv_proj")]
        return [(f"model.{base}{p}_proj", p) for p in "qkv"]
    if module.endswith("up_gate_proj"):
        base = module[: -len("up_gate_proj")]
        return [(f"model.{base}gate_proj", "gate"), (f"model.{base}up_proj", "up")]
    return [(f"model.{module}", "all")]


def load_erniekit_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> dict:
    """Apply an ERNIEKit LoRA adapter to `model` (as `training.lora` LoRA modules); returns its lora_config."""
    from ..training.lora import apply_lora

    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    pairs = _pairs(read_tensors(adapter_dir), adapter_dir)
    r = int(config["r"])
    scaling = 4.0 / math.sqrt(r) if config.get("rslora") else config["lora_alpha"] / r
    experts = {m: p for m, p in pairs.items() if _EXPERT.match(m)}
    linears = {m: p for m, p in pairs.items() if m not in experts}
    targets = sorted({ours.rpartition(".")[2] for m in linears for ours, _ in _split_targets(m, model)})
    targets += sorted({f"experts.{'gate_up_proj' if _EXPERT.match(m).group(3) == 'up_gate_proj' else 'down_proj'}"
                       for m in experts})
    for m, pair in pairs.items():
        if pair["lora_A"].shape[1] != r:
            raise ValueError(f"{adapter_dir}: ernie.{m}.lora_A has rank {pair['lora_A'].shape[1]}, "
                             f"lora_config.json r={r}")
    apply_lora(model, targets, r, scaling * r, 0.0)  # LoraLinear's scaling is alpha / r
    modules = dict(model.named_modules())
    with torch.no_grad():
        for m, pair in linears.items():
            a, b = pair["lora_A"], pair["lora_B"]
            start = 0
            for ours, _ in _split_targets(m, model):
                lora = modules.get(ours)
                if lora is None or not hasattr(lora, "lora_A"):
                    raise ValueError(f"{adapter_dir}: ernie.{m} matches no module of this model ({ours} not found)")
                out = lora.out_features
                if a.shape[0] != lora.in_features or start + out > b.shape[1]:
                    raise ValueError(f"{adapter_dir}: ernie.{m}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                                     f"not fit {ours} [out {out}, in {lora.in_features}] of this model")
                lora.lora_A.weight.copy_(a.t())
                lora.lora_B.weight.copy_(b[:, start : start + out].t())
                start += out
            if start != b.shape[1]:
                raise ValueError(f"{adapter_dir}: ernie.{m}.lora_B has {b.shape[1]} columns, the model's fused module "
                                 f"{start}")
        _fill_experts(modules, experts, r, adapter_dir)
    return config


def _fill_experts(modules: dict, experts: dict, r: int, where: Path) -> None:
    by_layer: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for m, pair in experts.items():
        layer, e, which = _EXPERT.match(m).groups()
        by_layer[(layer, "gate_up_proj" if which == "up_gate_proj" else "down_proj")][int(e)] = pair
    for (layer, param), per_expert in by_layer.items():
        block = modules[f"model.{layer}"]
        lora_a, lora_b = block.experts.factors(param)
        num_experts = lora_a.weight.shape[0] // r
        if sorted(per_expert) != list(range(num_experts)):
            raise ValueError(f"{where}: ernie.{layer}.experts.*.{param}: adapters for experts {sorted(per_expert)}, "
                             f"the model has {num_experts}; ERNIEKit trains all or none")
        a_view = lora_a.weight.view(num_experts, r, -1)  # PEFT's ParamWrapper: A [E * r, in], B [out, r * E]
        b_view = lora_b.weight.view(lora_b.weight.shape[0], r, num_experts)
        for e, pair in per_expert.items():
            a_view[e].copy_(pair["lora_A"].t())
            b_view[:, :, e].copy_(pair["lora_B"].t())
