"""A VL checkpoint under tensor (and expert) parallelism: attention, dense MLP, shared experts and both
modality-isolated expert groups split over 2 ranks, the vision tower whole on each; text + image + video prompts
with prefill chunks cutting through the images give TP=1's greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ernie45 import LLM, SamplingParams
from ernie45.parallel import shutdown

from ..tiny_checkpoint import make_tiny_vl_checkpoint

# An 8-token budget cuts prefill chunks through the 6-token images; 2 text-only prompts route as text throughout.
ENGINE = {"max_num_batched_tokens": 8, "block_size": 4, "max_model_len": 96}
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    return make_tiny_vl_checkpoint(tmp_path_factory.mktemp("tpvl") / "ckpt")


def _image(seed: int, h: int = 56, w: int = 84):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _prompts(config):
    """Two text + image + video prompts, one with an image only, two text only (ids below the special tokens)."""
    IMAGE, IMAGE_START, IMAGE_END = config.image_token_id, config.image_start_token_id, config.image_end_token_id
    VIDEO, VIDEO_START, VIDEO_END = config.video_token_id, config.video_start_token_id, config.video_end_token_id
    rng = np.random.default_rng(0)
    low = min(IMAGE, IMAGE_START, IMAGE_END, VIDEO, VIDEO_START, VIDEO_END)
    text = lambda n: rng.integers(3, low, n).tolist()
    video = np.random.default_rng(5).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    mixed = [{"prompt_token_ids": text(4) + [IMAGE_START, IMAGE, IMAGE_END] + text(3) + [VIDEO_START, VIDEO, VIDEO_END]
              + text(2), "multi_modal_data": {"image": [_image(i)], "video": [video]}} for i in range(2)]
    one_image = [{"prompt_token_ids": text(6) + [IMAGE_START, IMAGE, IMAGE_END] + text(5),
                  "multi_modal_data": {"image": [_image(7, 84, 56)]}}]
    return mixed + one_image + [{"prompt_token_ids": text(9)}, {"prompt_token_ids": text(17)}]


@pytest.mark.parametrize("extra", [{}, {"enable_expert_parallel": True}], ids=["vl-tp2", "vl-tp2-ep2"])
def test_vl_tp2_matches_tp1(extra, vl_checkpoint, one_thread):
    single = LLM(str(vl_checkpoint), **ENGINE)
    prompts = _prompts(single.model.config)
    expected = single.generate(prompts, GREEDY, use_tqdm=False)
    tp = LLM(str(vl_checkpoint), tensor_parallel_size=2, **ENGINE, **extra)
    try:
        layer = tp.model.model.language_model.layers[1]
        assert layer.mlp.vision_moe.experts.num_experts == (2 if extra else 4)  # each rank's share of the group
        got = tp.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        shutdown(tp.model)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
