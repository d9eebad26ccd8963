"""`num_nextn_predict_layers` + `mtp_only`: a released model without MTP gains a trained draft head while its
own weights stay exactly as they were."""

import pytest
import torch
from safetensors.torch import load_file

from ernie45.checkpoint import load_model
from ernie45.training import train
from ernie45.training.config import ConfigError

from .helpers import make_config, pt_text
from .test_e2e import metrics


def test_mtp_only_adds_a_head_and_leaves_the_base_bit_identical(tmp_path, tiny_moe):
    out = tmp_path / "run"
    cfg = make_config(tiny_moe, out, pt_text(tmp_path / "pt.jsonl"), stage="PT", train_dataset_type="text",
                      num_nextn_predict_layers=1, mtp_only=True, multi_token_pred_lambda=1.0, max_steps=12,
                      learning_rate=3e-3)
    train(cfg)
    records = [r for r in metrics(out) if r.get("split", "train") == "train"]
    assert records[-1]["mtp_loss"] < 0.8 * records[0]["mtp_loss"]
    assert abs(records[-1]["lm_loss"] - records[0]["lm_loss"]) < 0.2  # same fixed model on other batches
    trained = load_model(out, dtype="float32")
    assert trained.model.num_mtp_layers == 1 and trained.config.num_nextn_predict_layers == 1
    before = load_file(next(tiny_moe.glob("*.safetensors")))
    after = load_file(next(out.glob("*.safetensors")))
    assert set(before) < set(after) and all(".mtp_" in k for k in set(after) - set(before))
    for name, tensor in before.items():
        assert torch.equal(after[name].to(tensor.dtype), tensor), name


def test_mtp_only_refuses_what_it_cannot_train(tmp_path, tiny_moe):
    data = str(pt_text(tmp_path / "pt.jsonl"))
    with pytest.raises(ConfigError, match="mtp_only: .*no MTP layers"):
        train(make_config(tiny_moe, tmp_path / "a", data, stage="PT", train_dataset_type="text", mtp_only=True,
                          max_steps=1))
    with pytest.raises(ConfigError, match="mtp_only: .*fine_tuning: Full"):
        make_config(tiny_moe, tmp_path / "b", data, stage="PT", train_dataset_type="text", mtp_only=True,
                    fine_tuning="LoRA")
    with pytest.raises(ConfigError, match="mtp_only: .*multi_token_pred_lambda"):
        make_config(tiny_moe, tmp_path / "c", data, stage="PT", train_dataset_type="text", mtp_only=True,
                    multi_token_pred_lambda=0.0)
