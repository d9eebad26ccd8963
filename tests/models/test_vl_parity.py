"""ERNIE 4.5 VL against transformers' Ernie4_5_VLMoeForConditionalGeneration on tiny random configs: a prompt with
text, one image and one video; logits, vision features, 3-D positions, greedy tokens and both checkpoint layouts."""

import json

import pytest
import torch

import ernie45
from ernie45.generation.generate_vl import generate_vl
from ernie45.models import Ernie45VLConfig, Ernie45VLForConditionalGeneration

from .hf_vl_reference import build_hf_vl_model, mm_prompt

CASES = {
    "base": ({}, {}, {}),
    "untied_no_shared_all_sparse": (
        dict(moe_num_shared_experts=0, mlp_layer_types=["sparse"] * 3),
        dict(depth=1),
        dict(tie_word_embeddings=False),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    text, vision, top = CASES[request.param]
    hf_model = build_hf_vl_model(text=text, vision=vision, **top)
    assert (hf_model.lm_head.weight is hf_model.model.language_model.embed_tokens.weight) == top.get(
        "tie_word_embeddings", True
    )
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    return hf_model, ernie45.load_model(path), path


def assert_logits_match(hf_model, ours, inputs):
    with torch.no_grad():
        ref = hf_model(**inputs).logits
        got = ours(**inputs)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_load_returns_vl_model(pair):
    _, ours, _ = pair
    assert isinstance(ours, Ernie45VLForConditionalGeneration)
    assert ours.config.text.mlp_layer_types is not None


def test_logits_match(pair):
    hf_model, ours, _ = pair
    assert_logits_match(hf_model, ours, mm_prompt())


def test_logits_match_without_token_type_ids(pair):
    """Token types default to those implied by the placeholder and start/end ids."""
    hf_model, ours, _ = pair
    inputs = mm_prompt(seed=3)
    with torch.no_grad():
        ref = hf_model(**inputs).logits
        got = ours(**{k: v for k, v in inputs.items() if not k.endswith("token_type_ids")})
    assert (got - ref).abs().max().item() <= 1e-4


def test_vision_features_match(pair):
    hf_model, ours, _ = pair
    inputs = mm_prompt()
    with torch.no_grad():
        for pixels, grid, hf_features in (
            (inputs["pixel_values"], inputs["image_grid_thw"], hf_model.model.get_image_features),
            (inputs["pixel_values_videos"], inputs["video_grid_thw"], hf_model.model.get_video_features),
        ):
            ref_vit = hf_model.model.vision_tower(pixels, grid).last_hidden_state
            assert (ours.model.vision_tower(pixels, grid) - ref_vit).abs().max().item() <= 1e-5
            ref = torch.cat(hf_features(pixels, grid).pooler_output)
            got = ours.get_image_features(pixels, grid)
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grids", [((1, 4, 6), (4, 4, 4)), ((1, 8, 2), (2, 6, 4)), ((1, 2, 2), (6, 2, 4))])
def test_3d_positions_equal_transformers(pair, grids):
    hf_model, ours, _ = pair
    inputs = mm_prompt(image_grid=grids[0], video_grid=grids[1])
    ref, ref_delta = hf_model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"]
    )
    got, delta = ours.positions(inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"])
    assert torch.equal(got, ref)
    assert torch.equal(delta, ref_delta)


def test_greedy_tokens_match(pair):
    hf_model, ours, _ = pair
    inputs = mm_prompt(seed=1)
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf_model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = generate_vl(
        ours,
        inputs["input_ids"],
        max_new_tokens=16,
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        pixel_values_videos=inputs["pixel_values_videos"],
        video_grid_thw=inputs["video_grid_thw"],
    )
    assert torch.equal(got, ref)


def test_released_layout_on_disk(pair):
    """transformers writes the released layout; the checkpoint we read has stacked text/vision experts etc."""
    hf_model, _, path = pair
    from safetensors import safe_open

    cfg = hf_model.config.text_config
    E, H = cfg.moe_num_experts, cfg.hidden_size
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_shape() == [H, E]
        assert f.get_slice("model.layers.1.mlp.moe_statics.e_score_correction_bias").get_shape() == [2, E]
    assert "model.layers.1.mlp.gate.weight_1" in names
    assert f"model.layers.1.mlp.experts.{2 * E - 1}.down_proj.weight" in names
    assert "model.resampler_model.spatial_linear.3.weight" in names
    assert any(n.startswith("model.vision_model.blocks.") for n in names)


@pytest.mark.parametrize("layout", ["released", "transformers"])
def test_save_round_trip(pair, layout, tmp_path):
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    hf_model, ours, _ = pair
    ernie45.save_model(ours, tmp_path / "ours", layout=layout)
    again = ernie45.load_model(tmp_path / "ours")
    for (name, p), (name2, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert name == name2 and torch.equal(p, q), name
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "ernie4_5_vl_moe"
    reloaded = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert_logits_match(reloaded, ours, mm_prompt(seed=2))


def test_vision_correction_bias_changes_expert_choice(pair):
    """Guard for the reference: the biases the tests use flip some vision top-k choices."""
    _, ours, _ = pair
    block = ours.model.language_model.layers[1].mlp.vision_moe
    x = torch.randn(64, ours.config.text.hidden_size)
    _, _, with_bias = block.gate(x, block.moe_statics.e_score_correction_bias)
    _, _, without = block.gate(x, torch.zeros_like(block.moe_statics.e_score_correction_bias))
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)


def test_config_round_trip_and_errors():
    from .hf_vl_reference import TEXT_BASE, TOKEN_IDS, VISION_BASE

    raw = dict(model_type="ernie4_5_vl_moe", text_config=TEXT_BASE, vision_config=VISION_BASE, **TOKEN_IDS)
    config = Ernie45VLConfig.from_dict(raw)
    assert config.vision_moe_intermediate_size == 16 and config.text.moe_intermediate_size == 32
    assert Ernie45VLConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    bad = dict(raw, text_config=dict(TEXT_BASE, rope_parameters={"rope_theta": 1e4, "mrope_section": [4, 4, 4]}))
    with pytest.raises(ValueError, match="mrope_section"):
        Ernie45VLConfig.from_dict(bad)
    with pytest.raises(ValueError, match="mlp_layer_types"):
        Ernie45VLConfig.from_dict(dict(raw, text_config=dict(TEXT_BASE, mlp_layer_types=["dense", "moe", "sparse"])))
    with pytest.raises(ValueError, match="token ids"):
        Ernie45VLConfig.from_dict(dict(raw, video_token_id=1000))


def test_batch_rows_match_single_rows(pair):
    """Two prompts of equal length with different images: each row's logits equal its single-row forward."""
    _, ours, _ = pair
    a, b = mm_prompt(seed=5), mm_prompt(seed=6)
    batched = {
        "input_ids": torch.cat([a["input_ids"], b["input_ids"]]),
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
        "image_grid_thw": torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
        "pixel_values_videos": torch.cat([a["pixel_values_videos"], b["pixel_values_videos"]]),
        "video_grid_thw": torch.cat([a["video_grid_thw"], b["video_grid_thw"]]),
    }
    with torch.no_grad():
        both = ours(**batched)
        for row, single in enumerate((a, b)):
            alone = ours(**{k: v for k, v in single.items() if not k.endswith("token_type_ids")})
            assert (both[row] - alone[0]).abs().max().item() <= 1e-4


def test_bfloat16_and_sharded_load(pair, tmp_path):
    hf_model, ours, _ = pair
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    sharded = ernie45.load_model(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), sharded.state_dict().values()))
    bf16 = ernie45.load_model(tmp_path, dtype="bfloat16")
    mlp = bf16.model.language_model.layers[1].mlp
    assert mlp.text_moe.gate.weight.dtype == mlp.vision_moe.gate.weight.dtype == torch.float32
    assert bf16.model.vision_tower.patch_embed.proj.weight.dtype == torch.bfloat16
    inputs = mm_prompt()
    with torch.no_grad():
        ref = ours(**inputs)
        got = bf16(**inputs).float()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.8


def test_remote_code_config_is_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ernie4_5_moe_vl", "hidden_size": 2560}))
    with pytest.raises(ValueError, match="ernie4_5_vl_moe"):
        ernie45.load_model(tmp_path)
