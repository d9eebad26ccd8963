"""Multimodal preprocessing of the VL models: images, videos and placeholder expansion."""

from .image_processor import ImageProcessor, smart_resize
from .media import MediaError, load_image, load_video
from .processor import expand_placeholders, load_processors
from .video_processor import VideoProcessor

__all__ = [
    "ImageProcessor",
    "MediaError",
    "VideoProcessor",
    "expand_placeholders",
    "load_image",
    "load_processors",
    "load_video",
    "smart_resize",
]
