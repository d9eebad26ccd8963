"""Images and a video through our processors, placeholder expansion and the model: logits equal transformers' on
the same processed inputs; ids and token-type rows as transformers' processor builds them."""

import numpy as np
import pytest
import torch
from PIL import Image

import ernie45
from ernie45.processing import ImageProcessor, VideoProcessor, expand_placeholders
from tests.models.hf_vl_reference import (
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    VIDEO,
    VIDEO_END,
    VIDEO_START,
    build_hf_vl_model,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf_model = build_hf_vl_model(seed=4)
    path = tmp_path_factory.mktemp("vl")
    hf_model.save_pretrained(path)
    return hf_model, ernie45.load_model(path)


def test_processed_prompt_matches_transformers(models):
    hf_model, ours = models
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (120, 50, 3), dtype=np.uint8)),
    ]
    video = rng.integers(0, 256, (3, 56, 70, 3), dtype=np.uint8)
    image_inputs = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 12)(images)
    video_inputs = VideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 8, draw_on_frames=False)(video)
    prompt = [
        7,
        8,
        IMAGE_START,
        IMAGE,
        IMAGE_END,
        9,
        IMAGE_START,
        IMAGE,
        IMAGE_END,
        10,
        VIDEO_START,
        VIDEO,
        VIDEO_END,
        11,
    ]
    inputs = expand_placeholders(prompt, ours.config, image_inputs["image_grid_thw"], video_inputs["video_grid_thw"])
    grids = image_inputs["image_grid_thw"]
    assert int((inputs["input_ids"] == IMAGE).sum()) == int(grids.prod(-1).sum()) // 4
    assert int((inputs["input_ids"] == VIDEO).sum()) == int(video_inputs["video_grid_thw"].prod()) // 8
    inputs.update(image_inputs, **video_inputs)
    from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import Ernie4_5_VLMoeProcessor

    # transformers' processor builds the MoE token types from the ids alone (the method needs no tokenizer state
    # beyond the token ids, set here on a bare instance).
    reference_types = Ernie4_5_VLMoeProcessor.__new__(Ernie4_5_VLMoeProcessor)
    for name, value in dict(
        image_token_id=IMAGE,
        image_start_token_id=IMAGE_START,
        image_end_token_id=IMAGE_END,
        video_token_id=VIDEO,
        video_start_token_id=VIDEO_START,
        video_end_token_id=VIDEO_END,
    ).items():
        setattr(reference_types, name, value)
    assert torch.equal(
        inputs["moe_mm_token_type_ids"], reference_types.create_moe_mm_token_type_ids(inputs["input_ids"])
    )
    with torch.no_grad():
        ref = hf_model(**inputs).logits
        got = ours(**inputs)
    assert (got - ref).abs().max().item() <= 1e-4


def test_placeholder_count_errors(models):
    _, ours = models
    grid = torch.tensor([[1, 4, 4]])
    with pytest.raises(ValueError, match="more image placeholders"):
        expand_placeholders([IMAGE, IMAGE], ours.config, grid)
    with pytest.raises(ValueError, match="more images given"):
        expand_placeholders([1, 2], ours.config, grid)
    inputs = expand_placeholders([IMAGE_START, IMAGE, IMAGE_END], ours.config, grid)
    with pytest.raises(ValueError, match="placeholder tokens"):
        ours(inputs["input_ids"], pixel_values=torch.randn(32, 588), image_grid_thw=torch.tensor([[2, 4, 4]]))
