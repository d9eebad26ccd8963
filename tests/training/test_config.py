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


def test_erniekit_sft_config_runs_unchanged(tmp_path):
    """Keys of ERNIEKit's 0.3B run_sft_8k.yaml: performance hints and neutral values of absent features load."""
    raw = {**BASE, "fine_tuning": "full", "stage": "sft", "fuse_rope": True, "use_sparse_head_and_loss_fn": True,
           "tensor_parallel_degree": 1, "pipeline_parallel_degree": 1, "offload_optim": False, "bf16": True,
           "per_device_train_batch_size": 2, "evaluation_strategy": "steps", "logging_dir": "./vdl_log",
           "layerwise_lr_decay_bound": 1.0, "min_lr": 1.0e-6, "adam_beta2": 0.95, "release_grads": True}
    cfg = config_from_dict(raw)
    assert (cfg.fine_tuning, cfg.stage, cfg.batch_size, cfg.compute_type) == ("Full", "SFT", 2, "bf16")
    assert cfg.accepted_hints["fuse_rope"] is True and cfg.accepted_hints["tensor_parallel_degree"] == 1
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg  # a dumped config (train_config.json) reads back


def test_known_erniekit_key_we_lack_is_not_supported():
    with pytest.raises(ConfigError, match="tensor_parallel_degree: 2 is not supported: tensor parallelism"):
        config_from_dict({**BASE, "tensor_parallel_degree": 2})
    with pytest.raises(ConfigError, match="offload_optim: True is not supported"):
        config_from_dict({**BASE, "offload_optim": True})
    with pytest.raises(ConfigError, match="compute_type fp8 .FP8 QAT. is not supported yet"):
        config_from_dict({**BASE, "compute_type": "fp8"})


def test_qat_settings():
    cfg = config_from_dict({**BASE, "fine_tuning": "QAT", "qat_bits": 2})
    assert cfg.fine_tuning == "Full" and cfg.qat and cfg.qat_bits == 2
    with pytest.raises(ConfigError, match="qat_bits: 3 is not one of 8, 4, 2"):
        config_from_dict({**BASE, "qat": True, "qat_bits": 3})
    with pytest.raises(ConfigError, match="qat: QAT trains the full weights"):
        config_from_dict({**BASE, "qat": True, "fine_tuning": "LoRA"})
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
