"""Tiny data files and configs for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

from ernie45.training import config_from_dict

QA = [("What is two plus two?", "four"), ("Name a color.", "blue"), ("Say hello.", "hello there"),
      ("What is the capital?", "the city"), ("Count to three.", "one two three"), ("Is it day?", "yes it is"),
      ("What do cats say?", "they say meow"), ("Pick a number.", "seven")]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_erniekit(path: Path) -> Path:
    return write_jsonl(path, [{"src": [q], "tgt": [a]} for q, a in QA])


def pt_text(path: Path) -> Path:
    docs = [f"{q} {a}. The answer to the question is {a}." for q, a in QA]
    return write_jsonl(path, [{"text": d} for d in docs])


def dpo_erniekit(path: Path) -> Path:
    rows = [{"src": [q], "tgt": [], "response": [[a], ["no idea at all"]], "sort": [1, 0]} for q, a in QA]
    return write_jsonl(path, rows)


def make_config(model_dir: Path, out_dir: Path, data: Path, **overrides):
    raw = {"model_name_or_path": str(model_dir), "train_dataset_path": str(data), "output_dir": str(out_dir),
           "stage": "SFT", "train_dataset_type": "erniekit", "max_seq_len": 64, "batch_size": 4, "max_steps": 8,
           "learning_rate": 3e-3, "lr_scheduler_type": "constant", "warmup_steps": 0, "seed": 0, "disable_tqdm": True,
           "logging_steps": 1, "packing": True, "max_grad_norm": 1.0}
    raw.update(overrides)
    return config_from_dict(raw, source="test-config")
