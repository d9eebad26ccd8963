"""ERNIE 4.5 model definitions (single-device, engine- and trainer-agnostic)."""

from .attention import AttentionBackend, CausalAttention
from .config import SUPPORTED_MODEL_TYPES, Ernie45Config
from .ernie45 import Ernie45ForCausalLM, Ernie45Model
from .ernie45_vl import Ernie45VLForConditionalGeneration
from .registry import MODEL_TYPES, ModelSpec, spec_for
from .vl_config import VL_MODEL_TYPES, Ernie45VLConfig, VisionConfig

__all__ = [
    "MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "AttentionBackend",
    "CausalAttention",
    "Ernie45Config",
    "Ernie45ForCausalLM",
    "Ernie45Model",
    "Ernie45VLConfig",
    "Ernie45VLForConditionalGeneration",
    "ModelSpec",
    "VL_MODEL_TYPES",
    "VisionConfig",
    "spec_for",
]
