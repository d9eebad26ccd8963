"""The VL processor: image and video processors read from a checkpoint directory, and the expansion of one image /
video placeholder per item into as many placeholder tokens as the resampler produces, with the token-type rows the
model takes (`mm_token_type_ids`: placeholders only; `moe_mm_token_type_ids`: plus start/end tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..models.vl_config import Ernie45VLConfig
from .image_processor import ImageProcessor
from .video_processor import VideoProcessor

PROCESSOR_FILE = "processor_config.json"
IMAGE_FILE = "preprocessor_config.json"
VIDEO_FILE = "video_preprocessor_config.json"
_SHARED_KEYS = ("image_mean", "image_std", "rescale_factor", "patch_size", "merge_size")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def load_processors(directory: str | Path) -> tuple[ImageProcessor, VideoProcessor]:
    """Image and video processors of a checkpoint, as transformers finds their settings: the nested
    processor_config.json first, then preprocessor_config.json (image) and video_preprocessor_config.json (video,
    else the normalisation and patch settings of the image file); defaults (the released settings) otherwise."""
    directory = Path(directory)
    nested = _read_json(directory / PROCESSOR_FILE) or {}
    image_raw = nested.get("image_processor") or _read_json(directory / IMAGE_FILE) or {}
    video_raw = nested.get("video_processor") or _read_json(directory / VIDEO_FILE)
    if video_raw is None:  # only what images and videos share; sizes and temporal patching differ
        video_raw = {k: v for k, v in image_raw.items() if k in _SHARED_KEYS}
    try:
        return ImageProcessor.from_dict(image_raw), VideoProcessor.from_dict(video_raw, directory)
    except TypeError as exc:
        raise ValueError(f"{directory}: invalid preprocessor settings: {exc}") from exc


def expand_placeholders(
    input_ids: list[int],
    config: Ernie45VLConfig,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Token ids with ONE placeholder per image / video (in order) -> model inputs [1, T]: each placeholder repeated
    t*h*w / merge^2 times (videos: / temporal merge too), plus both token-type rows."""
    merge = config.vision.spatial_merge_size**2
    counts = {
        config.image_token_id: iter([] if image_grid_thw is None else (image_grid_thw.prod(-1) // merge).tolist()),
        config.video_token_id: iter(
            []
            if video_grid_thw is None
            else (video_grid_thw.prod(-1) // merge // config.vision.temporal_merge_size).tolist()
        ),
    }
    out: list[int] = []
    for token in input_ids:
        if token in counts:
            try:
                out.extend([token] * next(counts[token]))
            except StopIteration:
                kind = "image" if token == config.image_token_id else "video"
                raise ValueError(f"more {kind} placeholders in the prompt than {kind}s given") from None
        else:
            out.append(token)
    for token, rest in counts.items():
        if next(rest, None) is not None:
            kind = "image" if token == config.image_token_id else "video"
            raise ValueError(f"more {kind}s given than {kind} placeholders in the prompt")
    ids = torch.tensor([out])
    mm = torch.zeros_like(ids)
    mm[ids == config.image_token_id] = 1
    mm[ids == config.video_token_id] = 2
    moe = torch.zeros_like(ids)
    for token, kind in config.vision_token_ids.items():
        moe[ids == token] = kind
    return {"input_ids": ids, "mm_token_type_ids": mm, "moe_mm_token_type_ids": moe}
