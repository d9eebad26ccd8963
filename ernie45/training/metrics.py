"""Run metrics: one JSON line per logged step / eval (metrics.jsonl), TensorBoard scalars when tensorboard is
installed, and the tqdm progress bar (loss, tokens/s, ETA). Only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint (they will be redone)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def progress(self, steps: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a training output_dir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
