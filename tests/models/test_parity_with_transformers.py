"""ernie45 against transformers' Ernie4_5 / Ernie4_5_Moe on tiny random configs covering every switch."""

import json

import pytest
import torch
from safetensors.torch import save_file

import ernie45
from ernie45.generation.generate import generate

from .hf_reference import build_hf_model, hf_greedy

CASES = {
    "dense_gqa_headdim": (False, {}),
    "dense_bias_untied": (False, dict(use_bias=True, tie_word_embeddings=False)),
    "dense_mha_default_headdim": (False, dict(num_key_value_heads=4, head_dim=8)),
    "moe_start0_shared0": (True, dict(moe_layer_start_index=0, moe_num_shared_experts=0)),
    "moe_start1_shared2": (True, dict(moe_num_shared_experts=2)),
    "moe_interval2_bias_untied": (True, dict(moe_layer_interval=2, num_hidden_layers=4, use_bias=True,
                                              tie_word_embeddings=False)),
    "moe_end_index": (True, dict(num_hidden_layers=4, moe_layer_start_index=1, moe_layer_end_index=2)),
}


def assert_matches(hf_model, ours, vocab: int, steps: int = 32):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (2, 13))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    assert torch.equal(generate(ours, ids, max_new_tokens=steps)[:, ids.shape[1]:], hf_greedy(hf_model, ids, steps))


@pytest.mark.parametrize("case", CASES)
def test_transformers_saves_ernie45_loads(case, tmp_path):
    moe, overrides = CASES[case]
    hf_model = build_hf_model(moe, **overrides)
    hf_model.save_pretrained(tmp_path)
    ours = ernie45.load_model(tmp_path)
    assert_matches(hf_model, ours, hf_model.config.vocab_size)


@pytest.mark.parametrize("case", ["dense_bias_untied", "moe_interval2_bias_untied", "moe_start1_shared2"])
def test_ernie45_saves_transformers_loads(case, tmp_path):
    from transformers import AutoModelForCausalLM

    moe, overrides = CASES[case]
    hf_model = build_hf_model(moe, **overrides)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = ernie45.load_model(tmp_path / "hf")
    ernie45.save_model(ours, tmp_path / "ours")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert_matches(reloaded, ours, hf_model.config.vocab_size, steps=8)


def test_correction_bias_changes_expert_choice(tmp_path):
    """Guard for the case list: with the biases the tests use, the bias must flip some top-k choices."""
    hf_model = build_hf_model(True)
    hf_model.save_pretrained(tmp_path)
    ours = ernie45.load_model(tmp_path)
    block = ours.model.layers[1].mlp
    x = torch.randn(64, ours.config.hidden_size)
    _, _, with_bias = block.gate(x, block.moe_statics.e_score_correction_bias)
    _, _, without = block.gate(x, torch.zeros_like(block.moe_statics.e_score_correction_bias))
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)


def test_sharded_checkpoint(tmp_path):
    hf_model = build_hf_model(True)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_matches(hf_model, ernie45.load_model(tmp_path), hf_model.config.vocab_size, steps=8)


def test_old_style_config_keys(tmp_path):
    """Top-level rope_theta, num_experts / num_experts_per_tok aliases and Paddle extras are read and kept."""
    hf_model = build_hf_model(True)
    hf_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["num_experts"] = cfg.pop("moe_num_experts")
    cfg["num_experts_per_tok"] = cfg.pop("moe_k")
    cfg.update(moe_capacity=[64, 64, 64], moe_aux_loss_lambda=1e-5, moe_use_aux_free=True, compression_ratio=1.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = ernie45.load_model(tmp_path)
    assert ours.config.moe_num_experts == 6 and ours.config.moe_k == 2 and ours.config.rope_theta == 10000.0
    assert ours.config.extra["moe_capacity"] == [64, 64, 64]
    assert ours.config.to_dict()["moe_aux_loss_lambda"] == 1e-5
    assert_matches(hf_model, ours, hf_model.config.vocab_size, steps=8)


def test_fused_expert_layout(tmp_path):
    """transformers' in-memory layout (gate_up_proj [E,2I,H], down_proj [E,H,I], gate.moe_statics.*) loads too."""
    hf_model = build_hf_model(True, tie_word_embeddings=False)
    hf_model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert_matches(hf_model, ernie45.load_model(tmp_path), hf_model.config.vocab_size, steps=8)


def test_compression_ratio_divides_positions():
    from ernie45.models.layers import RotaryEmbedding

    pos = torch.arange(10)
    plain = RotaryEmbedding(16, 10000.0)(pos * 1.0 / 2)
    compressed = RotaryEmbedding(16, 10000.0, compression_ratio=2.0)(pos)
    assert torch.allclose(plain[0], compressed[0]) and torch.allclose(plain[1], compressed[1])


def test_bfloat16_load_close_to_float32(tmp_path):
    hf_model = build_hf_model(True)
    hf_model.save_pretrained(tmp_path)
    ids = torch.randint(3, 96, (1, 9))
    with torch.no_grad():
        ref = ernie45.load_model(tmp_path, dtype="float32")(ids)
    bf16 = ernie45.load_model(tmp_path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert bf16.model.layers[1].mlp.gate.weight.dtype == torch.float32  # router stays fp32
    with torch.no_grad():
        got = bf16(ids).float()
    # bf16 rounding can flip a routing choice for a token, so compare on average, not at the worst element
    assert (got - ref).abs().mean() < 0.05 * ref.abs().mean()
