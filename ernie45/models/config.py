"""Model configuration read from a checkpoint's config.json (text models: ``ernie4_5`` and ``ernie4_5_moe``).

One dataclass covers the dense and the MoE family: a dense model is a MoE model with no MoE layers. Field names
follow transformers' config.json; Paddle-era aliases and extras are accepted and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("ernie4_5", "ernie4_5_moe")

# Paddle-era / remote-code spellings -> our field names.
_ALIASES = {"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k"}

# Keys transformers writes that carry no model hyperparameter for us; accepted, kept in `extra`.
_SKIP_ON_WRITE = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "auto_map"}


@dataclass
class Ernie45Config:
    """Hyperparameters of an ERNIE 4.5 text model (dense or MoE)."""

    model_type: str = "ernie4_5"
    """`ernie4_5` (dense) or `ernie4_5_moe`."""
    vocab_size: int = 103424
    """Rows of the embedding and of the LM head."""
    hidden_size: int = 1024
    """Width of the residual stream."""
    intermediate_size: int = 3072
    """Width of the dense SwiGLU MLPs (and of the MTP block's MLP)."""
    num_hidden_layers: int = 18
    """Decoder layers."""
    num_attention_heads: int = 16
    """Query heads."""
    num_key_value_heads: int | None = None
    """Key/value heads (GQA); None means one per query head."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    hidden_act: str = "silu"
    """MLP activation; ERNIE 4.5 uses silu only."""
    max_position_embeddings: int = 131072
    """Longest context the RoPE was trained for."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 500000.0
    """RoPE base; read from `rope_parameters.rope_theta` (transformers 5) or top-level `rope_theta`."""
    compression_ratio: float = 1.0
    """RoPE positions are divided by this (Paddle configs); 1.0 is off."""
    use_bias: bool = False
    """Bias on q/k/v/o and the MLP linears."""
    tie_word_embeddings: bool = True
    """LM head shares the embedding matrix."""
    pad_token_id: int | None = 0
    """Padding token id."""
    bos_token_id: int | None = 1
    """Beginning-of-sequence token id."""
    eos_token_id: int | list[int] | None = 2
    """End-of-sequence token id(s)."""
    initializer_range: float = 0.02
    """Std of the normal init used for fresh (untrained) weights."""
    # MoE
    moe_num_experts: int = 0
    """Routed experts per MoE layer (alias num_experts); 0 for dense models."""
    moe_k: int = 1
    """Experts chosen per token (alias num_experts_per_tok)."""
    moe_intermediate_size: int = 0
    """Width of each routed expert's SwiGLU MLP."""
    moe_num_shared_experts: int = 0
    """Shared experts; they form one SwiGLU of width moe_intermediate_size * this."""
    moe_layer_start_index: int = 0
    """First layer that may be MoE."""
    moe_layer_end_index: int = -1
    """Last layer that may be MoE; -1 means the last layer."""
    moe_layer_interval: int = 1
    """Layer i is MoE iff (i + 1) % interval == 0 within [start, end]."""
    moe_norm_min: float = 1e-12
    """Clamp of the routing-weight sum before renormalisation."""
    router_aux_loss_coef: float = 0.001
    """Coefficient of the load-balance loss (transformers' name)."""
    output_router_logits: bool = False
    """Whether transformers returns router logits; kept for round trips."""
    num_nextn_predict_layers: int = 0
    """Depth of the multi-token-prediction (MTP) block; 0 means none."""
    mlp_layer_types: list[str] | None = None
    """Per layer "dense" or "sparse" (transformers' VL field); when set it replaces the start/end/interval rule."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other key of config.json (Paddle extras such as moe_capacity or loss lambdas), kept verbatim."""

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act {self.hidden_act!r} is not supported (ERNIE 4.5 uses 'silu')")
        if self.moe_layer_end_index == -1:
            self.moe_layer_end_index = self.num_hidden_layers - 1
        if self.mlp_layer_types is not None:
            kinds = set(self.mlp_layer_types)
            if len(self.mlp_layer_types) != self.num_hidden_layers or kinds - {"dense", "sparse"}:
                raise ValueError(
                    "config.json: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                    f"{self.num_hidden_layers} layers, got {self.mlp_layer_types}"
                )
        if self.moe_layer_interval < 1:
            raise ValueError(f"config.json: moe_layer_interval must be >= 1, got {self.moe_layer_interval}")
        if self.has_moe_layers:
            if not 1 <= self.moe_k <= self.moe_num_experts:
                raise ValueError(f"config.json: moe_k ({self.moe_k}) must be in [1, moe_num_experts={self.moe_num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise ValueError("config.json: moe_intermediate_size must be positive for a MoE model")
        if self.compression_ratio <= 0:
            raise ValueError(f"config.json: compression_ratio must be positive, got {self.compression_ratio}")

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def has_moe_layers(self) -> bool:
        return self.model_type == "ernie4_5_moe" and self.moe_num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.mlp_layer_types is not None:
            return self.has_moe_layers and self.mlp_layer_types[layer_idx] == "sparse"
        return (
            self.has_moe_layers
            and (layer_idx + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= layer_idx <= self.moe_layer_end_index
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ---- IO ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Ernie45Config":
        raw = dict(raw)
        if "model_type" not in raw:
            raise ValueError(f"{source}: no 'model_type'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for alias, name in _ALIASES.items():
            if alias in raw:
                value = raw.pop(alias)
                raw.setdefault(name, value)
        rope = raw.pop("rope_parameters", None) or raw.pop("rope_scaling", None)
        if isinstance(rope, dict):
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (ERNIE 4.5 uses 'default')")
            if "rope_theta" in rope:
                raw.setdefault("rope_theta", rope["rope_theta"])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        if known.get("head_dim") is None:
            known.pop("head_dim", None)
        try:
            config = cls(**known, extra=extra)
        except TypeError as exc:  # wrong value types surface as TypeError inside __post_init__ comparisons
            raise ValueError(f"{source}: invalid value: {exc}") from exc
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "Ernie45Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found; a checkpoint directory needs one")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json transformers reads (rope under `rope_parameters`, extras kept)."""
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in _SKIP_ON_WRITE}
        is_moe = self.model_type == "ernie4_5_moe"
        out["architectures"] = ["Ernie4_5_MoeForCausalLM" if is_moe else "Ernie4_5ForCausalLM"]
        out["model_type"] = self.model_type
        for f in dataclasses.fields(self):
            if f.name in ("extra", "model_type", "rope_theta"):
                continue
            if f.name == "mlp_layer_types" and self.mlp_layer_types is None:
                continue
            if not is_moe and (f.name.startswith("moe_") or f.name in ("router_aux_loss_coef", "output_router_logits")):
                continue
            out[f.name] = getattr(self, f.name)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return out
