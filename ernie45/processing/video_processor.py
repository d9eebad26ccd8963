"""ERNIE 4.5 VL video processor, following transformers' `Ernie4_5_VLMoeVideoProcessor` step by step: frame sampling
(by target fps or frame count, within [min_frames, max_frames]), optional timestamps drawn on the frames, an odd
frame count padded with the last frame (temporal patch 2), smart resize with torch's antialiased bicubic on uint8
(torchvision's CPU path), fused rescale + CLIP normalisation, and patches in merge-window order per frame.
Legend: T frames, C channels, H/W pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .image_processor import CLIP_MEAN, CLIP_STD, patchify, smart_resize
from .media import MediaError, load_video

DEFAULT_SOURCE_FPS = 24.0  # transformers' fallback when a video's fps is unknown and timestamps are drawn


def timestamp_text(seconds: float) -> str:
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"time: {int(hours):02d}:{int(minutes):02d}:{seconds:05.02f}"


@dataclass
class VideoProcessor:
    """Settings of the video processor (transformers' video_preprocessor_config.json keys, `size` flattened)."""

    min_pixels: int = 299 * 28 * 28
    """Smallest resized frame area (transformers: size.shortest_edge)."""
    max_pixels: int = 1196 * 28 * 28
    """Largest resized frame area (transformers: size.longest_edge)."""
    patch_size: int = 14
    """Patch side in pixels."""
    merge_size: int = 2
    """Spatial merge of the resampler."""
    temporal_patch_size: int = 2
    """Frames merged per token; ERNIE 4.5 VL supports 2 only."""
    min_frames: int = 16
    """Fewest frames sampled (when the video has that many)."""
    max_frames: int = 180
    """Most frames sampled."""
    fps: float | None = None
    """Target sampling rate in frames per second; None keeps every frame (up to max_frames)."""
    num_frames: int | None = None
    """Fixed number of sampled frames (exclusive with fps)."""
    do_sample_frames: bool = True
    """Sample frames at all."""
    draw_on_frames: bool = True
    """Draw each frame's timestamp in its top-left corner (as the released processor does)."""
    font: str | None = "Roboto-Regular.ttf"
    """TrueType font for the timestamps: a path, or a file name in the checkpoint directory."""
    image_mean: tuple[float, ...] = CLIP_MEAN
    """Per-channel mean after rescaling."""
    image_std: tuple[float, ...] = CLIP_STD
    """Per-channel std after rescaling."""
    rescale_factor: float = 1 / 255
    """Multiplier of the uint8 pixels."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the config file, kept."""

    def __post_init__(self) -> None:
        if self.temporal_patch_size != 2:
            raise ValueError(
                f"preprocessor config: ERNIE 4.5 VL supports temporal_patch_size 2 only, got {self.temporal_patch_size}"
            )
        if self.fps is not None and self.num_frames is not None:
            raise ValueError("preprocessor config: fps and num_frames are mutually exclusive")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"preprocessor config: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], directory: Path | None = None) -> "VideoProcessor":
        raw = dict(raw)
        size = raw.pop("size", None) or {}
        raw.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        raw.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        if directory is not None and raw.get("font") and (directory / raw["font"]).is_file():
            raw["font"] = str(directory / raw["font"])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in names}, extra={k: v for k, v in raw.items() if k not in names}
        )

    # ---- steps ---------------------------------------------------------------------------------------------
    def sample_indices(self, total: int, source_fps: float | None) -> torch.Tensor:
        if self.num_frames is not None:
            if not self.min_frames <= self.num_frames <= self.max_frames:
                raise ValueError(f"num_frames must be in [{self.min_frames}, {self.max_frames}], got {self.num_frames}")
            num = self.num_frames
        else:
            if self.fps is not None and source_fps is None:
                raise MediaError("sampling by fps needs the video's own fps: pass video_fps, or set num_frames instead")
            num = total / source_fps * self.fps if self.fps is not None else total
            num = min(max(num, self.min_frames), self.max_frames, total)
        if num > total:
            raise MediaError(f"cannot sample {num} frames from a video of {total}")
        return torch.arange(0, total, total / num).int()

    def draw_timestamps(self, frames_THWC: np.ndarray, seconds: list[float]) -> np.ndarray:
        if not self.font or not Path(self.font).is_file():
            raise MediaError(
                f"draw_on_frames needs a TrueType font file, {self.font!r} was not found; ship it in the checkpoint "
                "directory, pass font=<path>, or set draw_on_frames=False"
            )
        out = frames_THWC.copy()
        for i, frame in enumerate(out):
            image = Image.fromarray(frame)
            font_size = int(min(*image.size) * 0.1)
            font = ImageFont.truetype(self.font, font_size)
            ImageDraw.Draw(image).text(
                (0, 0),
                timestamp_text(seconds[i]),
                font=font,
                fill=(0, 0, 0),
                stroke_width=int(font_size * 0.1),
                stroke_fill=(255, 255, 255),
            )
            out[i] = np.asarray(image)
        return out

    def resize(self, video_TCHW: torch.Tensor) -> torch.Tensor:
        height, width = video_TCHW.shape[-2:]
        h, w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        if (h, w) == (height, width):
            return video_TCHW
        return F.interpolate(video_TCHW, size=[h, w], mode="bicubic", align_corners=False, antialias=True)

    def preprocess_one(self, video: Any, video_fps: float | None = None) -> tuple[torch.Tensor, list[int]]:
        frames, file_fps = load_video(video)
        if frames.dtype != np.uint8:
            raise MediaError(f"video frames must be uint8 RGB, got {frames.dtype}")
        source_fps = video_fps if video_fps is not None else file_fps
        indices = torch.arange(len(frames))
        if self.do_sample_frames:
            indices = self.sample_indices(len(frames), source_fps)
            frames = frames[indices.numpy()]
        if self.draw_on_frames:
            fps = source_fps if source_fps is not None else DEFAULT_SOURCE_FPS
            frames = self.draw_timestamps(frames, [int(i) / fps for i in indices])
        if len(frames) % self.temporal_patch_size:
            frames = np.concatenate([frames, frames[-1:]])
        video_TCHW = self.resize(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous())
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        x = (video_TCHW.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        patches, gh, gw = patchify(x, self.patch_size, self.merge_size)
        return patches, [x.shape[0], gh, gw]

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Language-model tokens of a video with this many (already sampled) frames."""
        h, w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        t = num_frames + (-num_frames % self.temporal_patch_size)
        return t * (h // self.patch_size) * (w // self.patch_size) // (self.merge_size**2 * self.temporal_patch_size)

    def __call__(self, videos, video_fps: float | list[float | None] | None = None) -> dict[str, torch.Tensor]:
        """One video (frame list, [T, H, W, 3] array or file) or a list of them -> pixel_values_videos
        [N, C*P*P] float32 and video_grid_thw [videos, 3] int64. `video_fps`: the source rate(s), when known."""
        single = (
            isinstance(videos, (str, Path, np.ndarray, torch.Tensor))
            or (
                isinstance(videos, (list, tuple))
                and videos
                and not isinstance(videos[0], (list, tuple, str, Path, np.ndarray))
            )
            or (
                isinstance(videos, (list, tuple))
                and videos
                and isinstance(videos[0], np.ndarray)
                and videos[0].ndim == 3
            )
        )
        videos = [videos] if single else list(videos)
        rates = video_fps if isinstance(video_fps, (list, tuple)) else [video_fps] * len(videos)
        patches, grids = zip(*(self.preprocess_one(v, r) for v, r in zip(videos, rates)))
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
