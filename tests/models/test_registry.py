"""The model registry: every model_type maps to its family's classes and layout; unknown ones fail naming the known
ones; the fp32 rules keep exactly the router weights and correction biases in fp32 under bf16."""

import pytest
import torch

from ernie45.checkpoint import build_empty_model
from ernie45.checkpoint.hf_layout import TextLayout
from ernie45.checkpoint.hf_layout_vl import VLLayout
from ernie45.models import (
    MODEL_TYPES,
    Ernie45Config,
    Ernie45ForCausalLM,
    Ernie45VLConfig,
    Ernie45VLForConditionalGeneration,
    spec_for,
)

from .hf_vl_reference import TEXT_BASE, TOKEN_IDS, VISION_BASE

TEXT_MOE = dict(
    model_type="ernie4_5_moe", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=4, moe_num_experts=4, moe_k=2, moe_intermediate_size=8,
    moe_num_shared_experts=1, moe_layer_start_index=1,
)  # fmt: skip


def vl_config() -> Ernie45VLConfig:
    return Ernie45VLConfig.from_dict(
        dict(model_type="ernie4_5_vl_moe", text_config=TEXT_BASE, vision_config=VISION_BASE, **TOKEN_IDS)
    )


@pytest.mark.parametrize(
    "model_type, family, config_class, model_class, layout, multimodal",
    [
        ("ernie4_5", "text", Ernie45Config, Ernie45ForCausalLM, TextLayout, False),
        ("ernie4_5_moe", "text", Ernie45Config, Ernie45ForCausalLM, TextLayout, False),
        ("ernie4_5_vl_moe", "vl", Ernie45VLConfig, Ernie45VLForConditionalGeneration, VLLayout, True),
    ],
)
def test_every_model_type_maps(model_type, family, config_class, model_class, layout, multimodal):
    spec = spec_for(model_type)
    assert (spec.family, spec.config_class, spec.model_class) == (family, config_class, model_class)
    assert isinstance(spec.layout, layout) and spec.is_multimodal is multimodal
    assert spec.supports_mtp is not multimodal and spec.layout.save_layouts[0] == "released"


def test_model_types_are_covered_once():
    assert set(MODEL_TYPES) == {"ernie4_5", "ernie4_5_moe", "ernie4_5_vl_moe"}
    assert len(MODEL_TYPES) == len(set(MODEL_TYPES))


def test_spec_of_config_and_model_equals_spec_of_model_type():
    text = Ernie45Config.from_dict(TEXT_MOE)
    assert spec_for(text) is spec_for("ernie4_5_moe")
    assert spec_for(build_empty_model(text)) is spec_for("ernie4_5_moe")
    vl = vl_config()
    assert spec_for(vl) is spec_for(build_empty_model(vl)) is spec_for("ernie4_5_vl_moe")
    assert spec_for(vl).text_config(vl) is vl.text and spec_for(text).text_config(text) is text


def test_unknown_model_type_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'llama' is not supported; supported: ernie4_5, ernie4_5_moe, ernie4_5_vl_moe"):
        spec_for("llama")
    with pytest.raises(ValueError, match="no 'model_type'; supported: ernie4_5"):
        spec_for(None)
    with pytest.raises(ValueError, match="original remote-code VL format.*save_pretrained"):
        spec_for("ernie4_5_moe_vl")
    with pytest.raises(ValueError, match="has no `config`"):
        spec_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["text", "vl"])
def test_fp32_rules_keep_router_weights_and_biases_in_fp32(family):
    config = Ernie45Config.from_dict(TEXT_MOE) if family == "text" else vl_config()
    model = build_empty_model(config, torch.bfloat16)
    fp32 = sorted(n for n, p in model.named_parameters() if p.dtype == torch.float32)
    assert fp32 and all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in fp32)
    assert all(n.endswith(("gate.weight", "e_score_correction_bias")) for n in fp32), fp32
    assert all(".experts." not in n and "gate_proj" not in n for n in fp32), fp32
    moe_layers = 1 if family == "text" else sum(t != "dense" for t in config.text.mlp_layer_types)
    gates_per_layer = 1 if family == "text" else 2  # VL: text and vision routers
    assert len(fp32) == moe_layers * gates_per_layer * 2


def test_vl_model_refuses_mtp_layers():
    with pytest.raises(ValueError, match="no MTP layers"):
        build_empty_model(vl_config(), num_mtp_layers=1)


def test_built_model_has_real_rope_buffers():
    """Buffers built on the meta device are recomputed on the real one (checkpoints do not carry them)."""
    text = build_empty_model(Ernie45Config.from_dict(TEXT_MOE))
    assert text.model.rotary_emb.inv_freq.device.type == "cpu"
    torch.testing.assert_close(text.model.rotary_emb.inv_freq[:2], torch.tensor([1.0, 500000.0 ** -0.5]))
    vl = build_empty_model(vl_config())
    assert not vl.model.language_model.rotary_emb.inv_freq.is_meta
    assert not vl.model.vision_tower.inv_freq.is_meta


@torch.no_grad()
def test_vl_protocol_decode_positions_follow_the_rope_delta():
    """VL decode_inputs: generated tokens at cache position p sit at p + delta on all three axes, routed as text."""
    model = build_empty_model(vl_config())
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 90, (2, 5))
    prompt = model.prepare_inputs(ids)
    assert prompt.positions.shape == (3, 2, 5) and prompt.inputs_embeds.shape == (2, 5, 64)
    prompt.rope_delta = torch.tensor([[0], [-2]])
    step = model.decode_inputs(ids[:, :2], 5, prompt)
    assert step.positions.tolist() == [[[5, 6], [3, 4]]] * 3 and step.moe_token_types is None
    hidden = model.forward_inputs(step)
    assert hidden.shape == (2, 2, 64)
    torch.testing.assert_close(model.embed_input_ids(ids), model.embed(ids))  # no media: plain embeddings
