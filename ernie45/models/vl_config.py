"""Configuration of the ERNIE 4.5 VL models (``model_type: ernie4_5_vl_moe``), read from transformers' config.json.

The language model is an `Ernie45Config` (MoE, `mlp_layer_types`) plus the vision experts' width and the 3-D RoPE
split; the vision tower has its own `VisionConfig`. Unknown keys are kept and written back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Ernie45Config

VL_MODEL_TYPES = ("ernie4_5_vl_moe",)

# transformers' Ernie4_5_VLMoeTextConfig defaults (VL-28B-A3B), where they differ from the text models' defaults.
_TEXT_DEFAULTS = dict(
    vocab_size=103424,
    hidden_size=2560,
    intermediate_size=12288,
    num_hidden_layers=28,
    num_attention_heads=20,
    num_key_value_heads=4,
    moe_k=6,
    moe_num_experts=64,
    moe_num_shared_experts=2,
    rope_theta=500000.0,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)
# Ernie45Config fields transformers' VL text config does not have (left out of the written config).
_TEXT_ONLY_FIELDS = (
    "moe_layer_start_index",
    "moe_layer_end_index",
    "moe_layer_interval",
    "num_nextn_predict_layers",
    "compression_ratio",
    "architectures",
)
_SKIP_ON_WRITE = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype"}


@dataclass
class VisionConfig:
    """Hyperparameters of the ViT and of the resampler's merge sizes (transformers' `vision_config`)."""

    depth: int = 32
    """Transformer blocks."""
    hidden_size: int = 1280
    """Width of the vision residual stream."""
    intermediate_size: int = 5120
    """Width of the blocks' MLP."""
    num_heads: int = 16
    """Attention heads; head dim = hidden_size / num_heads, a multiple of 4 (2-D RoPE)."""
    in_channels: int = 3
    """Image channels."""
    patch_size: int = 14
    """Side of a square patch in pixels."""
    spatial_merge_size: int = 2
    """The resampler concatenates spatial_merge_size^2 neighbouring patches into one token."""
    temporal_merge_size: int = 2
    """The resampler concatenates this many frames (images are duplicated); ERNIE 4.5 VL uses 2."""
    hidden_act: str = "quick_gelu"
    """Activation of the blocks' MLP: quick_gelu (released) or gelu."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the vision LayerNorms and the resampler's LayerNorms (transformers' name)."""
    rope_theta: float = 10000.0
    """Base of the 2-D rotary embedding."""
    initializer_range: float = 0.02
    """Std of the normal init of fresh weights."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of `vision_config`, kept verbatim."""

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "spatial_merge_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json: vision_config.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"config.json: vision_config.hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) must be "
                "an integer multiple of 4 (2-D rotary embedding)"
            )
        if self.temporal_merge_size != 2:
            raise ValueError(
                f"config.json: vision_config.temporal_merge_size must be 2, got {self.temporal_merge_size}"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(
                f"config.json: vision_config.hidden_act {self.hidden_act!r} is not supported (quick_gelu, gelu)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VisionConfig":
        raw = dict(raw)
        raw.pop("model_type", None)
        for alias, name in (("num_attention_heads", "num_heads"), ("num_hidden_layers", "depth")):
            if alias in raw:
                raw.setdefault(name, raw.pop(alias))
        rope = raw.pop("rope_parameters", None)
        if isinstance(rope, dict) and "rope_theta" in rope:
            raw.setdefault("rope_theta", rope["rope_theta"])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in names}, extra={k: v for k, v in raw.items() if k not in names}
        )

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.extra.items() if k not in _SKIP_ON_WRITE}
        out.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "rope_theta")}
        )
        out["model_type"] = "ernie4_5_vl_moe_vision"
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return out


@dataclass
class Ernie45VLConfig:
    """An ERNIE 4.5 VL model: language model, vision tower, and the ids of the multimodal special tokens."""

    text: Ernie45Config
    """The MoE language model (text experts' width in `moe_intermediate_size`)."""
    vision: VisionConfig
    """The vision tower."""
    vision_moe_intermediate_size: int = 512
    """Width of each vision expert (second entry of transformers' `moe_intermediate_size`)."""
    mrope_section: tuple[int, int, int] = (22, 22, 20)
    """3-D RoPE frequency slots for (h, w, t); sums to head_dim / 2."""
    image_token_id: int = 100295
    """<|IMAGE_PLACEHOLDER|>: one per image token after the resampler."""
    image_start_token_id: int = 101304
    """<|IMAGE_START|>."""
    image_end_token_id: int = 101305
    """<|IMAGE_END|>."""
    video_token_id: int = 103367
    """Video placeholder token."""
    video_start_token_id: int = 101306
    """<|VIDEO_START|>."""
    video_end_token_id: int = 101307
    """<|VIDEO_END|>."""
    model_type: str = "ernie4_5_vl_moe"
    """Always `ernie4_5_vl_moe`."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other top-level keys of config.json, kept verbatim."""

    def __post_init__(self) -> None:
        if self.model_type not in VL_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {self.model_type!r} is not a VL model ({', '.join(VL_MODEL_TYPES)})"
            )
        if not self.text.has_moe_layers:
            raise ValueError("config.json: text_config needs moe_num_experts > 0 (ERNIE 4.5 VL is a MoE model)")
        if self.vision_moe_intermediate_size <= 0:
            raise ValueError(
                f"config.json: vision expert width must be positive, got {self.vision_moe_intermediate_size}"
            )
        self.mrope_section = tuple(self.mrope_section)
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.text.head_dim // 2:
            raise ValueError(
                f"config.json: rope_parameters.mrope_section {list(self.mrope_section)} must have 3 entries summing to "
                f"head_dim / 2 = {self.text.head_dim // 2}"
            )
        ids = [
            self.image_token_id,
            self.image_start_token_id,
            self.image_end_token_id,
            self.video_token_id,
            self.video_start_token_id,
            self.video_end_token_id,
        ]
        if any(not 0 <= i < self.text.vocab_size for i in ids):
            raise ValueError(
                f"config.json: multimodal token ids {ids} must lie in [0, vocab_size={self.text.vocab_size})"
            )

    def __getattr__(self, name: str):
        # Language-model settings (vocab_size, num_hidden_layers, eos_token_ids, ...) read through to `text`, so the
        # engine and the generation helpers size caches and stop ids from a VL config as from a text one.
        if name.startswith("__") or name in ("text", "vision"):
            raise AttributeError(name)
        return getattr(self.text, name)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def vision_token_ids(self) -> dict[int, int]:
        """token id -> modality type for the MoE routing (1 image, 2 video), start/end tokens included."""
        return {
            self.image_token_id: 1,
            self.image_start_token_id: 1,
            self.image_end_token_id: 1,
            self.video_token_id: 2,
            self.video_start_token_id: 2,
            self.video_end_token_id: 2,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Ernie45VLConfig":
        raw = dict(raw)
        text_raw = dict(raw.pop("text_config", None) or {})
        vision_raw = dict(raw.pop("vision_config", None) or {})
        for key, value in _TEXT_DEFAULTS.items():
            if key == "rope_theta" and "rope_parameters" in text_raw:
                continue
            text_raw.setdefault(key, value)
        widths = text_raw.pop("moe_intermediate_size", None) or [1536, 512]
        if isinstance(widths, int):
            widths = [widths, widths]
        rope = dict(text_raw.get("rope_parameters") or {})
        mrope = rope.pop("mrope_section", None) or [22, 22, 20]
        text_raw["rope_parameters"] = rope or None
        text_raw["model_type"] = "ernie4_5_moe"
        # transformers ties the head by the top-level flag (text_config's is ignored)
        text_raw["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
        layers = text_raw["num_hidden_layers"]
        text_raw.setdefault("mlp_layer_types", ["dense"] + ["sparse"] * (layers - 1))
        text_raw.setdefault("moe_layer_start_index", 0)
        text_raw["moe_intermediate_size"] = widths[0]
        text = Ernie45Config.from_dict(text_raw, source=f"{source} (text_config)")
        try:
            vision = VisionConfig.from_dict(vision_raw)
        except TypeError as exc:
            raise ValueError(f"{source}: invalid vision_config: {exc}") from exc
        raw.pop("tie_word_embeddings", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "text", "vision"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        return cls(
            text=text,
            vision=vision,
            vision_moe_intermediate_size=widths[1],
            mrope_section=tuple(mrope),
            **known,
            extra=extra,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "Ernie45VLConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json transformers reads (`Ernie4_5_VLMoeConfig`)."""
        text = {k: v for k, v in self.text.to_dict().items() if k not in _TEXT_ONLY_FIELDS}
        text["model_type"] = "ernie4_5_vl_moe_text"
        text["moe_intermediate_size"] = [self.text.moe_intermediate_size, self.vision_moe_intermediate_size]
        text["rope_parameters"]["mrope_section"] = list(self.mrope_section)
        if self.text.head_dim == self.text.hidden_size // self.text.num_attention_heads:
            text.pop("head_dim", None)
        text.pop("extra", None)
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in _SKIP_ON_WRITE}
        out["architectures"] = ["Ernie4_5_VLMoeForConditionalGeneration"]
        out["model_type"] = self.model_type
        for f in dataclasses.fields(self):
            if f.name not in ("text", "vision", "extra", "model_type", "vision_moe_intermediate_size", "mrope_section"):
                out[f.name] = getattr(self, f.name)
        out["tie_word_embeddings"] = self.text.tie_word_embeddings
        out["text_config"] = text
        out["vision_config"] = self.vision.to_dict()
        return out
