"""Checkpoint load/save: our own layout round trips, shards, MTP, atomic writes and every refusal message."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ernie45
from ernie45.checkpoint import build_empty_model
from ernie45.models import Ernie45Config

TINY_MOE = dict(
    model_type="ernie4_5_moe", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=8, moe_num_experts=4, moe_k=2, moe_intermediate_size=8,
    moe_num_shared_experts=1, moe_layer_start_index=1, tie_word_embeddings=False,
)


def make_model(num_mtp_layers=0, **overrides):
    config = Ernie45Config.from_dict(dict(TINY_MOE, **overrides))
    model = build_empty_model(config, torch.float32, num_mtp_layers)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    ernie45.save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def logits(model):
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        return model(ids)


def test_round_trip_released_layout(saved):
    model, path = saved
    names = set(load_file(str(path / "model.safetensors")))
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in names
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in names
    assert "lm_head.weight" in names
    assert json.loads((path / "config.json").read_text())["model_type"] == "ernie4_5_moe"
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert torch.equal(logits(ernie45.load_model(path)), logits(model))


def test_saved_directory_has_the_mode_mkdir_gives(saved):
    import os

    _, path = saved
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700: other users can serve it


def test_sharded_save_and_load(tmp_path):
    model = make_model()
    ernie45.save_model(model, tmp_path / "ckpt", max_shard_bytes=4096)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert torch.equal(logits(ernie45.load_model(tmp_path / "ckpt")), logits(model))


def test_mtp_block_built_and_loaded_when_present(tmp_path):
    model = make_model(num_mtp_layers=1, num_nextn_predict_layers=1)
    ernie45.save_model(model, tmp_path / "ckpt")
    names = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert {"model.mtp_linear_proj.0.weight", "model.mtp_emb_norm.0.weight", "model.mtp_hidden_norm.0.weight",
            "model.mtp_block.0.self_attn.q_proj.weight"} <= names
    loaded = ernie45.load_model(tmp_path / "ckpt")
    assert loaded.model.num_mtp_layers == 1
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        hidden = loaded.forward_hidden(ids)
        mtp_hidden = loaded.model.mtp_forward(ids[:, 1:], hidden[:, :-1])
        expected = model.model.mtp_forward(ids[:, 1:], model.forward_hidden(ids)[:, :-1])
    assert mtp_hidden.shape == (1, 7, 16)
    assert torch.equal(mtp_hidden, expected)
    # Without MTP tensors the same config builds no MTP block.
    ernie45.save_model(make_model(num_nextn_predict_layers=1), tmp_path / "plain")
    assert ernie45.load_model(tmp_path / "plain").model.num_mtp_layers == 0


def test_failed_save_leaves_previous_checkpoint_intact(saved):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ernie45.save_model(make_model(), path, tokenizer=BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temporary directories left


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        ernie45.load_model(tmp_path)


def test_unknown_model_type(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'llama' is not supported; supported: ernie4_5, ernie4_5_moe"):
        ernie45.load_model(path)


def test_malformed_config_json(saved):
    _, path = saved
    (path / "config.json").write_text('{"model_type": "ernie4_5",\n "hidden_size": }')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(line 2"):
        ernie45.load_model(path)


def test_missing_tensor_is_named(saved):
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    del tensors["model.layers.1.mlp.experts.2.down_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        ernie45.load_model(path)
    message = str(info.value)
    assert "missing tensors (2): model.layers.0.self_attn.k_proj.weight, model.layers.1.mlp.experts.down_proj" in message
    assert "unexpected tensors (1): model.layers.0.self_attn.extra.weight" in message


def test_wrong_shape_is_named(saved):
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(31, 16)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.up_proj.weight: shape \(31, 16\) in the checkpoint, "
                                         r"the model expects \(32, 16\)"):
        ernie45.load_model(path)


def test_truncated_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: .*(truncated or corrupt)"):
        ernie45.load_model(path)


def test_no_weights(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ernie45.load_model(path)


def test_index_names_missing_shard(tmp_path):
    ernie45.save_model(make_model(), tmp_path / "ckpt", max_shard_bytes=4096)
    next((tmp_path / "ckpt").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"names shard\(s\) that are not in"):
        ernie45.load_model(tmp_path / "ckpt")


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(FileNotFoundError, match="downloading it from the Hugging Face hub failed"):
        ernie45.load_model("baidu/ERNIE-4.5-0.3B-PT")


def test_not_a_directory_or_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ernie45.load_model(str(tmp_path / "nope" / "deeper" / "x"))


def test_bad_dtype(saved):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        ernie45.load_model(saved[1], dtype="int8")


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"num_attention_heads \(3\) must be a multiple of num_key_value_heads \(2\)"):
        Ernie45Config.from_dict(dict(TINY_MOE, num_attention_heads=3, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"moe_k \(5\) must be in \[1, moe_num_experts=4\]"):
        Ernie45Config.from_dict(dict(TINY_MOE, moe_k=5))
    with pytest.raises(ValueError, match="no 'model_type'"):
        Ernie45Config.from_dict({"hidden_size": 8})
