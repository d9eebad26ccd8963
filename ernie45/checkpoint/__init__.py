"""Checkpoint IO: HF safetensors layout in and out, for every model family of `models.registry`."""

from .hub import resolve_model_path
from .loader import build_empty_model, load_model
from .saver import save_model

__all__ = ["build_empty_model", "load_model", "resolve_model_path", "save_model"]
