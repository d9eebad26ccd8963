"""Resumable checkpoints: model + optimizer (torch.distributed.checkpoint, sharded under FSDP2: each rank writes
its shards), scheduler, per-rank RNG states and the trainer state (step = data position).

Written atomically: everything goes to `.checkpoint-N.tmp`, and one rename makes `checkpoint-N` appear, so a
crash mid-save never leaves a directory that looks complete. `save_total_limit` prunes the oldest.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import DistInfo, barrier

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@contextlib.contextmanager
def _single_process_quiet(info: DistInfo):
    """DCP warns that it assumes one process when no process group exists; that is the intent here."""
    with warnings.catch_warnings():
        if not info.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in run_dir, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict, info: DistInfo,
                    save_total_limit: int = 0) -> Path:
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet(info):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save(rng_state(), tmp / f"rng_{info.rank}.pt")
    barrier(info)
    if info.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "world_size": info.world_size}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if save_total_limit:
            for _, old in list_checkpoints(run_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def resolve_resume(value: str | None, run_dir: Path) -> Path | None:
    """'auto' -> newest complete checkpoint in run_dir (None when there is none); a path must be a checkpoint."""
    if not value:
        return None
    if value == "auto":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, info: DistInfo) -> dict:
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("world_size", 1) != info.world_size:
        raise ValueError(f"{path}: written by {state.get('world_size')} processes; resume with the same number "
                         f"(this run has {info.world_size})")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet(info):
        dcp.load(sd, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / f"rng_{info.rank}.pt", weights_only=False))
    return state
