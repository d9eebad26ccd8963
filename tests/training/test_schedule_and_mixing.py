import math

import pytest

from ernie45.tokenizer import load_tokenizer
from ernie45.training import config_from_dict, train
from ernie45.training.data import Encoder, TrainData
from ernie45.training.optim import lr_factor

from .helpers import make_config, sft_erniekit, write_jsonl

BASE = {"model_name_or_path": "m", "train_dataset_path": "a.jsonl", "learning_rate": 1.0, "min_lr": 0.1,
        "warmup_steps": 2}


@pytest.mark.parametrize(("kind", "expected"), [
    # steps 0..9 of 10: warmup 1/3, 2/3, then the decay from 1 to min_lr 0.1 over the 8 remaining steps
    ("linear", [1 / 3, 2 / 3] + [1 - 0.9 * k / 8 for k in range(8)]),
    ("cosine", [1 / 3, 2 / 3] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]),
    ("constant", [1 / 3, 2 / 3] + [1.0] * 8),
    # WSD: stable until the last decay_steps=4 steps, then linear to min_lr
    ("wsd", [1 / 3, 2 / 3, 1, 1, 1, 1] + [1 - 0.9 * k / 4 for k in range(1, 5)]),
])
def test_schedules_by_hand(kind, expected):
    cfg = config_from_dict({**BASE, "lr_scheduler_type": kind, "decay_steps": 4})
    assert [lr_factor(s, cfg, 10) for s in range(10)] == pytest.approx(expected)


def test_dataset_mixing_follows_train_dataset_prob(tmp_path, tiny_dense):
    a = write_jsonl(tmp_path / "a.jsonl", [{"src": [f"a{i}"], "tgt": ["x"]} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"src": [f"b{i}"], "tgt": ["y"]} for i in range(30)])
    cfg = make_config(tiny_dense, tmp_path / "o", a, train_dataset_path=f"{a},{b}", train_dataset_prob="3,1",
                      packing=False, batch_size=1)
    data = TrainData(cfg, Encoder(load_tokenizer(tiny_dense), 64), 0, world_size=1)
    units = data.epoch_units(0)
    tok = load_tokenizer(tiny_dense)
    from_a = sum("a" in tok.decode(u.ids).split("User: ")[1][:1] for u in units)
    assert len(units) == 60 and from_a == 45  # 3:1 of the 60 samples per epoch


def test_recompute_gives_the_same_loss_curve(tmp_path, tiny_moe):
    data = sft_erniekit(tmp_path / "sft.jsonl")
    plain = train(make_config(tiny_moe, tmp_path / "a", data, max_steps=3))
    recompute = train(make_config(tiny_moe, tmp_path / "b", data, max_steps=3, recompute=True))
    assert [h["loss"] for h in recompute["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-6)
