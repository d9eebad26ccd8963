"""Legacy Paddle-layout checkpoints (written by the official converter's rules from transformers models) load into
ernie45 with transformers' logits, and every malformed one is refused naming the tensor and both layouts.

Tolerance: the Paddle-loaded parameters are bit-identical to the transformers-loaded ones (a transpose or a column
slice copies values exactly), so the only difference to transformers is kernel order in fp32 (eps 2^-24 relative per
rounding): logits of size ~1-10 after 3 layers of 32-96-wide dot products differ by ~1e-6 (the same bound as
tests/models/test_parity_with_transformers.py); 1e-4 leaves two orders of margin and still catches any misplaced
column, which moves logits by O(0.1).
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

import ernie45
from ernie45.checkpoint import build_empty_model
from ernie45.models import Ernie45Config

from ..models.hf_reference import build_hf_model
from .paddle_reference import torch_to_paddle

CASES = {
    "dense_bias_untied": (False, {"use_bias": True, "tie_word_embeddings": False}),
    "moe_shared2_untied": (True, {"moe_num_shared_experts": 2, "tie_word_embeddings": False}),
    "moe_tied_interval2": (True, {"moe_layer_interval": 2, "num_hidden_layers": 4}),
}


def logits_of(model, vocab, seed=1):
    ids = torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def paddle_checkpoint(tmp_path, case, **kw):
    moe, overrides = CASES[case]
    hf = build_hf_model(moe, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    return hf, torch_to_paddle(tmp_path / "hf", tmp_path / "paddle", **kw)


@pytest.mark.parametrize("case", CASES)
def test_paddle_layout_loads_with_transformers_logits(case, tmp_path):
    hf, path = paddle_checkpoint(tmp_path, case)
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
        H = hf.config.hidden_size
        qkv = f.get_slice("ernie.layers.0.self_attn.qkv_proj.weight").get_shape()
    assert not any(n.startswith("model.") for n in names)
    assert qkv == [H, (hf.config.num_attention_heads + 2 * hf.config.num_key_value_heads) * 16]
    if CASES[case][0]:
        assert "ernie.layers.1.mlp.experts.5.up_gate_proj.weight" in names
        assert "ernie.layers.1.mlp.moe_statics.e_score_correction_bias" in names
    ours = ernie45.load_model(path)
    reference = ernie45.load_model(tmp_path / "hf")
    for (name, p), (ref_name, ref) in zip(ours.named_parameters(), reference.named_parameters()):
        assert name == ref_name and torch.equal(p, ref), name
    diff = (logits_of(ours, hf.config.vocab_size) - logits_of(hf, hf.config.vocab_size)).abs().max().item()
    assert diff <= 1e-4


def test_paddle_mtp_weights_load(tmp_path):
    hf = build_hf_model(True, num_nextn_predict_layers=1, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    config = Ernie45Config.from_file(tmp_path / "hf")
    shapes = build_empty_model(config, torch.float32, num_mtp_layers=1)
    gen = torch.Generator().manual_seed(3)
    mtp = {n: torch.randn(p.shape, generator=gen) * 0.3 for n, p in shapes.named_parameters() if ".mtp_" in n}
    from safetensors.torch import save_file

    save_file(mtp, str(tmp_path / "hf" / "mtp.safetensors"))  # the -PT layout with MTP tensors
    path = torch_to_paddle(tmp_path / "hf", tmp_path / "paddle")
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        assert f.get_slice("ernie.mtp_linear_proj.0.weight").get_shape() == [2 * 32, 32]  # [in, out]
        assert "ernie.mtp_block.0.self_attn.qkv_proj.weight" in f.keys()  # noqa: SIM118
    ours, reference = ernie45.load_model(path), ernie45.load_model(tmp_path / "hf")
    assert ours.model.num_mtp_layers == reference.model.num_mtp_layers == 1
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        got = ours.model.mtp_forward(ids[:, 1:], ours.forward_hidden(ids)[:, :-1])
        want = reference.model.mtp_forward(ids[:, 1:], reference.forward_hidden(ids)[:, :-1])
    assert torch.equal(got, want)
    assert (logits_of(ours, 96) - logits_of(hf, 96)).abs().max().item() <= 1e-4


def test_paddle_bf16_stored_as_uint16(tmp_path):
    _hf, path = paddle_checkpoint(tmp_path, "moe_shared2_untied", dtype=torch.bfloat16)
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        assert f.get_tensor("ernie.layers.0.self_attn.qkv_proj.weight").dtype == np.uint16
        assert f.get_tensor("ernie.layers.1.mlp.gate.weight").dtype == np.float32
    ours = ernie45.load_model(path)
    assert ours.dtype == torch.bfloat16
    assert ours.model.layers[1].mlp.gate.weight.dtype == torch.float32
    reference = ernie45.load_model(tmp_path / "hf", dtype="bfloat16")
    for (name, p), (_, ref) in zip(ours.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, ref), name


def test_paddle_config_without_model_type(tmp_path):
    hf, path = paddle_checkpoint(tmp_path, "moe_shared2_untied")
    config = json.loads((path / "config.json").read_text())
    del config["model_type"]
    (path / "config.json").write_text(json.dumps(config))
    ours = ernie45.load_model(path)
    assert ours.config.model_type == "ernie4_5_moe"
    assert (logits_of(ours, 96) - logits_of(hf, 96)).abs().max().item() <= 1e-4


def _edit(path, fn):
    tensors = load_np(str(path / "model.safetensors"))
    fn(tensors)
    save_np(tensors, str(path / "model.safetensors"))


QKV = "ernie.layers.0.self_attn.qkv_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)}),
     ["mixed checkpoint layouts", "model.layers.0.self_attn.q_proj.weight", "Paddle layout", "transformers"]),
    (lambda t: t.pop("ernie.layers.1.mlp.up_gate_proj.weight"),
     ["missing 1 tensor", "ernie.layers.1.mlp.up_gate_proj.weight", "columns gate_proj | up_proj",
      "model.layers.1.mlp.gate_proj.weight, model.layers.1.mlp.up_proj.weight"]),
    (lambda t: t.update({QKV: np.ascontiguousarray(t[QKV].T)}),
     [QKV, "(128, 32)", "transposed", "(32, 128) [in, out]", "model.layers.0.self_attn.q_proj.weight (64, 32)"]),
    (lambda t: t.update({QKV: t[QKV][:, :96].copy()}),
     [QKV, "(32, 96)", "fits neither layout", "(32, 128) [in, out] (columns q_proj | k_proj | v_proj)",
      "model.layers.0.self_attn.v_proj.weight (32, 32)"]),
])
def test_malformed_paddle_checkpoints_are_refused(tmp_path, edit, message):
    _, path = paddle_checkpoint(tmp_path, "dense_bias_untied")
    _edit(path, edit)
    with pytest.raises(ValueError) as err:
        ernie45.load_model(path)
    for part in message:
        assert part in str(err.value)


@pytest.mark.parametrize("keys, message", [
    ({"torch_dtype": "float32"}, "`torch_dtype` says the transformers (-PT) layout"),
    ({"torch_dtype": "float32", "dtype": "float32"}, "has both `dtype`"),
])
def test_paddle_tensors_with_torch_config_are_refused(tmp_path, keys, message):
    _, path = paddle_checkpoint(tmp_path, "dense_bias_untied")
    config = json.loads((path / "config.json").read_text())
    config.pop("dtype")
    config.update(keys)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        ernie45.load_model(path)
    assert message in str(err.value) and "tensor ernie." in str(err.value) and "config.json" in str(err.value)


def test_unknown_layout_is_refused(tmp_path):
    _, path = paddle_checkpoint(tmp_path, "dense_bias_untied")
    _edit(path, lambda t: [t.__setitem__(k.replace("ernie.", "transformer."), t.pop(k)) for k in list(t)
                           if k.startswith("ernie.")])
    with pytest.raises(ValueError, match="unknown checkpoint layout: tensor .* neither in the transformers layout"):
        ernie45.load_model(path)


@pytest.mark.parametrize("case", ["dense_bias_untied", "moe_tied_interval2"])
def test_paddle_config_without_tie_word_embeddings_follows_the_tensors(tmp_path, case):
    hf, path = paddle_checkpoint(tmp_path, case)
    config = json.loads((path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(config))
    ours = ernie45.load_model(path)
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (logits_of(ours, 96) - logits_of(hf, 96)).abs().max().item() <= 1e-4
