"""Checkpoint IO: HF safetensors layout in and out."""

from .hub import resolve_model_path
from .loader import build_empty_model, load_model
from .saver import save_model
from .vl_loader import build_empty_vl_model

__all__ = ["build_empty_model", "build_empty_vl_model", "load_model", "resolve_model_path", "save_model"]
