"""ERNIE 4.5 model definitions (single-device, engine- and trainer-agnostic)."""

from .attention import AttentionBackend, CausalAttention
from .config import SUPPORTED_MODEL_TYPES, Ernie45Config
from .ernie45 import Ernie45ForCausalLM, Ernie45Model

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AttentionBackend",
    "CausalAttention",
    "Ernie45Config",
    "Ernie45ForCausalLM",
    "Ernie45Model",
]
