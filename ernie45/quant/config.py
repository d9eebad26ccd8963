"""`quantization_config` of a checkpoint: the method and default format, the per-module overrides (recipes such as
`mixed-2bit`), and the resolved format of every quantized module (what the loader rebuilds, never guessed).

Quantizable units are named by module path: linears (`model.layers.3.self_attn.q_proj`) and the stacked expert
projections (`model.layers.3.mlp.experts.gate_up_proj`, `...experts.down_proj`). Embeddings, norms and router
gates are never quantized; lm_head only when an override names it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .spec import PER_CHANNEL, QuantSpec

METHODS = ("rtn", "gptq", "hqq", "gptq-hqq", "gptq-refit")
RECIPES = ("mixed-2bit",)
QUANT_METHOD_NAME = "ernie45-weight-only"
"""`quant_method` written to config.json: names whose reader understands this layout."""
DEFAULT_GROUP_SIZE = {8: PER_CHANNEL, 4: 128, 2: 64}
"""8-bit per channel (FastDeploy wint8), 4-bit groups of 128, 2-bit groups of 64 (FastDeploy WINT2)."""
UNQUANTIZED_BY_DEFAULT = ("lm_head", "*embed_tokens*", "*norm*", "*.mlp.gate")


def default_spec(bits: int, group_size: int | None = None, symmetric: bool | None = None) -> QuantSpec:
    """The default format for `bits`: int8 symmetric per channel, int4/int2 asymmetric grouped."""
    if bits not in DEFAULT_GROUP_SIZE:
        raise ValueError(f"bits must be one of 8, 4, 2 (weight-only int8/int4/int2), got {bits}")
    return QuantSpec(
        bits=bits,
        group_size=DEFAULT_GROUP_SIZE[bits] if group_size is None else group_size,
        symmetric=(bits == 8) if symmetric is None else symmetric,
    )


@dataclass
class QuantizationConfig:
    """How a model is (to be) quantized."""

    method: str = "rtn"
    """rtn | gptq | hqq | gptq-hqq | gptq-refit: how codes and group parameters were chosen (the runtime format
    is the same for all)."""
    default: QuantSpec = field(default_factory=lambda: default_spec(4))
    """Format of every quantizable module no override matches."""
    overrides: dict[str, QuantSpec | None] = field(default_factory=dict)
    """fnmatch pattern on module names -> format, or None to keep the module unquantized; the last match wins."""
    recipe: str | None = None
    """The recipe that produced the overrides (recorded, not re-applied)."""
    act_order: bool = True
    """GPTQ methods: visit columns by decreasing Hessian diagonal (with groups fixed up front)."""
    modules: dict[str, QuantSpec] = field(default_factory=dict)
    """Resolved format of every quantized module (filled when quantizing; what the loader uses)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantization method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"recipe {self.recipe!r} is not one of {', '.join(RECIPES)}")

    def spec_for(self, module_name: str) -> QuantSpec | None:
        """The format for a quantizable module, or None to leave it unquantized."""
        chosen: QuantSpec | None = None if _matches_any(module_name, UNQUANTIZED_BY_DEFAULT) else self.default
        for pattern, spec in self.overrides.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                chosen = spec
        return chosen

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD_NAME,
            "method": self.method,
            "recipe": self.recipe,
            "act_order": self.act_order,
            **self.default.to_dict(),
            "overrides": {p: (None if s is None else s.to_dict()) for p, s in self.overrides.items()},
            "modules": {name: spec.to_dict() for name, spec in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict) -> QuantizationConfig:
        if raw.get("quant_method") != QUANT_METHOD_NAME:
            raise ValueError(
                f"quantization_config.quant_method is {raw.get('quant_method')!r}; this loader reads "
                f"{QUANT_METHOD_NAME!r} checkpoints (written by `ernie45 quantize`)"
            )
        try:
            default = QuantSpec(raw["bits"], raw["group_size"], raw["symmetric"])
            return cls(
                method=raw.get("method", "rtn"),
                default=default,
                overrides={
                    p: None if s is None else QuantSpec.from_dict(s) for p, s in raw.get("overrides", {}).items()
                },
                recipe=raw.get("recipe"),
                act_order=raw.get("act_order", True),
                modules={n: QuantSpec.from_dict(s) for n, s in raw.get("modules", {}).items()},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"quantization_config is malformed ({exc!r}); expected bits, group_size, symmetric, modules"
            ) from exc


def _matches_any(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def mixed_2bit_overrides(moe_layer_ids: list[int], group_size: int | None = None) -> dict[str, QuantSpec]:
    """FastDeploy's WINT2 layout: routed experts 2-bit (group 64), the first eighth of the MoE layers' experts
    4-bit (300B: MoE layers 0-6 of 54), attention, dense MLPs and shared experts int8 per channel."""
    overrides: dict[str, QuantSpec] = {
        "*.self_attn.*": default_spec(8),
        "*.mlp.*_proj": default_spec(8),  # dense MLP
        "*.shared_experts.*": default_spec(8),
        "*.mlp.experts.*": default_spec(2, group_size),
    }
    for layer in moe_layer_ids[: len(moe_layer_ids) // 8]:
        overrides[f"model.layers.{layer}.mlp.experts.*"] = default_spec(4, group_size)
    return overrides
