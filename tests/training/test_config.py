import dataclasses

import pytest

from ernie45.training.config import ConfigError, TrainConfig, config_from_dict, field_docs, load_config

BASE = {"model_name_or_path": "m", "train_dataset_path": "a.jsonl"}


def test_erniekit_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "### data\ntrain_dataset_type: erniekit,alpaca\ntrain_dataset_path: a.jsonl,b.jsonl\ntrain_dataset_prob: 3,1\n"
        "### model\nmodel_name_or_path: some/model\nfine_tuning: LoRA\nlora_rank: 8\n"
        "### finetuning\nstage: SFT\nbatch_size: 2\nmax_steps: 100\nlearning_rate: 3.0e-4\nlr_scheduler_type: cosine\n"
        "moe_aux_loss_lambda: 1.0e-5\n"
    )
    cfg = load_config(path, ["max_steps=7", "packing=false", "lora_target_modules=q_proj,v_proj"])
    assert cfg.max_steps == 7 and cfg.packing is False and cfg.learning_rate == 3e-4
    assert cfg.dataset_types == ["erniekit", "alpaca"]
    assert cfg.dataset_probs == [0.75, 0.25]
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.moe_aux_loss_lambda == 1e-5


def test_unknown_key_names_it_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"test\.yaml: unknown key 'learning_rat'; did you mean 'learning_rate'\?"):
        config_from_dict({**BASE, "learning_rat": 1e-4}, source="test.yaml")


def test_known_erniekit_key_we_lack_is_not_supported():
    with pytest.raises(ConfigError, match="tensor_parallel_degree: not supported"):
        config_from_dict({**BASE, "tensor_parallel_degree": 2})
    with pytest.raises(ConfigError, match="QAT is not supported yet"):
        config_from_dict({**BASE, "fine_tuning": "QAT"})
    with pytest.raises(ConfigError, match="kto_pair is not implemented"):
        config_from_dict({**BASE, "stage": "DPO", "loss_type": "kto_pair"})


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="batch_size: expected int, got 'two'"):
        config_from_dict({**BASE, "batch_size": "two"})
    with pytest.raises(ConfigError, match="stage: 'RL' is not one of PT, SFT, DPO"):
        config_from_dict({**BASE, "stage": "RL"})
    with pytest.raises(ConfigError, match="train_dataset_prob: 1 weights for 2 paths"):
        config_from_dict({**BASE, "train_dataset_path": "a,b", "train_dataset_prob": "1"})


def test_every_field_has_a_docstring():
    docs = field_docs()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not docs.get(f.name)]
    assert missing == []
