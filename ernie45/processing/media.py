"""Image and video inputs: PIL images, file paths, `data:` base64 URIs, http(s) URLs (online only), frame lists and
(with PyAV installed) video files. Every failure is a `MediaError` naming the input and what to do."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# Decoding refuses images above this many pixels unless the caller passes another limit (decompression bombs).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
_URL_TIMEOUT_S = 20


class MediaError(ValueError):
    """An image or video that cannot be used; the message names the input."""


def _describe(source: Any) -> str:
    text = str(source)
    return text if len(text) <= 80 else text[:60] + "...(" + str(len(text)) + " chars)"


def read_bytes(source: str | Path) -> bytes:
    """The raw bytes behind a path, a `data:` URI or an http(s) URL."""
    text = str(source)
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise MediaError(f"{_describe(source)}: a data URI must look like 'data:image/png;base64,<payload>'")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"{_describe(source)}: invalid base64 payload in the data URI: {exc}") from exc
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=_URL_TIMEOUT_S) as response:  # noqa: S310 - scheme checked above
                return response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise MediaError(
                f"{_describe(source)}: could not download ({exc}); offline, pass a local file path, a PIL image or a "
                "data: URI instead"
            ) from exc
    path = Path(text).expanduser()
    if not path.is_file():
        raise MediaError(f"{_describe(source)}: no such file (expected a path, a data: URI or an http(s) URL)")
    return path.read_bytes()


def load_image(source: Image.Image | str | Path | bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A decoded PIL image (mode unchanged; RGB conversion belongs to the processor)."""
    if isinstance(source, Image.Image):
        image = source
    else:
        data = source if isinstance(source, bytes) else read_bytes(source)
        name = "bytes" if isinstance(source, bytes) else _describe(source)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise MediaError(
                        f"{name}: image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                    )
                opened.load()
                image = opened.copy()
        except MediaError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            raise MediaError(f"{name}: not a decodable image ({type(exc).__name__}: {exc})") from exc
    width, height = image.size
    if width == 0 or height == 0:
        raise MediaError(f"{_describe(source)}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise MediaError(f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    return image


def load_video(source: Any) -> tuple[np.ndarray, float | None]:
    """Frames [T, H, W, 3] uint8 and the source fps (None when unknown) from a frame list or array, or a video file
    decoded with PyAV (optional dependency: `pip install av`)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("a video needs at least one frame, got an empty list")
        frames = [np.asarray(load_image(f).convert("RGB")) if not isinstance(f, np.ndarray) else f for f in source]
        if len({f.shape for f in frames}) != 1:
            raise MediaError(f"video frames differ in shape: {sorted({f.shape for f in frames})}")
        return np.stack(frames), None
    if isinstance(source, np.ndarray) or hasattr(source, "numpy"):
        array = np.asarray(source)
        if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
            raise MediaError(f"a video array must be [frames, height, width, 3], got shape {array.shape}")
        return array, None
    try:
        import av
    except ImportError as exc:
        raise MediaError(
            f"{_describe(source)}: decoding video files needs PyAV (`pip install av`); or pass the frames as a list"
        ) from exc
    data = read_bytes(source)
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise MediaError(f"{_describe(source)}: not a decodable video ({exc})") from exc
    if not frames:
        raise MediaError(f"{_describe(source)}: the video has no frames")
    return np.stack(frames), fps
