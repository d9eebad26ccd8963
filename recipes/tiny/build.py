"""Build ernie45's embedded default model from scratch, offline apart from the pinned Debian packages.

    python -m recipes.tiny.build OUT_DIR [--debs DIR] [--threads N] [--install]

Stages (each skipped when its output is already complete, so an interrupted build resumes):
  data      fortunes + fortunes-zh (pinned .debs), synthetic tasks (facts, worked solutions, chats, pairs)
            -> OUT/data/*.jsonl
  tokenizer SentencePiece BPE in ERNIE 4.5's layout -> OUT/tokenizer
  init      random ERNIE 4.5 MoE weights -> OUT/init
  pt        `ernie45 train configs/pt.yaml`  -> OUT/pt   (then evaluated)
  sft       `ernie45 train configs/sft.yaml` -> OUT/sft  (then evaluated)
  dpo       `ernie45 train configs/dpo.yaml` -> OUT/dpo  (then evaluated)
  mtp       `ernie45 train configs/mtp.yaml` -> OUT/mtp  (the MTP draft head alone; the DPO weights unchanged)
  final     OUT/mtp in bfloat16 -> OUT/final (evaluated again: the shipped weights); OUT/RESULTS.md
`--install` copies OUT/final into ernie45/assets/default_model and OUT/RESULTS.md into recipes/tiny/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ernie45.checkpoint import load_model, save_model
from ernie45.default_model import DEFAULT_MODEL_DIR

from .corpus import build_corpus
from .data import DatasetSizes, read_problems, write_datasets
from .evaluate import evaluate, read_texts
from .model import write_initial_checkpoint
from .report import write_results
from .tasks import generate
from .tokenizer import build_tokenizer

RECIPE_DIR = Path(__file__).parent
SEED = 1234
VOCAB_SIZE = 8192


class StageTimes:
    """Wall time of each stage that actually ran, kept in OUT/timings.json so a resumed build reports them all."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def record(self, name: str, started: float) -> None:
        self.seconds[name] = round(time.time() - started, 1)
        self.path.write_text(json.dumps(self.seconds, indent=2) + "\n", encoding="utf-8")


def _complete(checkpoint: Path) -> bool:
    return (checkpoint / "config.json").is_file() and any(checkpoint.glob("*.safetensors"))


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def stage_data(out: Path, debs: Path | None, times: StageTimes) -> None:
    if (out / "data" / "eval_tasks.jsonl").is_file():
        return
    started = time.time()
    _log("data: fetching the pinned fortune packages, writing datasets")
    corpus = build_corpus(out / "sources", debs)
    write_datasets(out / "data.tmp", corpus, DatasetSizes(), SEED)
    stats = {name: len(getattr(corpus, name)) for name in ("train_en", "train_zh", "heldout_en", "heldout_zh")}
    (out / "data.tmp" / "corpus_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out / "data", ignore_errors=True)
    os.replace(out / "data.tmp", out / "data")
    times.record("data", started)


def stage_tokenizer(out: Path, times: StageTimes) -> None:
    if (out / "tokenizer" / "tokenizer_config.json").is_file():
        return
    started = time.time()
    _log("tokenizer: training SentencePiece")
    texts = read_texts(out / "data" / "pt_text.jsonl")
    build_tokenizer(out / "tokenizer.tmp", texts, generate(3000, SEED + 5, heldout=False), VOCAB_SIZE)
    os.replace(out / "tokenizer.tmp", out / "tokenizer")
    times.record("tokenizer", started)


def stage_init(out: Path, times: StageTimes) -> None:
    if not _complete(out / "init"):
        started = time.time()
        _log("init: random initial checkpoint")
        write_initial_checkpoint(out / "init", out / "tokenizer", SEED)
        times.record("init", started)


def train(out: Path, stage: str, start: str, overrides: dict[str, str], threads: int, times: StageTimes) -> Path:
    """Run `ernie45 train configs/STAGE.yaml` from OUT/START into OUT/STAGE; returns the checkpoint."""
    target = out / stage
    if _complete(target) and (target / "metrics.jsonl").is_file():
        return target
    _log(f"{stage}: ernie45 train recipes/tiny/configs/{stage}.yaml")
    args = {"model_name_or_path": str(out / start), "output_dir": str(target), **overrides}
    command = [sys.executable, "-m", "ernie45.cli.main", "train", str(RECIPE_DIR / "configs" / f"{stage}.yaml"),
               *(f"{k}={v}" for k, v in args.items())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    subprocess.run(command, check=True, env=env)
    times.record(stage, started)
    return target


def evaluated(out: Path, stage: str, chat: bool, times: StageTimes) -> dict:
    path = out / "eval" / f"{stage}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    _log(f"{stage}: evaluating")
    problems = read_problems(out / "data" / "eval_tasks.jsonl")
    texts = read_texts(out / "data" / "pt_eval.jsonl")
    started = time.time()
    result = evaluate(out / stage, problems, texts, chat=chat)
    result["seconds"] = round(time.time() - started, 1)
    times.record(f"eval {stage}", started)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def stage_final(out: Path, times: StageTimes) -> Path:
    """The DPO model and its MTP head with weights in bfloat16 (router weights and correction biases stay fp32)."""
    final = out / "final"
    if not _complete(final):
        started = time.time()
        model = load_model(str(out / "mtp"), dtype="bfloat16")
        save_model(model, final, tokenizer=out / "mtp")
        times.record("final", started)
    return final


def install(out: Path) -> None:
    """Copy the final checkpoint into the package and the results next to the recipe."""
    files = [p for p in (out / "final").iterdir() if p.is_file()]
    tmp = DEFAULT_MODEL_DIR.with_name(DEFAULT_MODEL_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in files:
        shutil.copy2(path, tmp / path.name)
        (tmp / path.name).chmod(0o644)  # the saver's temporary files are private; package data is not
    shutil.copy2(out / "RESULTS.md", tmp / "RESULTS.md")
    shutil.rmtree(DEFAULT_MODEL_DIR, ignore_errors=True)
    os.replace(tmp, DEFAULT_MODEL_DIR)
    shutil.copy2(out / "RESULTS.md", RECIPE_DIR / "RESULTS.md")
    _log(f"installed into {DEFAULT_MODEL_DIR}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build ernie45's embedded default model (see recipes/tiny/README.md)")
    p.add_argument("out", type=Path, help="work directory (data, checkpoints, evaluations, RESULTS.md)")
    p.add_argument("--debs", type=Path, default=None, help="directory holding the three pinned .deb files")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training and evaluation")
    p.add_argument("--install", action="store_true", help="copy the result into ernie45/assets/default_model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    times = StageTimes(out / "timings.json")
    stage_data(out, args.debs, times)
    stage_tokenizer(out, times)
    stage_init(out, times)
    data = out / "data"
    train(out, "pt", "init", {
        "train_dataset_path": f"{data / 'pt_text.jsonl'},{data / 'pt_facts.jsonl'},{data / 'pt_solutions.jsonl'}",
        "eval_dataset_path": str(data / "pt_eval.jsonl"),
    }, args.threads, times)
    results = {"pt": evaluated(out, "pt", False, times)}
    train(out, "sft", "pt", {"train_dataset_path": f"{data / 'sft_train.jsonl'},{data / 'pt_text.jsonl'}"},
          args.threads, times)
    results["sft"] = evaluated(out, "sft", True, times)
    train(out, "dpo", "sft", {"train_dataset_path": str(data / "dpo_train.jsonl")}, args.threads, times)
    results["dpo"] = evaluated(out, "dpo", True, times)
    train(out, "mtp", "dpo", {"train_dataset_path": f"{data / 'sft_train.jsonl'},{data / 'pt_text.jsonl'}"},
          args.threads, times)
    final = stage_final(out, times)
    results["final"] = evaluated(out, "final", True, times)
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {threads}, torch {torch.__version__}"
    write_results(out / "RESULTS.md", out, results, final, times.seconds, machine)
    _log(f"done: {final} ({sum(f.stat().st_size for f in final.iterdir()) / 1e6:.1f} MB); {out / 'RESULTS.md'}")
    if args.install:
        install(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
