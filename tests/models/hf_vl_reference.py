"""Tiny random transformers ERNIE 4.5 VL models and a text + image + video prompt: the reference of the VL tests."""

from __future__ import annotations

import torch

IMAGE, IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END, VIDEO = 100, 101, 102, 103, 104, 105
TOKEN_IDS = dict(
    image_token_id=IMAGE,
    image_start_token_id=IMAGE_START,
    image_end_token_id=IMAGE_END,
    video_start_token_id=VIDEO_START,
    video_end_token_id=VIDEO_END,
    video_token_id=VIDEO,
)
TEXT_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=[32, 16],
    moe_num_experts=4,
    moe_k=2,
    moe_num_shared_experts=1,
    mlp_layer_types=["dense", "sparse", "sparse"],
    initializer_range=0.15,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
)
VISION_BASE = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, initializer_range=0.15)


def build_hf_vl_model(seed: int = 0, text: dict | None = None, vision: dict | None = None, **overrides):
    """A transformers Ernie4_5_VLMoeForConditionalGeneration with random weights, non-zero biases and correction
    biases (large enough to change expert choices)."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    config = Ernie4_5_VLMoeConfig(
        text_config=dict(TEXT_BASE, **(text or {})),
        vision_config=dict(VISION_BASE, **(vision or {})),
        **dict(TOKEN_IDS, **overrides),
    )
    model = Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.uniform_(0.0, 0.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name or name.endswith(".ln.weight"):
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name:
                p.normal_(0.0, 1.0)
    return model


def mm_prompt(seed: int = 0, image_grid=(1, 4, 6), video_grid=(4, 4, 4), patch_dim: int = 3 * 14 * 14):
    """transformers-style inputs for: text, one image, text, one video, text (batch of 1)."""
    g = torch.Generator().manual_seed(seed)
    n_img = image_grid[0] * image_grid[1] * image_grid[2] // 4
    n_vid = video_grid[0] * video_grid[1] * video_grid[2] // 8
    text = lambda n: torch.randint(3, IMAGE, (n,), generator=g).tolist()  # noqa: E731
    ids = (
        text(5)
        + [IMAGE_START]
        + [IMAGE] * n_img
        + [IMAGE_END]
        + text(4)
        + [VIDEO_START]
        + [VIDEO] * n_vid
        + [VIDEO_END]
        + text(6)
    )
    input_ids = torch.tensor([ids])
    mm = torch.zeros_like(input_ids)
    mm[input_ids == IMAGE] = 1
    mm[input_ids == VIDEO] = 2
    moe = mm.clone()
    moe[(input_ids == IMAGE_START) | (input_ids == IMAGE_END)] = 1
    moe[(input_ids == VIDEO_START) | (input_ids == VIDEO_END)] = 2
    return dict(
        input_ids=input_ids,
        pixel_values=torch.randn(image_grid[0] * image_grid[1] * image_grid[2], patch_dim, generator=g),
        image_grid_thw=torch.tensor([list(image_grid)]),
        pixel_values_videos=torch.randn(video_grid[0] * video_grid[1] * video_grid[2], patch_dim, generator=g),
        video_grid_thw=torch.tensor([list(video_grid)]),
        mm_token_type_ids=mm,
        moe_mm_token_type_ids=moe,
    )
