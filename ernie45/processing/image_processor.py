"""ERNIE 4.5 VL image processor, equal to transformers' `Ernie4_5_VLMoeImageProcessorPil`: RGB (alpha over white),
smart resize to multiples of patch*merge (28) within [min_pixels, max_pixels] with PIL bicubic, rescale 1/255, CLIP
normalisation, then patches flattened [C*P*P] in spatial-merge-window order. Legend: N patches, P patch side.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .media import DEFAULT_MAX_IMAGE_PIXELS, MediaError, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept as well as possible."""
    if min(height, width) <= 0:
        raise MediaError(f"image has zero size ({width}x{height})")
    if max(height, width) / min(height, width) > 200:
        raise MediaError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} image exceeds 200"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any alpha over white (transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def patchify(frames_TCHW: np.ndarray | torch.Tensor, patch: int, merge: int):
    """[T, C, H, W] -> [T * gh * gw, C*P*P], patches ordered frame, merge-window row, window col, row, col."""
    T, C, H, W = frames_TCHW.shape
    gh, gw = H // patch, W // patch
    x = frames_TCHW.reshape(T, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7) if isinstance(x, np.ndarray) else x.permute(0, 2, 5, 3, 6, 1, 4, 7)
    return x.reshape(T * gh * gw, C * patch * patch), gh, gw


@dataclass
class ImageProcessor:
    """Settings of the image processor (transformers' preprocessor_config.json keys, `size` flattened)."""

    min_pixels: int = 56 * 56
    """Smallest resized area (transformers: size.shortest_edge)."""
    max_pixels: int = 28 * 28 * 6177
    """Largest resized area (transformers: size.longest_edge)."""
    patch_size: int = 14
    """Patch side in pixels."""
    merge_size: int = 2
    """Spatial merge of the resampler; sizes are multiples of patch_size * merge_size."""
    image_mean: tuple[float, ...] = CLIP_MEAN
    """Per-channel mean after rescaling."""
    image_std: tuple[float, ...] = CLIP_STD
    """Per-channel std after rescaling."""
    rescale_factor: float = 1 / 255
    """Multiplier of the uint8 pixels."""
    max_input_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images above this many pixels are refused before decoding (not a transformers setting)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the config file, kept."""

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"preprocessor config: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )
        if self.patch_size <= 0 or self.merge_size <= 0:
            raise ValueError("preprocessor config: patch_size and merge_size must be positive")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ImageProcessor":
        raw = dict(raw)
        size = raw.pop("size", None) or {}
        raw.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        raw.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in names}, extra={k: v for k, v in raw.items() if k not in names}
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_tokens(self, height: int, width: int) -> int:
        """Language-model tokens of an image of this size."""
        h, w = self.resized_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, C] -> float32 [C, H, W]: rescaled in float64 then cast (as transformers), then normalised."""
        x = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return x.transpose(2, 0, 1)

    def preprocess_one(self, image: Image.Image | str | Any) -> tuple[np.ndarray, list[int]]:
        image = to_rgb(load_image(image, self.max_input_pixels))
        height, width = self.resized_size(image.height, image.width)
        resized = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))
        patches, gh, gw = patchify(self.normalize(resized)[None], self.patch_size, self.merge_size)
        return patches, [1, gh, gw]

    def __call__(self, images) -> dict[str, torch.Tensor]:
        """One image or a list -> pixel_values [N, C*P*P] float32, image_grid_thw [images, 3] int64."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise MediaError("no images given")
        patches, grids = zip(*(self.preprocess_one(image) for image in images))
        return {
            "pixel_values": torch.from_numpy(np.concatenate(patches)),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        }
