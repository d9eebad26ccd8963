"""VL prompts in the engine: greedy output equals the plain model's (also with prefill chunks cutting through images),
vision embeddings encoded once per request, and prefix caching keyed by image content."""

import json

import numpy as np
import pytest
from PIL import Image

import ernie45
from ernie45.engine import EngineConfig, LLMEngine, SamplingParams
from ernie45.generation.generate_vl import generate_vl
from ernie45.processing import expand_placeholders, load_processors
from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer
from tests.models.hf_vl_reference import (
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    VIDEO,
    VIDEO_END,
    VIDEO_START,
    build_hf_vl_model,
)

MAX_TOKENS = 8
VIDEO_SETTINGS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 8, "draw_on_frames": False}


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl") / "ckpt"
    build_hf_vl_model(seed=7).save_pretrained(path)
    (path / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_SETTINGS))
    tokenizer = ernie45.load_tokenizer(build_tiny_sentencepiece_tokenizer(path.parent / "tok"))
    return ernie45.load_model(path), tokenizer


def image(seed, h=56, w=84):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def video(seed):
    return np.random.default_rng(seed).integers(0, 256, (3, 56, 70, 3), dtype=np.uint8)


def prompt(seed):
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(3, IMAGE, n).tolist()  # noqa: E731
    return (
        text(5)
        + [IMAGE_START, IMAGE, IMAGE_END]
        + text(3)
        + [VIDEO_START, VIDEO, VIDEO_END]
        + text(4)
        + [IMAGE_START, IMAGE, IMAGE_END]
        + text(2)
    )


def reference(model, ids, images, videos):
    image_processor, video_processor = load_processors(model.source_dir)
    media = {**image_processor(images), **video_processor(videos)}
    inputs = expand_placeholders(ids, model.config, media["image_grid_thw"], media["video_grid_thw"])
    out = generate_vl(model, inputs["input_ids"], max_new_tokens=MAX_TOKENS, **media)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def run(engine, requests):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for rid, request in requests.items():
        engine.add_request(rid, request, params)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
    return results


@pytest.mark.parametrize("budget", [1024, 8])
def test_greedy_equals_plain_model(vl, budget):
    """A budget of 8 tokens cuts the prefill inside the 6-token images and the video."""
    model, tokenizer = vl
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_batched_tokens=budget))
    requests = {
        str(i): {
            "prompt_token_ids": prompt(i),
            "multi_modal_data": {"image": [image(i), image(i + 10, 84, 56)], "video": [video(i)]},
        }
        for i in range(2)
    }
    results = run(engine, requests)
    for rid, request in requests.items():
        data = request["multi_modal_data"]
        assert results[rid].outputs[0].token_ids == reference(
            model, request["prompt_token_ids"], data["image"], data["video"]
        )
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_vision_encoded_once_per_request(vl, monkeypatch):
    model, tokenizer = vl
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_batched_tokens=4))
    calls = []
    original = model.get_image_features
    monkeypatch.setattr(model, "get_image_features", lambda *a: calls.append(1) or original(*a))
    run(
        engine,
        {
            "a": {
                "prompt_token_ids": prompt(0),
                "multi_modal_data": {"image": [image(0), image(1)], "video": [video(0)]},
            }
        },
    )
    assert len(calls) == 2  # one call for the images, one for the video, across all prefill chunks


def test_prefix_cache_keyed_by_image_content(vl):
    model, tokenizer = vl
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=4))
    ids = [5, 6, 7, 8, 9, 10, 11, IMAGE_START, IMAGE, IMAGE_END, 12, 13]
    first = run(engine, {"a": {"prompt_token_ids": ids, "multi_modal_data": {"image": [image(1)]}}})
    other = run(engine, {"b": {"prompt_token_ids": ids, "multi_modal_data": {"image": [image(2)]}}})
    same = run(engine, {"c": {"prompt_token_ids": ids, "multi_modal_data": {"image": [image(1)]}}})
    assert other["b"].metrics.num_cached_tokens == 0
    assert same["c"].metrics.num_cached_tokens > 0
    assert same["c"].outputs[0].token_ids == first["a"].outputs[0].token_ids


def test_bad_multimodal_requests(vl):
    model, tokenizer = vl
    engine = LLMEngine(model, tokenizer)
    with pytest.raises(ValueError, match="not a decodable image"):
        engine.add_request("x", {"prompt_token_ids": [IMAGE], "multi_modal_data": {"image": [b"junk"]}})
    with pytest.raises(ValueError, match="more image placeholders"):
        engine.add_request("y", {"prompt_token_ids": [IMAGE, IMAGE], "multi_modal_data": {"image": [image(0)]}})
    with pytest.raises(ValueError, match="'image' and/or 'video'"):
        engine.add_request("z", {"prompt_token_ids": [IMAGE], "multi_modal_data": {"audio": [1]}})
    assert not engine.has_unfinished_requests()
