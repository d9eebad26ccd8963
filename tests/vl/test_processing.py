"""The VL image and video processors against transformers' processors, input forms, and bad-input errors."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ernie45.processing import ImageProcessor, MediaError, VideoProcessor, load_image, load_processors
from ernie45.processing.video_processor import timestamp_text

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
SIZES = [(50, 70), (224, 224), (333, 129), (17, 600), (1000, 1500), (28, 28), (3000, 40)]


def random_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def hf_image_processor(**kwargs):
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import Ernie4_5_VLMoeImageProcessorPil

    return Ernie4_5_VLMoeImageProcessorPil(**kwargs)


@pytest.mark.parametrize("size", SIZES)
def test_image_processor_equals_transformers(size):
    image = random_image(*size, seed=size[0])
    ref = hf_image_processor()(image, return_tensors="pt")
    got = ImageProcessor()(image)
    assert torch.equal(got["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(got["pixel_values"], ref["pixel_values"])
    h, w = size
    assert ImageProcessor().num_tokens(h, w) == hf_image_processor().get_number_of_image_patches(h, w) // 4
    assert ImageProcessor().num_tokens(h, w) == int(got["image_grid_thw"].prod()) // 4


def test_image_modes_and_batch_equal_transformers():
    images = [random_image(64, 90, "RGBA", 1), random_image(120, 40, "L", 2), random_image(300, 200, "RGB", 3)]
    ref = hf_image_processor()(images, return_tensors="pt")
    got = ImageProcessor()(images)
    assert torch.equal(got["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(got["pixel_values"], ref["pixel_values"])


def test_image_inputs_path_and_data_uri(tmp_path):
    image = random_image(100, 150)
    path = tmp_path / "x.png"
    image.save(path)
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    expected = ImageProcessor()(image)["pixel_values"]
    for source in (path, str(path), uri):
        assert torch.equal(ImageProcessor()(source)["pixel_values"], expected)


def test_preprocessor_config_is_read(tmp_path):
    settings = dict(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16})
    hf = hf_image_processor(**settings)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file() or (tmp_path / "processor_config.json").is_file()
    image_processor, video_processor = load_processors(tmp_path)
    assert (image_processor.min_pixels, image_processor.max_pixels) == (28 * 28 * 4, 28 * 28 * 16)
    for size in SIZES[:4]:
        image = random_image(*size)
        assert torch.equal(image_processor(image)["pixel_values"], hf(image, return_tensors="pt")["pixel_values"])
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"max_frames": 8, "draw_on_frames": False}))
    _, video_processor = load_processors(tmp_path)
    assert video_processor.max_frames == 8 and not video_processor.draw_on_frames


def test_released_defaults_without_config(tmp_path):
    image_processor, video_processor = load_processors(tmp_path)
    assert (image_processor.min_pixels, image_processor.max_pixels) == (56 * 56, 28 * 28 * 6177)
    assert (video_processor.min_pixels, video_processor.max_pixels) == (299 * 28 * 28, 1196 * 28 * 28)


# ---- video ---------------------------------------------------------------------------------------------------
def random_video(frames, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


SMALL = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)


def test_video_patches_are_per_frame_image_patches():
    """Frames already at a multiple of 28 are not resized: each frame's patches are the image processor's for it
    (to float32 rounding of the fused normalisation), the odd count padded with the last frame."""
    video = random_video(5, 56, 84)
    got = VideoProcessor(**SMALL, draw_on_frames=False)(video)
    assert got["video_grid_thw"].tolist() == [[6, 4, 6]]
    frames = [Image.fromarray(f) for f in video] + [Image.fromarray(video[-1])]
    expected = torch.cat([ImageProcessor(**SMALL)(f)["pixel_values"] for f in frames])
    assert got["pixel_values_videos"].shape == expected.shape
    assert (got["pixel_values_videos"] - expected).abs().max().item() <= 1e-6


def test_video_grid_and_token_counts():
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import smart_resize

    processor = VideoProcessor(draw_on_frames=False)
    for frames, h, w in ((4, 60, 80), (3, 100, 50)):
        got = processor(random_video(frames, h, w))
        rh, rw = smart_resize(h, w, 28, min_pixels=299 * 28 * 28, max_pixels=1196 * 28 * 28)
        t = frames + frames % 2
        assert got["video_grid_thw"].tolist() == [[t, rh // 14, rw // 14]]
        assert processor.num_tokens(frames, h, w) == t * (rh // 14) * (rw // 14) // 8
        assert got["pixel_values_videos"].shape == (t * (rh // 14) * (rw // 14), 588)


def test_video_frame_sampling():
    processor = VideoProcessor(**SMALL, draw_on_frames=False, fps=2.0, min_frames=4, max_frames=6)
    # 40 frames at 10 fps, 2 fps wanted -> 8 frames, capped at max_frames 6: every 40/6 frames
    assert processor.sample_indices(40, 10.0).tolist() == [0, 6, 13, 20, 26, 33]
    assert VideoProcessor(fps=1.0, min_frames=4).sample_indices(40, 10.0).tolist() == [0, 10, 20, 30]
    assert VideoProcessor().sample_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    got = processor(random_video(40, 56, 56), video_fps=10.0)
    assert got["video_grid_thw"].tolist() == [[6, 4, 4]]
    with pytest.raises(MediaError, match="fps"):
        processor(random_video(40, 56, 56))


def test_video_timestamps_drawn():
    video = random_video(2, 112, 112)
    plain = VideoProcessor(**SMALL, draw_on_frames=False)(video)["pixel_values_videos"]
    drawn = VideoProcessor(**SMALL, font=FONT)(video, video_fps=2.0)["pixel_values_videos"]
    assert not torch.equal(plain, drawn)
    assert timestamp_text(3725.5) == "time: 01:02:05.50"
    with pytest.raises(MediaError, match="font"):
        VideoProcessor(**SMALL, font="missing.ttf")(video)


# ---- bad inputs ----------------------------------------------------------------------------------------------
def test_bad_images(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(MediaError, match="not a decodable image"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(MediaError, match="not a decodable image"):
        load_image("data:image/png;base64," + base64.b64encode(b"garbage").decode())
    with pytest.raises(MediaError, match="base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(MediaError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    buffer = io.BytesIO()
    random_image(200, 100).save(buffer, format="PNG")
    with pytest.raises(MediaError, match="exceeds the limit"):
        load_image(buffer.getvalue(), max_pixels=10_000)
    with pytest.raises(MediaError, match="exceeds the limit"):
        ImageProcessor(max_input_pixels=10_000)(random_image(200, 100))
    with pytest.raises(MediaError, match="aspect ratio"):
        ImageProcessor()(random_image(2, 500))
    with pytest.raises(MediaError, match="offline"):
        load_image("http://127.0.0.1:9/picture.png")


def write_video(path, frames, fps):
    av = pytest.importorskip("av")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_file_decoded_with_pyav(tmp_path):
    """A file (and the same bytes as a data: URI) decodes to its frames; its own fps drives fps sampling."""
    frames = np.stack([np.full((56, 84, 3), 30 * i, dtype=np.uint8) for i in range(6)])
    write_video(tmp_path / "clip.mp4", frames, fps=4)
    processor = VideoProcessor(**SMALL, draw_on_frames=False, fps=2.0, min_frames=1)
    got = processor(tmp_path / "clip.mp4")
    assert got["video_grid_thw"].tolist() == [[4, 4, 6]]  # 6 frames at 4 fps -> 3 at 2 fps, padded to 4
    unsampled = VideoProcessor(**SMALL, draw_on_frames=False, do_sample_frames=False)
    expected = unsampled(frames[[0, 2, 4]])["pixel_values_videos"]
    assert (got["pixel_values_videos"] - expected).abs().mean().item() < 0.05  # lossy codec, flat frames
    uri = "data:video/mp4;base64," + base64.b64encode((tmp_path / "clip.mp4").read_bytes()).decode()
    assert torch.equal(processor(uri)["pixel_values_videos"], got["pixel_values_videos"])
    (tmp_path / "junk.mp4").write_bytes(b"no video here")
    with pytest.raises(MediaError, match="not a decodable video"):
        processor(tmp_path / "junk.mp4")
