"""VL generation is `generate.generate` / `stream_generate` (one loop for every family, media passed as keyword
arguments); these names stay for callers that import them from here."""

from __future__ import annotations

from .generate import generate as generate_vl
from .generate import stream_generate as stream_generate_vl

__all__ = ["generate_vl", "stream_generate_vl"]
