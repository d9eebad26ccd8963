"""Tiny data files and configs for the training tests."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
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


def torchrun_two_processes(runs: list[tuple[object, Path]], timeout: float) -> None:
    """Train each (config, result path) in turn in one real 2-process torchrun (gloo, dist_worker.py); rank 0 writes
    each run's loss history to its result path. Fails with the run's output on error or timeout."""
    args = []
    for cfg, result in runs:
        cfg_path = result.with_suffix(".config.json")
        cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        args += [str(cfg_path), str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("dist_worker.py")), *args]
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, no orphans left.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError("torchrun run timed out:\n" + output[-4000:]) from None
    assert proc.returncode == 0, output[-4000:]
